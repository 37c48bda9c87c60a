"""The sandbox cloud: the real OpenStack services from PyPI, run on loopback.

``install()`` prepares Debian packages and the services venv; ``sandbox.manager`` starts and
stops the whole sandbox.
"""

from sandbox.cloud.packages import install

__all__ = ["install"]
