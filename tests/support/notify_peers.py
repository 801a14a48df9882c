"""Real notification receivers on 127.0.0.1: an HTTP webhook server and an HL7 MLLP listener."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
import hl7.mllp

from tests.support.peers import free_port


def check_signature(secret: str, body: bytes, header: str, tolerance: float = 300) -> bool:
    """A receiver's own check of ``X-Dicomnode-Signature: t=<unix>,v1=<hex>`` (written
    here from the documented scheme, not with the node's code): HMAC-SHA256 over
    ``"<t>." + body``, constant-time compare, timestamp within ``tolerance`` seconds."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - t) <= tolerance and hmac.compare_digest(mac, parts.get("v1", ""))


class _Hook(BaseHTTPRequestHandler):
    status = 200
    secret = ""  # set: requests without a valid signature are answered 401
    bodies: list[tuple[dict[str, str], Any]] = []
    raw: list[bytes] = []
    rejected: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        length = int(self.headers["Content-Length"])
        data = self.rfile.read(length)
        cls = type(self)
        if cls.secret and not check_signature(
                cls.secret, data, self.headers.get("X-Dicomnode-Signature", "")):
            cls.rejected.append(self.headers.get("X-Dicomnode-Signature", ""))
            self.send_response(401)
            self.end_headers()
            return
        type(self).raw.append(data)
        body = json.loads(data)
        type(self).bodies.append((dict(self.headers), body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class HookServer:
    """The URL, the (headers, JSON body) pairs received, and the status it answers
    (changeable while it runs)."""

    def __init__(self, handler: type[_Hook], url: str) -> None:
        self._handler = handler
        self.url = url

    @property
    def bodies(self) -> list[tuple[dict[str, str], Any]]:
        return self._handler.bodies

    @property
    def rejected(self) -> list[str]:
        """Signature headers of requests answered 401 (a secret was set)."""
        return self._handler.rejected

    @property
    def raw(self) -> list[bytes]:
        """The request bodies as received (bytes), e.g. to check a signature."""
        return self._handler.raw

    def answer(self, status: int) -> None:
        self._handler.status = status


@contextlib.contextmanager
def webhook_server(status: int = 200, secret: str = "") -> Iterator[HookServer]:
    """A webhook receiver; with ``secret`` it verifies each body's signature first."""
    handler = type("Hook", (_Hook,), {"status": status, "bodies": [], "raw": [],
                                      "secret": secret, "rejected": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield HookServer(handler, f"http://127.0.0.1:{server.server_address[1]}/hook")
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def http_server(status: int) -> Iterator[tuple[str, list[Any]]]:
    """``(url, bodies)`` of a webhook server answering ``status``."""
    with webhook_server(status) as hook:
        yield hook.url, hook.bodies


@contextlib.contextmanager
def mllp_server(ack_code: str = "AA") -> Iterator[tuple[int, list[hl7.Message]]]:
    """python-hl7's asyncio MLLP server in a thread, answering ``ack_code``."""
    received: list[hl7.Message] = []
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def handle(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                received.append(msg)
                writer.writemessage(msg.create_ack(ack_code))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await hl7.mllp.start_hl7_server(handle, host="127.0.0.1", port=port)
        ready.set()
        async with server:
            with contextlib.suppress(asyncio.CancelledError):
                await server.serve_forever()

    t = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield port, received
    finally:
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        t.join(5)
