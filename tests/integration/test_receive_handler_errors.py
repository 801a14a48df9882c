"""An unexpected exception inside the C-STORE handler becomes a failure status; the SCP
keeps serving. Runs the SCP in-process (real sockets, real pynetdicom SCU) with a store
that fails on one instance: the failure cannot be provoked from outside a real node."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydicom.filereader import read_file_meta_info

from dicomnode.errors import StoreError
from dicomnode.receive.scp import INTERNAL_ERROR, STORE_FAILED, StorageSCP
from dicomnode.store import Store
from tests.support.peers import free_port
from tests.support.receive_db import settings_for
from tests.support.receive_node import echo, make_instance, store_files


class FailingStore(Store):
    """A real store that raises for chosen SOP Instance UIDs."""

    boom: set[str] = set()
    locked: set[str] = set()

    def ingest(self, meta: Any, data: Any) -> Any:
        if meta.sop_instance_uid in self.boom:
            raise RuntimeError("simulated bug")
        if meta.sop_instance_uid in self.locked:
            raise StoreError("database is locked")
        return super().ingest(meta, data)


def test_handler_exception_is_a_status_not_a_crash(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}",
                            node={"port": free_port()})
    store = FailingStore.open(settings, migrate=True)
    scp = StorageSCP(settings, store)
    scp.start()
    try:
        bug = make_instance(tmp_path / "bug.dcm")
        locked = make_instance(tmp_path / "locked.dcm")
        ok = make_instance(tmp_path / "ok.dcm")
        FailingStore.boom = {str(read_file_meta_info(bug).MediaStorageSOPInstanceUID)}
        FailingStore.locked = {str(read_file_meta_info(locked).MediaStorageSOPInstanceUID)}
        with caplog.at_level(logging.WARNING, logger="dicomnode.receive.scp"):
            res = store_files(settings.node.port, [bug, locked, ok], calling_aet="BUGGY")
        assert [s for _, s in res] == [INTERNAL_ERROR, STORE_FAILED, 0x0000]
        failure = next(r for r in caplog.records if r.getMessage() == "C-STORE handler failed")
        assert failure.fields["calling_aet"] == "BUGGY"  # type: ignore[attr-defined]
        assert "simulated bug" in failure.fields["error"]  # type: ignore[attr-defined]
        assert echo(settings.node.port) == 0x0000
    finally:
        scp.stop(1)
        store.close()
