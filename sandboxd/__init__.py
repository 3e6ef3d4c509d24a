"""sandboxd: a rootless local sandbox daemon. Public surface: the client and the errors."""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors
from .client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "__version__", "errors"]
