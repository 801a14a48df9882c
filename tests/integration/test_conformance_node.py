"""The conformance statement against a running node: a real ``dicomnode serve`` on a
127.0.0.1 socket accepts every SOP class and transfer syntax docs/conformance.md lists
as SCP, and refuses what the statement says it does not support."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE, build_context

from dicomnode import conformance
from tests.support.receive_node import NodeProcess, start_node

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # not supported (section 1)
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"  # not supported (section 1)


def _table(heading: str) -> list[str]:
    block = DOC.read_text(encoding="utf-8").split(conformance.BEGIN, 1)[1]
    (body,) = [p for p in re.split(r"^### ", block, flags=re.M) if p.startswith(heading)]
    return re.findall(r"^\|[^|]*\| `([0-9.]+)` \|", body, flags=re.M)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = start_node(tmp_path_factory.mktemp("conformance-node"))
    yield n
    assert n.stop() == 0, n.log()[-2000:]


def _negotiate(port: int, contexts: list) -> dict[int, tuple[str, str | None]]:  # type: ignore[type-arg]
    """context id -> (abstract syntax, accepted transfer syntax or None)."""
    ae = AE(ae_title="CONFTEST")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", contexts=contexts)
    assert assoc.is_established
    try:
        out: dict[int, tuple[str, str | None]] = {}
        accepted = {cx.context_id: str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        for cx in assoc.accepted_contexts + assoc.rejected_contexts:
            out[int(cx.context_id)] = (str(cx.abstract_syntax), accepted.get(cx.context_id))
        return out
    finally:
        assoc.release()


def test_every_documented_sop_class_is_accepted(node: NodeProcess) -> None:
    classes = _table("SOP classes accepted as SCP")
    assert len(classes) > 100
    syntaxes = _table("Transfer syntaxes accepted as SCP")
    for start in range(0, len(classes), 128):
        chunk = classes[start:start + 128]
        result = _negotiate(node.port, [build_context(c, syntaxes) for c in chunk])
        refused = [a for a, ts in result.values() if ts is None]
        assert refused == [], refused
        assert sorted(a for a, _ in result.values()) == sorted(chunk)


def test_every_documented_transfer_syntax_is_accepted(node: NodeProcess) -> None:
    syntaxes = _table("Transfer syntaxes accepted as SCP")
    result = _negotiate(node.port, [build_context(CTImageStorage, [ts]) for ts in syntaxes])
    assert sorted(ts for _, ts in result.values() if ts) == sorted(syntaxes)


def test_what_the_statement_excludes_is_refused(node: NodeProcess) -> None:
    documented = set(_table("SOP classes accepted as SCP"))
    assert STORAGE_COMMITMENT_PUSH not in documented
    assert MODALITY_WORKLIST_FIND not in documented
    result = _negotiate(node.port, [
        build_context(STORAGE_COMMITMENT_PUSH), build_context(MODALITY_WORKLIST_FIND),
        build_context(CTImageStorage), build_context(CTImageStorage, ["1.2.3.4.5.6"])])
    by_class = {}
    for a, ts in result.values():
        by_class.setdefault(a, []).append(ts)
    assert by_class[STORAGE_COMMITMENT_PUSH] == [None]
    assert by_class[MODALITY_WORKLIST_FIND] == [None]
    # Default context (implicit VR LE) accepted, an unknown transfer syntax refused.
    assert sorted(by_class[str(CTImageStorage)], key=str) == sorted(
        ["1.2.840.10008.1.2", None], key=str)
