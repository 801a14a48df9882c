"""docs/conformance.md states what the code negotiates.

The SOP class and transfer syntax tables of the conformance statement are parsed
back and compared with the presentation contexts of the SCP's AE (built by
``StorageSCP._build_ae``, the code ``serve`` listens with) and with the C-STORE
SCU's fallback syntaxes; the generated block must equal a fresh generation.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless

from dicomnode import conformance
from dicomnode.config import Settings
from dicomnode.dispatch import scu
from dicomnode.receive.scp import StorageSCP

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def _section(text: str, heading: str) -> list[str]:
    """UIDs in the first column-with-backticks of the table under ``### heading``."""
    block = text.split(conformance.BEGIN, 1)[1].split(conformance.END, 1)[0]
    parts = re.split(r"^### ", block, flags=re.M)
    (body,) = [p for p in parts if p.startswith(heading)]
    return re.findall(r"^\|[^|]*\| `([0-9.]+)` \|", body, flags=re.M)


def _scp_ae():  # type: ignore[no-untyped-def]
    return StorageSCP._build_ae(types.SimpleNamespace(settings=Settings()))  # type: ignore[arg-type]


def test_scp_sop_classes_in_the_doc_are_exactly_what_the_scp_accepts() -> None:
    text = DOC.read_text(encoding="utf-8")
    documented = _section(text, "SOP classes accepted as SCP")
    negotiated = [str(cx.abstract_syntax) for cx in _scp_ae().supported_contexts]
    assert len(documented) == len(set(documented))
    assert set(documented) == set(negotiated), (
        "docs/conformance.md is stale: run python -m dicomnode.conformance\n"
        f"missing: {sorted(set(negotiated) - set(documented))}\n"
        f"extra: {sorted(set(documented) - set(negotiated))}")
    assert "1.2.840.10008.1.1" in documented and str(CTImageStorage) in documented


def test_scp_transfer_syntaxes_in_the_doc_are_exactly_what_the_scp_accepts() -> None:
    text = DOC.read_text(encoding="utf-8")
    documented = set(_section(text, "Transfer syntaxes accepted as SCP"))
    contexts = _scp_ae().supported_contexts
    # The doc says every SOP class takes every syntax listed: check that too.
    for cx in contexts:
        assert set(map(str, cx.transfer_syntax)) == documented, cx.abstract_syntax
    assert str(JPEG2000Lossless) in documented


def test_scu_fallback_syntaxes_in_the_doc_are_what_the_scu_proposes() -> None:
    text = DOC.read_text(encoding="utf-8")
    documented = _section(text, "Transfer syntaxes proposed as C-STORE SCU")
    assert documented == [str(t) for t in scu._FALLBACK_SYNTAXES]
    assert documented[0] == str(ExplicitVRLittleEndian)
    # What the SCU plans for an uncompressed CT file: its syntax plus the documented fallbacks.
    item = scu._Item(0, Path("x.dcm"), CTImageStorage, "1.2.3", ExplicitVRLittleEndian)
    planned = scu._contexts_for([item])[CTImageStorage]
    assert set(map(str, planned)) == set(documented)


def test_created_sop_classes_are_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    documented = _section(text, "SOP classes of the objects the node creates")
    assert documented == ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34",
                          "1.2.840.10008.5.1.4.1.1.7"]


def test_generated_block_is_current() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert conformance.render(text) == text, \
        "docs/conformance.md is stale: run python -m dicomnode.conformance"


def test_check_mode_reports_a_stale_doc_and_rewrite_fixes_it(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             ) -> None:
    stale = tmp_path / "conformance.md"
    text = DOC.read_text(encoding="utf-8")
    stale.write_text(text.replace("| `1.2.840.10008.5.1.4.1.1.2` |", "| `1.2.3` |"),
                     encoding="utf-8")
    assert conformance.main(["--doc", str(stale), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert conformance.main(["--doc", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == text


def test_a_doc_without_markers_is_an_error_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.md"
    bad.write_text("# no markers\n", encoding="utf-8")
    assert conformance.main(["--doc", str(bad), "--check"]) == 2
    assert "markers" in capsys.readouterr().err
    assert conformance.main(["--doc", str(tmp_path / "missing.md")]) == 2
