"""The Grafana dashboard and the Prometheus alerts name only metrics the node exports.

Every PromQL expression of docker/grafana/provisioning/dashboards/dicomnode.json
and docker/prometheus-alerts.yml is reduced to the metric names it selects;
a real node (receivers, a worker running ``ct-tissue``, the dispatcher) receives
a CT series from DCMTK ``storescu``, delivers its SEG + SR to a real Orthanc,
notifies a real MLLP listener and retries a webhook nobody answers; one
association is rejected. ``/metrics`` is then scraped over HTTP and parsed with
``prometheus_client.parser``: a name the dashboard uses that the node does not
export fails the test, and so does a metric family the node exports that no
panel shows. The compose wiring (Prometheus target, Grafana datasource uid,
mounted files) is checked against the files it points at.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.config import load_settings
from tests.support.infer_data import cranium_ct_series
from tests.support.notify_peers import mllp_server
from tests.support.peers import dcmtk, free_port, orthanc_running
from tests.support.pipeline_node import job_for, start_pipeline_node, wait_until
from tests.support.receive_node import REPO, try_associate

DOCKER = REPO / "docker"
PROVISIONING = DOCKER / "grafana" / "provisioning"
DASHBOARD = PROVISIONING / "dashboards" / "dicomnode.json"
ALERTS = DOCKER / "prometheus-alerts.yml"
# Series Prometheus makes itself for every target (not on the node's /metrics).
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_FUNCTIONS_AND_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (vector selectors)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)            # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)           # range / subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+\w+", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word, rest = m.group(0), s[m.end():]
        if rest.lstrip().startswith("("):       # a function or an aggregation
            continue
        if word.lower() in _FUNCTIONS_AND_KEYWORDS:
            continue
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue                            # 1e3, 0.5 and the like
        names.add(word)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], str(r["expr"])) for g in rules["groups"] for r in g["rules"]]


def test_metric_names_of_promql() -> None:
    assert metric_names('sum by (le, model) (rate(a_bucket{state="done"}[30m]))') == {"a_bucket"}
    assert metric_names("min(x) < 2 * max(y_total offset 5m)") == {"x", "y_total"}
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(h_bucket[5m])))') == {
        "h_bucket"}
    assert metric_names('up{job="dicomnode"} == 0') == {"up"}
    assert metric_names('sum(rate(s_total{a!="by (x)"}[1h])) * 60 + 1e3') == {"s_total"}


def test_dashboard_is_wired_to_the_provisioned_datasource() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid and metric_names(t["expr"]), p["title"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "dicomnode.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/provisioning/dashboards"


def test_compose_runs_prometheus_and_grafana_on_the_node() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    settings = load_settings(DOCKER / "compose.node.yaml", environ={})
    # The node listens on the container's interface and serves /metrics to Prometheus.
    assert settings.http.enabled and settings.http.public and settings.http.host == "0.0.0.0"
    assert settings.http.token == ""  # a token belongs in the environment, not in git
    assert f"127.0.0.1:{settings.http.port}:{settings.http.port}" in services["dicomnode"]["ports"]
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "dicomnode")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"dicomnode:{settings.http.port}"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert mounts[prom["rule_files"][0]] == "./prometheus-alerts.yml"
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    for svc in services.values():
        for m in svc.get("volumes", []):
            if m.startswith("./"):
                assert (DOCKER / m.split(":")[0]).exists(), m
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def scrape(port: int) -> dict[str, set[str]]:
    """family name -> the sample names /metrics has for it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",  # noqa: S310
                                timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, set()).update(s.name for s in family.samples)
    return out


@pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(), reason="Orthanc not installed")
def test_every_metric_the_dashboard_names_is_exported(tmp_path: Path) -> None:
    fx = cranium_ct_series(tmp_path / "ct", k_range=(30, 42))
    http_port = free_port()
    rule: dict[str, Any] = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
                            "send": ["pacs"], "notify": ["ris", "gone"]}
    with orthanc_running(workdir=tmp_path / "pacs") as pacs, \
            mllp_server("AA") as (hl7_port, _messages):
        node = start_pipeline_node(
            tmp_path / "node", orthanc=pacs, routes=[rule],
            http={"enabled": True, "port": http_port},
            notifications=[
                {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": hl7_port},
                # Nothing listens: retried, then failed (a retry and a failure counted).
                {"name": "gone", "kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/",
                 "retry_deadline_seconds": 3, "timeout_seconds": 2}])
        try:
            assert not try_associate(node.port, "NOT-THE-NODE", "MODALITY").established
            r = dcmtk("storescu", "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1",
                      str(node.port), *map(str, fx.paths))
            assert r.returncode == 0, r.stderr

            def finished() -> bool:
                job = job_for(node.jobs(), fx.series_uid)
                if job is None or job["state"] != "done":
                    return False
                mine = [d for d in node.deliveries() if d["job_id"] == job["id"]]
                return len(mine) == 4 and all(d["state"] in ("done", "failed") for d in mine)
            wait_until(finished, 180, "the job done and its deliveries ended",
                       on_timeout=lambda: node.log()[-4000:])
            exported = scrape(http_port)
        finally:
            node.stop()

    samples = set().union(*exported.values())
    used = {(where, name) for where, expr in dashboard_exprs() + alert_exprs()
            for name in metric_names(expr)}
    missing = sorted(f"{name} (in {where!r})" for where, name in used
                     if name not in samples and name not in PROMETHEUS_OWN)
    assert not missing, "named but not exported by the node: " + ", ".join(missing)
    # And the other way: every family the node exports has a panel.
    on_dashboard = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    unshown = sorted(f for f, names in exported.items()
                     if f.startswith("dicomnode_") and not names & on_dashboard)
    assert not unshown, "exported but on no panel: " + ", ".join(unshown)


# The fixed parts of the messages docs/operations.md "Troubleshooting" quotes
# (harvested from real runs: DCMTK senders, a PACS without SEG, an HL7 listener
# answering AE / AR, a full disk, a corrupted weights file). A message reworded in
# the code must be reworded in the docs too.
QUOTED = (
    "rejecting association: called AE title is not ours",
    "rejecting association: calling AE title not allowed",
    "rejecting association: node.max_associations reached (transient)",
    "accepted no presentation context for",
    "nor little endian fallbacks",
    "delivery failed",
    "notification failed",
    "refusing instance: disk space below minimum",
    "refusing to load a modified or corrupt model",
    "rejected the message",
    "(application error)",
    "http: not ready",
    "C-STOREs are refused with 0xA700",
    "the worker processes have not reported their models yet",
    "process died; restarting",
    "store not open",
)


def test_troubleshooting_quotes_the_node_s_messages() -> None:
    docs = (REPO / "docs" / "operations.md").read_text()
    section = docs.split("\n## Troubleshooting\n", 1)[1]
    code = "\n".join(p.read_text() for p in (REPO / "dicomnode").rglob("*.py"))
    for text in QUOTED:
        assert text in section, f"not in the Troubleshooting section: {text!r}"
        assert text in code, f"the node no longer writes {text!r}: update docs/operations.md"
