"""The HTTP server: uvicorn in a thread of the node process, as a node service.

:func:`bind_http` binds the listening socket first, at node start, so that a
port already in use stops ``dicomnode serve`` with an error naming
``http.port`` before anything else starts. :class:`HttpServer` then serves the
application on that socket from its own thread (its own asyncio loop), so the
receive path (the SCP's threads) never waits on it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading

import uvicorn
from starlette.applications import Starlette

from dicomnode.config import HttpConfig
from dicomnode.errors import ConfigError
from dicomnode.logs import kv

log = logging.getLogger(__name__)


def bind_http(cfg: HttpConfig) -> socket.socket:
    """The listening socket of ``http.host:http.port``, or :class:`ConfigError`."""
    try:
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"http.host: cannot resolve {cfg.host!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"http.port: {cfg.host}:{cfg.port} is already in use; choose "
                              "another http.port, or http.enabled: false") from None
        raise ConfigError(f"http.port: cannot listen on {cfg.host}:{cfg.port}: "
                          f"{exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


class HttpServer:
    """A :class:`dicomnode.node.node.Service` serving ``app`` on ``sock``."""

    name = "http"

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        # uvicorn reports its start and stop at INFO on a logger named "uvicorn.error";
        # ours says "http listening". Its warnings and errors still reach the log.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.address = f"{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", loop="asyncio",
            http="h11", ws="none", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except Exception:  # noqa: BLE001 - logged; readiness of the rest is unaffected
            log.exception("http server failed", extra=kv(address=self.address))

    def start(self) -> None:
        self._thread.start()
        log.info("http listening", extra=kv(address=self.address))

    def stop(self, timeout: float) -> None:
        self.server.should_exit = True
        self._thread.join(min(timeout, 5.0))
        self.sock.close()

    def alive(self) -> bool:
        return self._thread.is_alive()


__all__ = ["HttpServer", "bind_http"]
