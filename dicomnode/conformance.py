"""The generated parts of the DICOM Conformance Statement (docs/conformance.md).

The tables of SOP classes, transfer syntaxes and association defaults are
built from what the code negotiates: the SCP's AE exactly as
:meth:`dicomnode.receive.scp.StorageSCP._build_ae` configures it, the C-STORE
SCU's fallback syntaxes (:mod:`dicomnode.dispatch.scu`) and the SOP classes of
the objects the encoders create. They replace the text between the
``<!-- BEGIN GENERATED -->`` / ``<!-- END GENERATED -->`` markers::

    python -m dicomnode.conformance            # rewrite docs/conformance.md
    python -m dicomnode.conformance --check    # exit 1 when it is stale

tests/unit/test_conformance_doc.py fails when the document and the code differ.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE

from dicomnode.codec.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.config import Settings
from dicomnode.dispatch import scu
from dicomnode.encode.seg import SEG_SOP_CLASS
from dicomnode.receive.scp import StorageSCP

BEGIN = "<!-- BEGIN GENERATED: python -m dicomnode.conformance -->"
END = "<!-- END GENERATED -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"

#: SOP classes of the objects the node creates (dicomnode.encode).
CREATED = (
    (UID(SEG_SOP_CLASS), "DICOM SEG, one segment per model label (encode/seg.py)"),
    (UID("1.2.840.10008.5.1.4.1.1.88.34"),
     "TID 1500 Measurement Report, Comprehensive 3D SR (encode/sr.py)"),
    (UID("1.2.840.10008.5.1.4.1.1.7"), "burned-in overlay images (encode/sc.py)"),
)


def build_scp_ae(settings: Settings | None = None) -> AE:
    """The SCP's AE, built by the SCP's own code (no socket opened, no store)."""
    holder = types.SimpleNamespace(settings=settings or Settings())
    # _build_ae only reads self.settings: the AE is the one `serve` listens with.
    return StorageSCP._build_ae(holder)  # type: ignore[arg-type]


def scp_contexts(settings: Settings | None = None) -> list[tuple[UID, tuple[UID, ...]]]:
    """(abstract syntax, transfer syntaxes) of every context the SCP accepts, in order."""
    ae = build_scp_ae(settings)
    return [(UID(str(cx.abstract_syntax)), tuple(UID(str(t)) for t in cx.transfer_syntax))
            for cx in ae.supported_contexts]


def _name(uid: UID) -> str:
    return uid.name if uid.name != uid else "(private or retired)"


def generated(settings: Settings | None = None) -> str:
    """The Markdown between the markers."""
    settings = settings or Settings()
    ae = build_scp_ae(settings)
    contexts = scp_contexts(settings)
    syntaxes = sorted({t for _, ts in contexts for t in ts}, key=str)
    same = all(set(ts) == set(syntaxes) for _, ts in contexts)
    n = settings.node
    out: list[str] = [BEGIN, ""]
    out += ["### Association defaults (node.* settings)", "",
            "| parameter | default | setting |", "|---|---|---|",
            f"| AE title | `{n.ae_title}` | `node.ae_title` |",
            f"| port | {n.port} | `node.port` |",
            f"| calling AE allow list | {'any' if not n.allowed_calling_aets else ', '.join(n.allowed_calling_aets)} | `node.allowed_calling_aets` |",  # noqa: E501
            f"| maximum simultaneous associations | {n.max_associations} | `node.max_associations` |",  # noqa: E501
            f"| maximum PDU size received | {n.max_pdu or 'unlimited'} | `node.max_pdu` |",
            f"| ACSE timeout (s) | {n.acse_timeout:g} | `node.acse_timeout` |",
            f"| DIMSE timeout (s) | {n.dimse_timeout:g} | `node.dimse_timeout` |",
            f"| network timeout (s) | {n.network_timeout:g} | `node.network_timeout` |",
            f"| Implementation Class UID / Version Name (associations, pynetdicom) | "
            f"`{ae.implementation_class_uid}` / `{ae.implementation_version_name}` | - |",
            f"| Implementation Class UID / Version Name (file meta of files the node writes) | "
            f"`{IMPLEMENTATION_CLASS_UID}` / `{IMPLEMENTATION_VERSION_NAME}` | - |", ""]
    out += [f"### SOP classes accepted as SCP ({len(contexts)})", "",
            "| SOP class | UID |", "|---|---|"]
    out += [f"| {_name(a)} | `{a}` |" for a, _ in contexts]
    out += ["", f"### Transfer syntaxes accepted as SCP ({len(syntaxes)})", "",
            ("Every SOP class above is accepted with each of these transfer syntaxes "
             "(SCP role only; the node does not ask for SCU/SCP role selection)."
             if same else "Transfer syntaxes differ per SOP class (see the code)."), "",
            "| transfer syntax | UID |", "|---|---|"]
    out += [f"| {_name(t)} | `{t}` |" for t in syntaxes]
    out += ["", "### Transfer syntaxes proposed as C-STORE SCU", "",
            "For each SOP class of a batch: every transfer syntax its files are stored in "
            "(the file is sent as stored, never transcoded), plus these fallbacks when a "
            "file of that class is stored uncompressed little endian:", "",
            "| transfer syntax | UID |", "|---|---|"]
    out += [f"| {_name(t)} | `{t}` |" for t in scu._FALLBACK_SYNTAXES]
    out += ["", "### SOP classes of the objects the node creates (sent as SCU)", "",
            "| SOP class | UID | what |", "|---|---|---|"]
    out += [f"| {_name(u)} | `{u}` | {what} |" for u, what in CREATED]
    out += ["", END]
    return "\n".join(out)


def render(text: str, settings: Settings | None = None) -> str:
    """``text`` with the generated block replaced (markers must be present once)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the document must hold the markers {BEGIN!r} ... {END!r} once")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + generated(settings) + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dicomnode.conformance",
                                description="Regenerate the tables of docs/conformance.md.")
    p.add_argument("--doc", type=Path, default=DOC, help="the document (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="do not write; exit 1 when the document is stale")
    args = p.parse_args(argv)
    try:
        text = args.doc.read_text(encoding="utf-8")
        new = render(text, Settings())
    except (OSError, ValueError) as exc:
        print(f"error: {args.doc}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.doc} is stale: run python -m dicomnode.conformance", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.doc.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
