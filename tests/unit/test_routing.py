"""Routing rules: parsing/validation errors and first-match evaluation (table-driven)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from dicomnode.config import DestinationConfig, load_settings
from dicomnode.domain import InstanceRef
from dicomnode.errors import RoutingError
from dicomnode.routing import RoutingTable, SendTarget, representative
from tests.support.series import write_series

MODELS = {"deepbet-brain", "ct-tissue"}
DESTS = (
    DestinationConfig(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242),
    DestinationConfig(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=4243,
                      formats=("seg",)),
    DestinationConfig(name="viewer", ae_title="VIEWER", host="127.0.0.1", port=4244,
                      formats=("sc",)),
)

EXAMPLE = yaml.safe_load("""
- name: drop-localizers
  when:
    ImageType: {in: [LOCALIZER, SCOUT]}
  discard: true
- name: mr-brain-t1
  when:
    Modality: MR
    BodyPartExamined: {in: [BRAIN, HEAD]}
    SeriesDescription: {regex: "(?i)t1|mprage"}
    SliceThickness: {max: 2.0}
  models: [deepbet-brain]
  send: [pacs, {to: viewer, formats: [sc, sr]}]
  priority: 10
- name: ct-from-scanner
  when:
    Modality: CT
    calling_aet: {in: [CT_SCANNER_1, ORTHANC]}
    ContrastBolusAgent: {missing: true}
  models: [ct-tissue]
  send: [archive]
  forward: [archive]
- name: everything
  default: true
  forward: [archive]
""")


def ds(**attrs: Any) -> Dataset:
    d = Dataset()
    for k, v in attrs.items():
        setattr(d, k, v)
    return d


@pytest.fixture(scope="module")
def table() -> RoutingTable:
    return RoutingTable.parse(EXAMPLE, MODELS, DESTS)


MR_T1 = dict(Modality="MR", BodyPartExamined="BRAIN", SeriesDescription="Sag T1 MPRAGE",
             SliceThickness="1.0", ImageType=["ORIGINAL", "PRIMARY", "M"])


@pytest.mark.parametrize(
    ("name", "attrs", "calling", "expected_rule"),
    [
        ("mr t1 brain", MR_T1, "ANY", "mr-brain-t1"),
        ("mr regex is case-insensitive by flag", {**MR_T1, "SeriesDescription": "t1_se"}, "",
         "mr-brain-t1"),
        ("mr too thick", {**MR_T1, "SliceThickness": "5"}, "", "everything"),
        ("mr thickness missing", {k: v for k, v in MR_T1.items() if k != "SliceThickness"}, "",
         "everything"),
        ("mr t2", {**MR_T1, "SeriesDescription": "Ax T2 FLAIR"}, "", "everything"),
        ("mr knee", {**MR_T1, "BodyPartExamined": "KNEE"}, "", "everything"),
        ("localizer wins first (multi-valued ImageType)",
         {**MR_T1, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "", "drop-localizers"),
        ("ct from scanner", dict(Modality="CT"), "CT_SCANNER_1", "ct-from-scanner"),
        ("ct from unknown AE", dict(Modality="CT"), "OTHER", "everything"),
        ("ct with contrast", dict(Modality="CT", ContrastBolusAgent="IOPAMIDOL"), "ORTHANC",
         "everything"),
        ("ct with empty contrast (type 2) counts as missing",
         dict(Modality="CT", ContrastBolusAgent=""), "ORTHANC", "ct-from-scanner"),
        ("padding is ignored", dict(Modality="CT "), "ORTHANC", "ct-from-scanner"),
        ("no modality", dict(), "ORTHANC", "everything"),
    ],
)
def test_first_match(table: RoutingTable, name: str, attrs: dict[str, Any], calling: str,
                     expected_rule: str) -> None:
    decision = table.match(ds(**attrs), calling_aet=calling, called_aet="DICOMNODE")
    assert decision.rule is not None, name
    assert decision.rule.name == expected_rule, name


def test_decision_actions(table: RoutingTable) -> None:
    d = table.match(ds(**MR_T1))
    assert d.models == ("deepbet-brain",)
    # pacs takes its formats from the destination config; viewer overrides them.
    assert d.send == (SendTarget("pacs", ("seg", "sr")), SendTarget("viewer", ("sc", "sr")))
    assert d.formats_for("viewer") == ("sc", "sr")
    assert d.formats_for("archive") == ()
    assert d.priority == 10 and not d.discard and d.forward == ()
    ct = table.match(ds(Modality="CT"), calling_aet="ORTHANC")
    assert ct.send == (SendTarget("archive", ("seg",)),) and ct.forward == ("archive",)
    drop = table.match(ds(ImageType=["DERIVED", "SECONDARY", "LOCALIZER"]))
    assert drop.discard and drop.models == () and drop.forward == ()


def test_no_default_means_unmatched() -> None:
    t = RoutingTable.parse(EXAMPLE[:3], MODELS, DESTS)
    d = t.match(ds(Modality="US"))
    assert not d.matched and d.models == () and d.forward == () and not d.discard
    exp = t.explain(ds(Modality="US"))
    assert len(exp) == 3 and not any(e.matched for e in exp)
    assert RoutingTable().match(ds(Modality="CT")).rule is None


def _one(when: dict[str, Any]) -> RoutingTable:
    return RoutingTable.parse([{"name": "r", "when": when, "forward": ["archive"]}], MODELS, DESTS)


@pytest.mark.parametrize(
    ("when", "attrs", "calling", "called", "matches"),
    [
        ({"Modality": "CT"}, {"Modality": "CT"}, "", "", True),
        ({"SeriesDescription": "T1"}, {"SeriesDescription": "t1"}, "", "", False),  # case-sensitive
        ({"Modality": {"equals": "CT"}}, {"Modality": "CT"}, "", "", True),
        ({"Modality": ["CT", "PT"]}, {"Modality": "PT"}, "", "", True),  # list = in
        ({"Modality": {"in": ["CT", "PT"]}}, {"Modality": "MR"}, "", "", False),
        ({"Modality": {"not": "CT"}}, {"Modality": "MR"}, "", "", True),
        ({"Modality": {"not": "CT"}}, {"Modality": "CT"}, "", "", False),
        ({"Modality": {"not": "CT"}}, {}, "", "", True),  # missing is "not CT"
        ({"Modality": {"not": {"in": ["CT", "MR"]}}}, {"Modality": "MR"}, "", "", False),
        ({"Modality": {"not": {"not": "CT"}}}, {"Modality": "CT"}, "", "", True),
        ({"ImageType": "AXIAL"}, {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, "", "", True),
        ({"ImageType": {"not": "AXIAL"}}, {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]},
         "", "", False),
        ({"SeriesDescription": {"regex": "^T1"}}, {"SeriesDescription": "T1 MPRAGE"}, "", "", True),
        ({"SeriesDescription": {"regex": "^T1"}}, {"SeriesDescription": "Ax T1"}, "", "", False),
        ({"SeriesDescription": {"regex": "T1"}}, {"SeriesDescription": "Ax T1"}, "", "", True),
        ({"SliceThickness": {"min": 1, "max": 3}}, {"SliceThickness": "3"}, "", "", True),
        ({"SliceThickness": {"min": 1, "max": 3}}, {"SliceThickness": "3.01"}, "", "", False),
        ({"SliceThickness": {"min": 1}}, {"SliceThickness": "0.99"}, "", "", False),
        ({"SliceThickness": {"max": 1}}, {"SliceThickness": 0.5}, "", "", True),
        ({"Rows": 512}, {"Rows": 512}, "", "", True),  # US int vs number
        ({"SliceThickness": 1}, {"SliceThickness": "1.000"}, "", "", True),  # DS vs number
        ({"SliceThickness": {"max": 5}}, {}, "", "", False),  # missing never in range
        ({"PixelSpacing": {"max": 0.6}}, {"PixelSpacing": ["0.5", "0.5"]}, "", "", True),
        ({"PatientName": {"regex": "^Doe\\^"}}, {"PatientName": "Doe^John"}, "", "", True),
        ({"StudyDescription": {"exists": True}}, {"StudyDescription": "x"}, "", "", True),
        ({"StudyDescription": {"exists": True}}, {"StudyDescription": ""}, "", "", False),
        ({"StudyDescription": {"exists": False}}, {}, "", "", True),
        ({"StudyDescription": {"missing": True}}, {}, "", "", True),
        ({"StudyDescription": {"missing": False}}, {}, "", "", False),
        ({"calling_aet": "CT1"}, {}, "CT1", "NODE", True),
        ({"calling_aet": "CT1"}, {}, "CT2", "NODE", False),
        ({"called_aet": {"regex": "^AI_"}}, {}, "CT1", "AI_BRAIN", True),
        ({"called_aet": {"regex": "^AI_"}}, {}, "CT1", "NODE", False),
        ({"calling_aet": {"missing": True}}, {}, "", "NODE", True),
        ({"Modality": "MR", "calling_aet": "CT1"}, {"Modality": "MR"}, "CT2", "", False),  # AND
    ],
)
def test_operators(when: dict[str, Any], attrs: dict[str, Any], calling: str, called: str,
                   matches: bool) -> None:
    assert _one(when).match(ds(**attrs), calling, called).matched is matches


def test_sequence_only_supports_exists() -> None:
    item = Dataset()
    item.CodeValue = "X"
    d = ds(Modality="CT")
    d.ProcedureCodeSequence = [item]
    assert _one({"ProcedureCodeSequence": {"exists": True}}).match(d).matched
    exp = _one({"ProcedureCodeSequence": "X"}).explain(d)
    assert not exp[0].matched and "sequence" in exp[0].reasons[0]


def test_explain_reasons(table: RoutingTable) -> None:
    exp = table.explain(ds(**{**MR_T1, "SliceThickness": "5"}), "X", "Y")
    assert [e.rule.name for e in exp] == ["drop-localizers", "mr-brain-t1", "ct-from-scanner",
                                         "everything"]
    assert [e.matched for e in exp] == [False, False, False, True]
    assert exp[1].reasons == ["SliceThickness is '5', required SliceThickness in [-inf, 2]"]
    assert "Modality is 'MR', required Modality == 'CT'" in exp[2].reasons
    assert "calling_aet is 'X', required calling_aet in ['CT_SCANNER_1', 'ORTHANC']" in \
        exp[2].reasons
    assert exp[3].reasons == ["default rule: matches everything"]
    # Explanation stops at the first match.
    assert len(table.explain(ds(**MR_T1))) == 2


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([{"name": "a", "when": {"Modality": "CT"}, "models": ["nope"]}],
         "routes[0] (a): models[0]: unknown model 'nope'"),
        ([{"when": {"Modality": "CT"}, "models": ["ct-tissue"], "send": ["mars"]}],
         "routes[0] (#0): send[0]: unknown destination 'mars' (known: archive, pacs, viewer)"),
        ([{"name": "f", "when": {"Modality": "CT"}, "forward": ["mars"]}],
         "routes[0] (f): forward[0]: unknown destination 'mars'"),
        ([{"name": "r", "when": {"SeriesDescription": {"regex": "(unclosed"}},
           "forward": ["pacs"]}],
         "routes[0] (r): when.SeriesDescription.regex: bad regular expression '(unclosed'"),
        ([{"name": "k", "when": {"Modalityy": "CT"}, "forward": ["pacs"]}],
         "routes[0] (k): when.Modalityy: unknown DICOM keyword 'Modalityy'"),
        ([{"name": "o", "when": {"Modality": {"like": "CT"}}, "forward": ["pacs"]}],
         "routes[0] (o): when.Modality.like: unknown operator"),
        ([{"name": "o2", "when": {"Modality": {"not": {"startswith": "C"}}}, "forward": ["pacs"]}],
         "routes[0] (o2): when.Modality.not.startswith: unknown operator"),
        ([{"name": "two", "when": {"Modality": {"equals": "CT", "regex": "C"}},
           "forward": ["pacs"]}],
         "routes[0] (two): when.Modality: one operator per condition"),
        ([{"name": "rng", "when": {"SliceThickness": {"min": 3, "max": 1}}, "forward": ["pacs"]}],
         "routes[0] (rng): when.SliceThickness: min 3 is greater than max 1"),
        ([{"name": "num", "when": {"SliceThickness": {"min": "thin"}}, "forward": ["pacs"]}],
         "routes[0] (num): when.SliceThickness.min: expected a number"),
        ([{"name": "ex", "when": {"Modality": {"exists": "yes"}}, "forward": ["pacs"]}],
         "routes[0] (ex): when.Modality.exists: expected true or false"),
        ([{"name": "in", "when": {"Modality": {"in": []}}, "forward": ["pacs"]}],
         "routes[0] (in): when.Modality.in: expected a non-empty list"),
        ([{"name": "nowhen", "models": ["ct-tissue"]}],
         "routes[0] (nowhen): when: required (or mark the rule default: true)"),
        ([{"name": "idle", "when": {"Modality": "CT"}}],
         "routes[0] (idle): models: the rule does nothing"),
        ([{"name": "d", "when": {"Modality": "CT"}, "discard": True, "forward": ["pacs"]}],
         "routes[0] (d): discard: a discarding rule cannot also run models, send or forward"),
        ([{"name": "s", "when": {"Modality": "CT"}, "send": ["pacs"], "forward": ["pacs"]}],
         "routes[0] (s): send: results are sent only when models:"),
        ([{"name": "fmt", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
           "send": [{"to": "pacs", "formats": ["png"]}]}],
         "routes[0] (fmt): send[0].formats: unknown format(s) ['png']"),
        ([{"name": "typo", "when": {"Modality": "CT"}, "model": ["ct-tissue"]}],
         "routes[0] (typo): model: unknown key"),
        ([{"name": "p", "when": {"Modality": "CT"}, "forward": ["pacs"], "priority": "high"}],
         "routes[0] (p): priority: expected an integer"),
        ([{"name": "d1", "default": True, "forward": ["pacs"]},
          {"name": "late", "when": {"Modality": "CT"}, "forward": ["pacs"]}],
         "routes[1] (late): unreachable: it follows the default rule routes[0] (d1)"),
        ([{"name": "dw", "default": True, "when": {"Modality": "CT"}, "forward": ["pacs"]}],
         "routes[0] (dw): when: a default rule matches everything"),
        ([{"name": "x", "when": {"Modality": "CT"}, "forward": ["pacs"]},
          {"name": "x", "when": {"Modality": "MR"}, "forward": ["pacs"]}],
         "routes[1] (x): name: duplicate rule name 'x' (also routes[0])"),
        (["just a string"], "routes[0]: must be a mapping"),
        ([{"name": "m2", "when": {"Modality": "CT"}, "models": ["ct-tissue", "ct-tissue"]}],
         "routes[0] (m2): models: a model is listed twice"),
    ],
)
def test_invalid_rules(routes: list[Any], message: str) -> None:
    with pytest.raises(RoutingError) as info:
        RoutingTable.parse(routes, MODELS, DESTS)
    assert message in str(info.value)


def test_from_settings_yaml(tmp_path: Any) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": 4242}],
        "routes": [{"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
                    "send": ["pacs"]}],
    }))
    settings = load_settings(cfg, environ={})
    table = RoutingTable.from_settings(settings, MODELS)
    assert table.match(ds(Modality="CT")).send == (SendTarget("pacs", ("seg", "sr")),)
    with pytest.raises(RoutingError, match="unknown model 'ct-tissue' \\(known: none installed\\)"):
        RoutingTable.from_settings(settings, set())


def test_representative_is_lowest_instance_number(tmp_path: Any) -> None:
    paths = write_series(np.zeros((3, 4, 4), np.float32), tmp_path, modality="MR",
                         series_description="T1")
    refs = []
    for p in reversed(paths):
        d = pydicom.dcmread(p, stop_before_pixels=True)
        refs.append(InstanceRef(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID,
                                d.SOPClassUID, p, instance_number=int(d.InstanceNumber)))
    rep = representative(refs)
    assert int(rep.InstanceNumber) == min(r.instance_number for r in refs)  # type: ignore[type-var]
    assert "PixelData" not in rep
    with pytest.raises(RoutingError, match="empty series"):
        representative([])


def test_file_meta_keywords(tmp_path: Any) -> None:
    (path,) = write_series(np.zeros((1, 4, 4), np.float32), tmp_path, modality="CT")
    d = pydicom.dcmread(path, stop_before_pixels=True)
    t = _one({"TransferSyntaxUID": "1.2.840.10008.1.2.1"})
    assert t.match(d).matched
    jpeg = _one({"TransferSyntaxUID": {"regex": r"^1\.2\.840\.10008\.1\.2\.4"}})
    assert not jpeg.match(d).matched
    assert not t.match(ds(Modality="CT")).matched  # no file meta: missing


@pytest.mark.parametrize(("rule", "message"), [
    ({"name": "n", "when": {"Modality": "CT"}, "models": ["ct-tissue"], "notify": ["nope"]},
     "routes[0] (n): notify[0]: unknown notification 'nope' (known: dash, ris)"),
    ({"name": "n", "when": {"Modality": "CT"}, "forward": ["pacs"], "notify": ["dash"]},
     "routes[0] (n): notify: notifications tell about model results"),
    ({"name": "n", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
      "notify": ["dash", "dash"]},
     "routes[0] (n): notify: a notification is listed twice"),
])
def test_invalid_notify(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(RoutingError) as info:
        RoutingTable.parse([rule], MODELS, DESTS, ["dash", "ris"])
    assert message in str(info.value)


def test_notify_is_carried_into_the_decision() -> None:
    t = RoutingTable.parse([{"name": "n", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
                             "notify": ["ris"]}], MODELS, DESTS, ["dash", "ris"])
    assert t.match(ds(Modality="CT")).notify == ("ris",)
    assert t.match(ds(Modality="MR")).notify == ()
