"""Warden: a self-hostable zero-trust security control plane for IoT fleets."""

__version__ = "0.1.0"
__all__ = ["__version__"]
