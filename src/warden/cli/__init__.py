"""The ``warden`` command line: a thin shell over the hub's services."""

from warden.cli._app import app, main, run

__all__ = ["app", "main", "run"]
