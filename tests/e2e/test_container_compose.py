"""The compose setup's pieces agree with each other, and Orthanc's autoroute script works.

No Docker engine runs here, so compose itself is not started; instead the
files it mounts are checked for consistency, the node configuration is loaded
and its routes validated exactly as the node does, and the Orthanc Lua
autorouting script is run in a real (Debian) Orthanc.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml

from dicomnode.config import DestinationConfig, load_settings
from dicomnode.dispatch import store_files
from dicomnode.routing import RoutingTable
from tests.support.dispatch_peers import ScriptedSCP
from tests.support.peers import orthanc_running
from tests.support.series import write_series

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SHIPPED_MODELS = {"deepbet-brain", "ct-tissue"}


def _lua_global(name: str) -> str:
    m = re.search(rf"^{name} = '([^']*)'", (DOCKER / "orthanc-autoroute.lua").read_text(), re.M)
    assert m, name
    return m.group(1)


def test_compose_files_agree() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    orthanc_cfg = json.loads((DOCKER / "orthanc.json").read_text())
    settings = load_settings(DOCKER / "compose.node.yaml", environ={})
    services = compose["services"]
    assert set(services) == {"orthanc", "dicomnode", "prometheus", "grafana"}
    # node -> Orthanc
    pacs = settings.destination("pacs")
    assert (pacs.ae_title, pacs.host, pacs.port) == (orthanc_cfg["DicomAet"], "orthanc",
                                                     orthanc_cfg["DicomPort"])
    # Orthanc -> node
    node_modality = orthanc_cfg["DicomModalities"][_lua_global("NODE_MODALITY")]
    assert (node_modality["AET"], node_modality["Host"], node_modality["Port"]) == (
        settings.node.ae_title, "dicomnode", settings.node.port)
    assert _lua_global("NODE_AET") == settings.node.ae_title
    assert settings.node.allowed_calling_aets == (orthanc_cfg["DicomAet"],)
    # mounts point at files that exist, where the images expect them
    mounts = services["dicomnode"]["volumes"] + services["orthanc"]["volumes"]
    for m in mounts:
        src = m.split(":")[0]
        if src.startswith("./"):
            assert (DOCKER / src).is_file(), src
    assert "./compose.node.yaml:/etc/dicomnode/node.yaml:ro" in services["dicomnode"]["volumes"]
    assert orthanc_cfg["LuaScripts"] == ["/etc/orthanc/autoroute.lua"]
    assert services["dicomnode"]["build"]["context"] == ".build"
    # the routes are valid for the models the image ships
    table = RoutingTable.from_settings(settings, SHIPPED_MODELS)
    assert [r.name for r in table.rules] == ["mr-brain-t1", "ct"]


def test_image_config_loads() -> None:
    s = load_settings(DOCKER / "node.yaml", environ={})
    assert s.node.host == "0.0.0.0" and str(s.storage.path) == "/data/storage"
    assert s.database.url == "sqlite:////data/dicomnode.db"


def _wait(cond, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_orthanc_autoroute_forwards_images_but_not_node_results(tmp_path: Path) -> None:
    arr = np.random.default_rng(3).integers(-500, 500, size=(4, 16, 16)).astype(np.float32)
    scan = write_series(arr, tmp_path / "scan", modality="CT")
    from_node = write_series(arr, tmp_path / "node", modality="CT", series_number=900)
    node = ScriptedSCP(ae_title=_lua_global("NODE_AET"))
    with node.running(), orthanc_running(
        workdir=tmp_path / "orthanc",
        modalities={_lua_global("NODE_MODALITY"): (node.ae_title, "127.0.0.1", node.port)},
        extra={"LuaScripts": [str(DOCKER / "orthanc-autoroute.lua")], "StableAge": 1},
    ) as orthanc:
        # A scanner's series (uploaded over REST here) reaches the node once stable.
        for p in scan:
            orthanc.upload(p)
        assert _wait(lambda: len(node.received) == 4), orthanc.workdir / "orthanc.log"
        expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in scan}
        assert {r.sop_instance_uid for r in node.received} == expected
        # A series the node itself stored in Orthanc is not sent back.
        dest = DestinationConfig(name="pacs", ae_title=orthanc.aet, host="127.0.0.1",
                                 port=orthanc.dicom_port)
        assert store_files(dest, from_node, calling_ae_title=node.ae_title).ok
        series_uid = pydicom.dcmread(from_node[0], stop_before_pixels=True).SeriesInstanceUID
        found = orthanc.post("/tools/lookup", series_uid.encode())
        series_id = found[0]["ID"]
        assert _wait(lambda: orthanc.get(f"/series/{series_id}")["IsStable"])
        time.sleep(2.0)  # give the Lua callback time to (wrongly) forward it
        assert len(node.received) == 4
    log = (tmp_path / "orthanc" / "orthanc.log").read_text()
    assert log.count("autoroute: sending CT series") == 1
