"""The hub's HTTP surface: EST, revocation distribution, the operator API, health and metrics, and the server that
runs them (``warden serve``)."""

from warden.api._app import create_app
from warden.api._auth import ACTION_KEY, PUBLIC
from warden.api._metrics import Metrics
from warden.api._server import TlsContexts, WardenHttpProtocol, prepare, serve

__all__ = ["ACTION_KEY", "PUBLIC", "Metrics", "TlsContexts", "WardenHttpProtocol", "create_app", "prepare", "serve"]
