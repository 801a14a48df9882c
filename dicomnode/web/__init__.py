"""The node's HTTP side (``dicomnode serve``): health, readiness and Prometheus metrics.

:mod:`~dicomnode.web.app` builds the Starlette application (routes, the
loopback-only rule), :mod:`~dicomnode.web.health` the readiness checks,
:mod:`~dicomnode.web.metrics` the ``/metrics`` exposition and
:mod:`~dicomnode.web.server` runs it with uvicorn in a thread of the node
process, as one of the node's services. The layer sits between ``node`` (which
composes it) and ``worker``; it reads the store and never issues SQL itself.
"""

from __future__ import annotations

from dicomnode.web.app import create_app
from dicomnode.web.health import NodeView, readiness
from dicomnode.web.server import HttpServer, bind_http

__all__ = ["HttpServer", "NodeView", "bind_http", "create_app", "readiness"]
