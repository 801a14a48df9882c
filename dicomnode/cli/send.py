"""``dicomnode send PATH... --to HOST:PORT --called-aet AET``: a C-STORE SCU.

Files are sent exactly as stored (no transcoding): each file's own transfer
syntax is proposed. More than 128 (SOP class, transfer syntax) pairs are
split over several associations. Exit code 0 when every instance got a
success or warning status, 1 when some failed (listed in the summary), 2 when
nothing could be sent (bad arguments, peer unreachable or rejecting).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.errors import DicomNodeError

MAX_CONTEXTS = 128


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass
class SendResult:
    sent: int = 0
    warnings: int = 0
    failed: list[tuple[Path, str, str]] = field(default_factory=list)  # (path, uid, reason)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # not DICOM


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
    from pydicom.filereader import read_file_meta_info

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


def _batches(files: list[_File]) -> list[list[_File]]:
    """Split into groups needing at most 128 presentation contexts each."""
    out: list[list[_File]] = []
    cur: list[_File] = []
    pairs: set[tuple[str, str]] = set()
    for f in files:
        pair = (f.sop_class_uid, f.transfer_syntax_uid)
        if pair not in pairs and len(pairs) >= MAX_CONTEXTS:
            out.append(cur)
            cur, pairs = [], set()
        pairs.add(pair)
        cur.append(f)
    if cur:
        out.append(cur)
    return out


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
               *, max_pdu: int = 0, timeout: float = 60.0, progress: bool = False) -> SendResult:
    """C-STORE every file; association failures mark the rest of a batch failed."""

    from pynetdicom import _config as pynetdicom_config

    result = SendResult()
    bar = _Progress(len(files), progress)
    # Send each file's encoded dataset as stored: no decode, no re-encode.
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for batch in _batches(files):
            _send_batch(batch, result, bar, host, port, called_aet, calling_aet, max_pdu,
                        timeout)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
    bar.close()
    return result


def _send_batch(batch: list[_File], result: SendResult, bar: _Progress, host: str, port: int,
                called_aet: str, calling_aet: str, max_pdu: int, timeout: float) -> None:
    from pynetdicom import AE

    from dicomnode.dispatch import guard_reactor_race

    ae = AE(ae_title=calling_aet)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    pairs: dict[str, list[str]] = {}
    for f in batch:
        tss = pairs.setdefault(f.sop_class_uid, [])
        if f.transfer_syntax_uid not in tss:
            tss.append(f.transfer_syntax_uid)
    for sop_class, tss in pairs.items():
        for ts in tss:  # one context per pair: the peer accepts or rejects each exactly
            ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else \
              "association aborted" if assoc.is_aborted else "peer unreachable"
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            prim = assoc.acceptor.primitive
            why += f" (result {prim.result}, source {prim.result_source}, " \
                   f"reason {prim.diagnostic})"
        for f in batch:
            result.failed.append((f.path, f.sop_instance_uid, why))
            bar.step(False)
        return
    # pynetdicom's reactor can take a fast peer's C-STORE-RSP (see its docstring).
    guard_reactor_race(assoc)
    try:
        assoc.dul.socket.socket.setsockopt(  # type: ignore[union-attr]
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass
    try:
        for f in batch:
            if not assoc.is_established:
                result.failed.append((f.path, f.sop_instance_uid,
                                      "association lost"))
                bar.step(False)
                continue
            try:
                status = assoc.send_c_store(f.path)
            except Exception as exc:  # noqa: BLE001 - report per file, keep going
                result.failed.append((f.path, f.sop_instance_uid,
                                      f"{type(exc).__name__}: {exc}"))
                bar.step(False)
                continue
            code = getattr(status, "Status", None)
            if code is None:
                result.failed.append((f.path, f.sop_instance_uid,
                                      "no response (timeout or abort)"))
                bar.step(False)
            elif code == 0x0000:
                result.sent += 1
                bar.step(True)
            elif code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
                result.sent += 1
                result.warnings += 1
                bar.step(True)
            else:
                comment = getattr(status, "ErrorComment", "") or ""
                result.failed.append((f.path, f.sop_instance_uid,
                                      f"status 0x{code:04X} {comment}".strip()))
                bar.step(False)
    finally:
        if assoc.is_established:
            assoc.release()


def _run(args: argparse.Namespace) -> int:
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
