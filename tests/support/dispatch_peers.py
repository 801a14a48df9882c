"""Real C-STORE peers for dispatch tests: a scriptable pynetdicom SCP and DCMTK storescp.

Both listen on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

from tests.support.peers import DCMTK_ENV, free_port, wait_for_port


@dataclass
class Received:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    calling_aet: str


@dataclass
class ScriptedSCP:
    """A pynetdicom Storage SCP whose answers the test chooses.

    ``statuses`` maps SOP Instance UID -> status to return (default success);
    ``abort_on`` aborts the association when that instance arrives (before
    answering); ``transfer_syntaxes`` limits what it accepts; ``reject``
    rejects every association (calling AE not in its allow list).
    """

    ae_title: str = "SCRIPTED"
    statuses: dict[str, int] = field(default_factory=dict)
    abort_on: set[str] = field(default_factory=set)
    transfer_syntaxes: Sequence[str] = tuple(AllTransferSyntaxes)
    reject: bool = False
    port: int = 0
    received: list[Received] = field(default_factory=list)
    associations: int = 0
    #: per association: the (abstract syntax, transfer syntax) pairs proposed
    requested: list[set[tuple[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.abort_on:
            event.assoc.abort()
            return 0xA700  # never reaches the peer: the association is gone
        with self._lock:
            self.received.append(Received(
                uid, str(event.request.AffectedSOPClassUID),
                str(event.context.transfer_syntax), event.assoc.requestor.ae_title))
        status = self.statuses.get(uid, 0x0000)
        if status in (0x0000,):
            return status
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = f"scripted status 0x{status:04X}"
        return ds

    def _on_open(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def _on_requested(self, event: evt.Event) -> None:
        pairs = {(str(cx.abstract_syntax), str(ts))
                 for cx in event.assoc.requestor.requested_contexts for ts in cx.transfer_syntax}
        with self._lock:
            self.requested.append(pairs)

    @contextlib.contextmanager
    def running(self) -> Iterator[ScriptedSCP]:
        ae = AE(ae_title=self.ae_title)
        for sop_class in _STORAGE_CLASSES.values():
            ae.add_supported_context(UID(sop_class), list(self.transfer_syntaxes))
        if self.reject:
            ae.require_calling_aet = ["NOT_YOU"]
        self.port = free_port()
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_open),
                          (evt.EVT_REQUESTED, self._on_requested)],
        )
        try:
            yield self
        finally:
            server.shutdown()


@dataclass
class StoreSCP:
    """DCMTK ``/usr/bin/storescp`` writing what it receives to ``out_dir``."""

    out_dir: Path
    port: int
    ae_title: str
    process: subprocess.Popen[str]

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


@contextlib.contextmanager
def storescp_running(out_dir: Path, *flags: str, ae_title: str = "STORESCP") -> Iterator[StoreSCP]:
    """Run DCMTK storescp (TCP_NODELAY=1); ``flags`` select accepted syntaxes, e.g. ``+xi``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(out_dir.parent / f"storescp-{port}.log", "w")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", ae_title, "-od", str(out_dir), "-uf", *flags, str(port)],
        env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_port(port, timeout=15)
        yield StoreSCP(out_dir, port, ae_title, proc)
    finally:
        # storescp lingers for seconds on SIGTERM; every file it acknowledged
        # is already written, so a kill loses nothing the tests look at.
        proc.kill()
        proc.wait(10)
        log.close()
