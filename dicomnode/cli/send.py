"""``dicomnode send PATH... --to HOST:PORT --called-aet AET``: the node's C-STORE SCU
(:func:`dicomnode.dispatch.scu.store_files`, the one results are delivered with) on
the command line.

Files are sent as stored (compressed data is never transcoded): each file's own
transfer syntax is proposed, with little endian fallbacks for uncompressed
data. More than 128 presentation contexts are split over several associations.
Exit code 0 when every instance got a success or warning status, 1 when some
failed (listed in the summary), 2 when nothing could be sent (bad arguments,
peer unreachable or rejecting).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.filereader import read_file_meta_info

from dicomnode.config import DestinationConfig
from dicomnode.errors import DicomNodeError
from dicomnode.logs import setup_logging

if TYPE_CHECKING:
    from dicomnode.dispatch.scu import AssociationFailed, FileOutcome


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SendReport:
    """What ``dicomnode send`` reports: one outcome per file, and the association
    failure that stopped sending, if any."""

    outcomes: tuple[FileOutcome, ...]
    failure: AssociationFailed | None = None

    @property
    def sent(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def warnings(self) -> int:
        return sum(o.state == "warning" for o in self.outcomes)  # OutcomeState.WARNING

    @property
    def failed(self) -> list[tuple[Path, str, str]]:
        """(path, SOP Instance UID, reason) of every file the peer does not hold."""
        return [(o.path, o.sop_instance_uid, self._reason(o)) for o in self.outcomes
                if not o.ok]

    def _reason(self, o: FileOutcome) -> str:
        f = self.failure
        if f is None or f.kind == "lost" or o.status is not None or not o.transient:
            return o.message
        # Not sent because no association came about: say why in the CLI's words.
        if f.kind == "rejected":
            return f"association rejected ({f.detail})"
        return "association aborted" if f.kind == "aborted" else "peer unreachable"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("send", help="send DICOM files/folders to a peer by C-STORE")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="peer address")
    p.add_argument("--called-aet", required=True, help="the peer's AE title")
    p.add_argument("--calling-aet", default="DICOMNODE_SCU", help="our AE title")
    p.add_argument("--max-pdu", type=int, default=0, help="max PDU we receive (0 = unlimited)")
    p.add_argument("--timeout", type=float, default=60.0, help="network/DIMSE timeout, s")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _parse_to(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DicomNodeError(f"--to: {value!r} is not HOST:PORT")
    return host, int(port)


def collect(paths: list[str]) -> tuple[list[_File], list[tuple[Path, str]]]:
    """Every DICOM Part 10 file under ``paths`` (sorted), and the files skipped with why."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise DicomNodeError(f"{raw}: no such file or folder")
    files: list[_File] = []
    skipped: list[tuple[Path, str]] = []
    for p in found:
        try:
            meta = read_file_meta_info(p)
            files.append(_File(p, str(meta.MediaStorageSOPClassUID),
                               str(meta.MediaStorageSOPInstanceUID),
                               str(meta.TransferSyntaxUID)))
        except Exception as exc:  # noqa: BLE001 - not DICOM: skip, report
            skipped.append((p, f"not a DICOM file ({type(exc).__name__})"))
    return files, skipped


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and total > 0
        self.done = 0
        self.failed = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            width = 30
            fill = int(width * self.done / self.total)
            rate = self.done / max(now - self.t0, 1e-6)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                             f"{rate:.0f}/s failed {self.failed} ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def send_files(files: list[_File], host: str, port: int, called_aet: str, calling_aet: str,
               *, max_pdu: int = 0, timeout: float = 60.0, progress: bool = False) -> SendReport:
    """C-STORE every file with :func:`dicomnode.dispatch.scu.store_files`."""
    # Imported here, not at the top: it loads pynetdicom, +50-80 ms (20-30 %) on every
    # `dicomnode` command, `--help` included (every command module is imported to
    # build the parser; measured with -X importtime).
    from dicomnode.dispatch.scu import AssociationFailed, store_files

    dest = DestinationConfig(name="send", ae_title=called_aet, host=host, port=port,
                             max_pdu=max_pdu)
    bar = _Progress(len(files), progress)
    try:
        res = store_files(dest, [f.path for f in files], calling_ae_title=calling_aet,
                          acse_timeout=timeout, dimse_timeout=timeout,
                          network_timeout=timeout, on_outcome=lambda o: bar.step(o.ok))
        result = SendReport(res.outcomes)
    except AssociationFailed as exc:
        result = SendReport(exc.outcomes, exc)
    finally:
        bar.close()
    return result


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "log_level", None):
        setup_logging(args.log_level, bool(getattr(args, "log_json", False)))
    else:
        # The summary below is the report; the SCU's own log lines only with --log-level.
        logging.getLogger("dicomnode").addHandler(logging.NullHandler())
    host, port = _parse_to(args.to)
    files, skipped = collect(args.paths)
    if not files:
        raise DicomNodeError("no DICOM files found in " + ", ".join(args.paths))
    progress = not args.no_progress and os.isatty(2)
    res = send_files(files, host, port, args.called_aet, args.calling_aet,
                     max_pdu=args.max_pdu, timeout=args.timeout, progress=progress)
    failed = res.failed
    print(f"sent {res.sent}/{len(files)} instance(s) to {args.called_aet}@{host}:{port}"
          + (f", {res.warnings} with warnings" if res.warnings else "")
          + (f", {len(failed)} failed" if failed else "")
          + (f", {len(skipped)} non-DICOM file(s) skipped" if skipped else ""))
    for path, uid, why in failed[:50]:
        print(f"  FAILED {path} ({uid}): {why}")
    if len(failed) > 50:
        print(f"  ... and {len(failed) - 50} more")
    for path, why in skipped[:10]:
        print(f"  skipped {path}: {why}")
    if res.sent == 0:
        return 2
    return 1 if failed else 0
