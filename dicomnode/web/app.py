"""The Starlette application of the node's HTTP side.

Routes (all read-only so far):

========== =========================================================
/healthz   200 while the process serves HTTP (liveness), any client
/readyz    200 / 503 with a JSON body naming each check (loopback)
/metrics   Prometheus text exposition (loopback)
========== =========================================================

Read-only routes answer loopback clients only unless ``http.public: true``;
others get 403 and a log line naming the client. Routes that change state
(retry, cancel, C-ECHO test: the status page to come) are POST routes that
call :func:`require_token` first (a bearer token is not sent by a browser on
its own, so such a request cannot be forged cross-site); pages go beside
these routes in :func:`create_app`, reading the store through ``node.store``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomnode.logs import kv
from dicomnode.web.health import NodeView, readiness
from dicomnode.web.metrics import CONTENT_TYPE, registry_for, render

log = logging.getLogger(__name__)

# Paths any client may ask (a load balancer's liveness probe is rarely on loopback).
OPEN_PATHS = frozenset({"/healthz"})


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def client_allowed(request: Request, public: bool) -> bool:
    """Read-only routes: loopback clients, or anyone with ``http.public: true``."""
    return public or request.url.path in OPEN_PATHS or is_loopback(
        request.client.host if request.client else None)


def require_token(request: Request, token: str) -> Response | None:
    """For routes that change state: ``Authorization: Bearer <http.token>``.

    Returns the refusal (401 without / with a wrong token, 403 when no token is
    configured), or ``None`` to go on. Compared in constant time.
    """
    client = request.client.host if request.client else "?"
    if not token:
        log.warning("http: refused, http.token is not set", extra=kv(
            client=client, path=request.url.path))
        return JSONResponse({"error": "state-changing requests are off: set http.token"},
                            status_code=403)
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(
            given[7:].encode(), token.encode()):
        log.warning("http: refused, missing or wrong token", extra=kv(
            client=client, path=request.url.path))
        return JSONResponse({"error": "missing or wrong token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    return None


def create_app(node: NodeView) -> Starlette:
    settings = node.settings
    public = settings.http.public
    registry = registry_for(lambda: node.store)

    # Plain (sync) endpoints: Starlette runs them in its thread pool, so a slow
    # database query never blocks the event loop.
    def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    def readyz(request: Request) -> Response:
        r = readiness(node)
        if not r.ok:
            failed = {c.name: c.detail for c in r.checks if not c.ok}
            log.warning("http: not ready", extra=kv(**failed))
        return JSONResponse(r.as_dict(), status_code=200 if r.ok else 503)

    def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    return Starlette(routes=[
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], middleware=[Middleware(LoopbackOnly, public=public)])


class LoopbackOnly:
    """ASGI middleware: 403 (logged) for clients not on loopback unless ``http.public``."""

    def __init__(self, app: ASGIApp, public: bool) -> None:
        self.app = app
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            if not client_allowed(request, self.public):
                log.warning("http: refused a client not on loopback (http.public is false)",
                            extra=kv(client=request.client.host if request.client else "?",
                                     path=request.url.path))
                response = JSONResponse({"error": "forbidden: only loopback clients "
                                         "(set http.public: true to serve others)"},
                                        status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


__all__ = ["OPEN_PATHS", "LoopbackOnly", "client_allowed", "create_app", "is_loopback",
           "require_token"]
