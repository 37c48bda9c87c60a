"""The local sandbox: a small OpenStack cloud of the real services whose servers are systemd
guests, and stand-ins for the CANFAR services the bootstrap touches.

Only the CLI's ``sandbox`` commands and the tests import this package; the product reaches the
sandbox exactly as it reaches a real cloud (clouds.yaml, URLs, SSH).
"""
