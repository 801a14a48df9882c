"""The demo's receiving PACS: a pynetdicom Storage SCP on a free port of 127.0.0.1
that writes what it receives into a folder (``dicomnode demo`` without ``--to``)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt


@dataclass
class DemoPacs:
    """A running demo PACS: where it listens and what it holds."""

    port: int
    aet: str
    folder: Path
    received: list[tuple[str, Path]]
    server: Any

    def stop(self) -> None:
        self.server.shutdown()


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pacs(folder: Path, aet: str = "DEMOPACS") -> DemoPacs:
    """Start a Storage SCP on a free port of 127.0.0.1 that writes every instance it
    receives into ``folder`` as ``<Modality>_<SOP Instance UID>.dcm``."""
    folder.mkdir(parents=True, exist_ok=True)
    received: list[tuple[str, Path]] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        p = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        with lock:
            received.append((str(ds.Modality), p))
        return 0x0000

    ae = AE(ae_title=aet)
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return DemoPacs(port, aet, folder, received, server)
