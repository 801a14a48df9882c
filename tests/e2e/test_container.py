"""The container image: built by docker/build.sh with podman, run with --network host.

Cold (no cached base or wheelhouse) the build takes about 3.5 minutes
(debootstrap plus pip wheel); warm it reuses the cached base, wheelhouse and
image layers. The ``container_node`` fixture yields a running node on its
default configuration; ``test_orthanc_round_trip_through_the_container`` runs
the containerised node with Orthanc as its PACS.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from tests.support.dispatch_container import (
    IMAGE,
    ROOT,
    ContainerNode,
    build_image,
    c_echo,
    node_container,
    podman,
    podman_available,
)
from tests.support.infer_data import cranium_ct_series
from tests.support.peers import dciodvfy, dcmtk, free_port, orthanc_running
from tests.support.pipeline_env import orthanc_by_modality, orthanc_instance_file
from tests.support.pipeline_node import orthanc_send_study, wait_until

pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.fixture(scope="session")
def image() -> str:
    reason = podman_available()
    if reason:
        pytest.skip(reason)
    seconds = build_image(IMAGE)
    print(f"\nimage {IMAGE} built in {seconds:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def container_node(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerNode]:
    with node_container(tmp_path_factory.mktemp("node-data"), image) as node:
        yield node


def test_c_echo_from_pynetdicom_and_dcmtk(container_node: ContainerNode) -> None:
    assert c_echo(container_node.port) == 0
    proc = dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", container_node.ae_title,
                 "127.0.0.1", str(container_node.port), timeout=60)
    assert proc.returncode == 0, proc.stderr
    # A wrong called AE title is refused by the containerised node too.
    assert c_echo(container_node.port, called_aet="NOT_THE_NODE") is None


def test_healthcheck_is_a_c_echo(container_node: ContainerNode) -> None:
    inspect = podman("inspect", "-f", "{{json .Config.Healthcheck}}", container_node.name)
    assert "healthcheck.py" in inspect.stdout
    hc = podman("healthcheck", "run", container_node.name, check=False, timeout=60)
    assert hc.returncode == 0, hc.stdout + hc.stderr
    # Run the same check by hand to see what it says.
    out = container_node.exec("/opt/dicomnode/bin/python",
                              "/usr/local/lib/dicomnode/healthcheck.py")
    assert out.returncode == 0 and "healthy: C-ECHO to DICOMNODE@127.0.0.1" in out.stdout


def test_non_root_cpu_only_with_models(container_node: ContainerNode) -> None:
    assert container_node.exec("id", "-u").stdout.strip() == "10001"
    probe = container_node.exec("/opt/dicomnode/bin/python", "-c", (
        "import importlib.util, onnxruntime;"
        "print(importlib.util.find_spec('torch') is None);"
        "print(onnxruntime.get_available_providers())"))
    assert probe.returncode == 0, probe.stderr
    no_torch, providers = probe.stdout.split("\n")[:2]
    assert no_torch == "True"
    assert "CPUExecutionProvider" in providers
    assert not any(gpu in providers for gpu in ("CUDA", "TensorRT", "ROCM", "MIGraphX"))
    pkgs = container_node.exec("/opt/dicomnode/bin/pip", "list", "--format=freeze").stdout.lower()
    assert "nvidia" not in pkgs and "cuda" not in pkgs and "torch" not in pkgs
    shipped = sorted(p.name for p in (ROOT / "models").iterdir()) if (ROOT / "models").is_dir() \
        else []
    listing = container_node.exec("ls", "-1", "/app/models").stdout.split()
    assert sorted(listing) == shipped


def test_received_instance_lands_in_the_volume(container_node: ContainerNode,
                                               tmp_path: Path) -> None:
    src = Path(shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm"))
    uid = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
    proc = dcmtk("storescu", "-aet", "MODALITY", "-aec", container_node.ae_title,
                 "127.0.0.1", str(container_node.port), str(src), timeout=60)
    assert proc.returncode == 0, proc.stderr
    stored = [p for p in (container_node.data_dir / "storage").rglob("*") if p.is_file()
              and p.suffix not in (".tmp",)]
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in stored}
    assert uid in uids
    assert (container_node.data_dir / "dicomnode.db").is_file()


def test_orthanc_round_trip_through_the_container(image: str, tmp_path: Path) -> None:
    """Orthanc sends a CT study to the containerised node; SEG + SR come back into the
    same study and pass dciodvfy (the same round trip as the plain node's)."""
    fx = cranium_ct_series(k_range=(40, 52))
    with orthanc_running(workdir=tmp_path / "pacs") as pacs:
        for p in fx.paths:
            pacs.upload(p)
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump({
            "node": {"ae_title": "DICOMNODE", "allowed_calling_aets": [pacs.aet]},
            "storage": {"path": "/data/storage", "min_free_mb": 64},
            "database": {"url": "sqlite:////data/dicomnode.db"},
            "models": {"path": "/app/models"},
            "completion": {"series_quiet_seconds": 2, "check_interval_seconds": 0.2},
            "worker": {"processes": 1, "poll_seconds": 0.2, "backoff_base_seconds": 1,
                       "backoff_max_seconds": 2},
            "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                              "port": pacs.dicom_port}],
            "routes": [{"name": "ct", "when": {"Modality": "CT", "calling_aet": pacs.aet},
                        "models": ["ct-tissue"], "send": ["pacs"]}],
        }))
        config.chmod(0o644)
        with node_container(tmp_path / "data", image, config=config,
                            echo_aet=pacs.aet) as node:
            # The health check calls as the first allowed AE title here.
            hc = podman("healthcheck", "run", node.name, check=False, timeout=60)
            assert hc.returncode == 0, hc.stdout + hc.stderr
            pacs.add_modality("dicomnode", node.ae_title, node.port)
            orthanc_send_study(pacs, fx.study_uid)

            def results() -> dict[str, list[dict[str, object]]] | None:
                held = orthanc_by_modality(pacs, fx.study_uid)
                return held if {"SEG", "SR"} <= set(held) else None

            held = wait_until(results, 240, "SEG and SR from the container in Orthanc",
                              on_timeout=lambda: node.logs()[-4000:])
            assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
            assert len(held["CT"][0]["Instances"]) == len(fx.paths)
            for kind in ("SEG", "SR"):
                (series,) = held[kind]
                (instance,) = series["Instances"]
                path = orthanc_instance_file(pacs, instance, tmp_path / f"{kind}.dcm")
                res = dciodvfy(path)
                assert not res.errors, res.output
                assert pydicom.dcmread(path).StudyInstanceUID == fx.study_uid


def test_compose_configuration_both_ways(image: str, tmp_path: Path) -> None:
    """docker/compose.yaml's pieces, minus compose: Orthanc runs docker/orthanc.json with
    docker/orthanc-autoroute.lua, the container runs docker/compose.node.yaml. Only
    what compose's network provides is rewritten (service host names -> 127.0.0.1,
    ports -> free ones, Orthanc's storage and REST access for the test, a shorter
    StableAge and quiet window). A series uploaded to Orthanc reaches the node by
    the Lua autoroute, the SEG + SR come back, and are not routed back again."""
    docker = ROOT / "docker"
    orthanc_cfg = json.loads((docker / "orthanc.json").read_text())
    for key in ("DicomPort", "HttpPort", "StorageDirectory", "IndexDirectory",
                "RemoteAccessAllowed", "AuthenticationEnabled", "RegisteredUsers",
                "DicomModalities"):
        orthanc_cfg.pop(key)
    orthanc_cfg["LuaScripts"] = [str(docker / "orthanc-autoroute.lua")]
    orthanc_cfg["StableAge"] = 2
    node_cfg = yaml.safe_load((docker / "compose.node.yaml").read_text())
    fx = cranium_ct_series(k_range=(60, 70))
    with orthanc_running(workdir=tmp_path / "pacs", aet=orthanc_cfg.pop("DicomAet"),
                         extra=orthanc_cfg) as pacs:
        (pacs_dest,) = node_cfg["destinations"]
        assert pacs_dest["host"] == "orthanc"
        pacs_dest.update(host="127.0.0.1", port=pacs.dicom_port)
        node_cfg["completion"] = {"series_quiet_seconds": 2, "check_interval_seconds": 0.2}
        # compose's network is this host's here (--network host): loopback, a free port.
        node_cfg["http"].update(host="127.0.0.1", port=free_port())
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump(node_cfg))
        config.chmod(0o644)
        with node_container(tmp_path / "data", image, config=config,
                            echo_aet=pacs.aet) as node:
            pacs.add_modality("dicomnode", node.ae_title, node.port)
            for p in fx.paths:  # as if a scanner had sent them
                pacs.upload(p)

            def results() -> dict[str, list[dict[str, object]]] | None:
                held = orthanc_by_modality(pacs, fx.study_uid)
                return held if {"SEG", "SR"} <= set(held) else None

            held = wait_until(results, 240, "SEG and SR routed back to Orthanc",
                              on_timeout=lambda: node.logs()[-4000:])
            time.sleep(4)  # past StableAge: the results' series must not be sent back
            log = (tmp_path / "pacs" / "orthanc.log").read_text()
            assert log.count("autoroute: sending") == 1, log[-3000:]
            assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
            jobs = node.exec("/opt/dicomnode/bin/dicomnode", "jobs", "list", "--json")
            assert jobs.returncode == 0, jobs.stderr
            assert len(json.loads(jobs.stdout)) == 1
