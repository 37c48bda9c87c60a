"""Drivers that make the sandbox cloud's real OpenStack services act on this machine.

This package is installed into the services venv only; it is never imported by the product.
"""
