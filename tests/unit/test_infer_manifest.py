"""Model manifests: validation errors name file and key; hashes are enforced."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dicomnode.errors import ModelError
from dicomnode.infer import ModelRegistry, load_manifest
from dicomnode.infer.registry import SHIPPED_MODELS_DIR, resolve_models_dir
from dicomnode.infer.samples import phantom_ct, sample_volume
from tests.support.infer_models import base_manifest, sigmoid_graph, write_model


def _write(tmp_path: Path, data: Any, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    p = folder / "model.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return p


def _err(tmp_path: Path, data: Any) -> str:
    p = _write(tmp_path, data)
    with pytest.raises(ModelError) as ei:
        load_manifest(p)
    msg = str(ei.value)
    assert msg.startswith(str(p)), msg  # every error names the file
    return msg


GOOD = base_manifest("m", "model.onnx", "0" * 64)


def _with(path: str, value: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(GOOD)
    cur = data
    keys = path.split(".")
    for k in keys[:-1]:
        cur = cur[int(k)] if k.isdigit() else cur[k]
    last = keys[-1]
    if value is KeyError:
        del cur[last]
    elif last.isdigit():
        cur[int(last)] = value
    else:
        cur[last] = value
    return data


def test_good_manifest_loads(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, GOOD))
    assert m.name == "m" and m.backend == "onnx" and m.info.family == "rule-based"
    assert m.output.labels[0].spec.type.meaning == "Bone"
    assert m.info.weights_sha256 == ("0" * 64,)


@pytest.mark.parametrize("path,value,expected", [
    ("version", KeyError, "version: is required"),
    ("family", "ML", "family: 'ML' is not one of"),
    ("name", "Other Name", "name: 'Other Name': use lower-case"),
    ("weights.0.sha256", "abc", "weights[0].sha256: must be 64 hexadecimal digits"),
    ("weights.0.file", "../escape.onnx", "weights[0].file: '../escape.onnx' must be a path"),
    ("weights", [], "weights: must not be empty"),
    ("applies_to.modalities", [], "applies_to.modalities: must not be empty"),
    ("input.orientation", "RAX", "input.orientation: 'RAX' must be 'source' or 3 letters"),
    ("input.orientation", "RRS", "input.orientation"),
    ("input.patch_size", [64, 64], "input.patch_size: must be 3 positive integers"),
    ("input.overlap", 0.95, "input.overlap: must be <= 0.9"),
    ("input.normalization", [{"type": "clip", "min": 5, "max": 1}],
     "input.normalization[0].max: must be greater than min"),
    ("input.normalization", [{"type": "magic"}], "input.normalization[0].type: 'magic' is not one"),
    ("runtime", {"backend": "tensorflow"}, "runtime.backend: 'tensorflow' is not one of"),
    ("output.labels.0.color", [300, 0, 0], "output.labels[0].color: must be 3 integers 0-255"),
    ("output.labels.0.category", {"value": "1"}, "output.labels[0].category.meaning: is required"),
    ("output.labels.0.postprocess", {"fill_holes": "4d"},
     "output.labels[0].postprocess.fill_holes: '4d' is not one of"),
    ("output.labels.0.postprocess", {"within": "Nothing"},
     "output.labels[0].postprocess.within: no label named 'Nothing'"),
    ("output.task", "detection", "output.task: 'detection' is not one of"),
    ("measurements", [{"name": "volume", "labels": [7]}],
     "measurements[0].labels: unknown label value(s) [7]"),
    ("colour", "red", "colour: unknown key"),
    ("input.spacingg", [1, 1, 1], "input.spacingg: unknown key"),
    ("input.stack", {"select": "first"}, "input.stack.split_by: is required"),
    ("input.stack", {"split_by": "phase"}, "input.stack.split_by: 'phase' is not one of"),
    ("input.stack", {"split_by": "echo", "select": "newest"},
     "input.stack.select: 'newest': use largest, first, last or a number"),
    ("input.stack", {"split_by": "orientation", "select": "first"},
     "input.stack.select: 'first': for orientation use largest or one of"),
    ("applies_to.planes", ["transverse"], "applies_to.planes: 'transverse' is not one of"),
])
def test_validation_errors_name_file_and_key(tmp_path: Path, path: str, value: Any,
                                             expected: str) -> None:
    assert expected in _err(tmp_path, _with(path, value))


def test_gradcam_needs_torchscript(tmp_path: Path) -> None:
    data = _with("output", {"task": "classification", "activation": "softmax",
                            "classes": [{"name": "x", "code": {"value": "1", "meaning": "x"}}],
                            "saliency": {"method": "gradcam"}})
    data["measurements"] = []
    assert "output.saliency.method: gradcam needs runtime.backend torchscript" in _err(tmp_path,
                                                                                         data)


def test_unreadable_and_non_mapping(tmp_path: Path) -> None:
    assert "not valid YAML" in _err(tmp_path, "name: [unclosed")
    assert "must be a YAML mapping" in _err(tmp_path, "- a\n- b\n")
    with pytest.raises(ModelError, match="cannot read manifest"):
        load_manifest(tmp_path / "absent" / "model.yaml")


def test_shipped_manifests_are_valid() -> None:
    for name in ("deepbet-brain", "ct-tissue"):
        m = load_manifest(SHIPPED_MODELS_DIR / name / "model.yaml")
        m.verify_weights()
        assert m.info.citation and m.info.licence
    assert load_manifest(SHIPPED_MODELS_DIR / "deepbet-brain").info.family == "AI"
    assert load_manifest(SHIPPED_MODELS_DIR / "ct-tissue").info.family == "rule-based"


def test_applies_to() -> None:
    brain = load_manifest(SHIPPED_MODELS_DIR / "deepbet-brain")
    assert brain.applies_to("MR", "HEAD", "T1 MPRAGE sag")[0]
    assert brain.applies_to("MR", "", "t1_mprage")[0]  # no BodyPartExamined: accepted
    ok, why = brain.applies_to("CT", "HEAD", "T1")
    assert not ok and "modality CT" in why
    ok, why = brain.applies_to("MR", "KNEE", "T1")
    assert not ok and "body part KNEE" in why
    ok, why = brain.applies_to("MR", "HEAD", "FLAIR axial")
    assert not ok and "series description" in why
    reg = ModelRegistry(SHIPPED_MODELS_DIR)
    assert reg.applicable("CT", "CHEST", "Thorax") == ["ct-tissue"]


def test_hard_constraints_and_soft_hints(tmp_path: Path) -> None:
    brain = load_manifest(SHIPPED_MODELS_DIR / "deepbet-brain")
    # A routed model: only the hard constraints are checked.
    assert brain.refusal("MR", 140) is None  # no description, no body part: not asked
    r = brain.refusal("CT", 140)
    assert r is not None and r.hard and r.constraint == "applies_to.modalities"
    r = brain.refusal("MR", 12)
    assert r is not None and r.constraint == "applies_to.min_slices"
    assert str(r) == ("hard constraint applies_to.min_slices: 12 slice(s), the model needs "
                      "at least 20")
    # The embedded default passes the hints too.
    r = brain.refusal("MR", 140, series_description="GEOM a_axial_inf2sup", body_part="")
    assert r is not None and not r.hard and r.constraint == "applies_to.series_description"
    # Planes: from ImageOrientationPatient, and into the loader's stack choice.
    data = _with("applies_to.planes", ["axial"])
    data["input"]["stack"] = {"split_by": "echo", "select": 2}
    m = load_manifest(_write(tmp_path, data))
    assert m.refusal("CT", 10, [1, 0, 0, 0, 1, 0]) is None
    r = m.refusal("CT", 10, [1, 0, 0, 0, 0, -1])
    assert r is not None and r.constraint == "applies_to.planes" and "coronal" in r.reason
    assert (m.stack.split_by, m.stack.select, m.stack.planes) == ("echo", "2", ("axial",))


def test_sha256_mismatch_refuses_to_load(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED_MODELS_DIR / "ct-tissue", tmp_path / "ct-tissue")
    weights = tmp_path / "ct-tissue" / "ct_tissue.onnx"
    weights.write_bytes(weights.read_bytes() + b"\0")  # one byte more: another file
    reg = ModelRegistry(tmp_path)  # manifests still load: hashes are checked on use
    vol = sample_volume(phantom_ct((8, 16, 16)), np.eye(4), "CT")
    with pytest.raises(ModelError, match=r"weights\[0\]\.sha256: ct_tissue.onnx has SHA-256 "
                                         r"[0-9a-f]{64}, manifest says [0-9a-f]{64}; refusing"):
        reg.run("ct-tissue", vol)
    weights.unlink()
    with pytest.raises(ModelError, match="does not exist"):
        reg.run("ct-tissue", vol)


def test_registry_enabled_and_unknown(tmp_path: Path) -> None:
    write_model(tmp_path, "a", sigmoid_graph())
    write_model(tmp_path, "b", sigmoid_graph())
    assert ModelRegistry(tmp_path).names() == ["a", "b"]
    assert ModelRegistry(tmp_path, enabled=["b"]).names() == ["b"]
    with pytest.raises(ModelError, match=r"models.enabled: \['zzz'\] not found"):
        ModelRegistry(tmp_path, enabled=["zzz"])
    with pytest.raises(ModelError, match="unknown model 'a'"):
        ModelRegistry(tmp_path, enabled=["b"]).manifest("a")
    with pytest.raises(ModelError, match="is not a folder"):
        ModelRegistry(tmp_path / "nope")


def test_models_dir_falls_back_to_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_models_dir("./models") == SHIPPED_MODELS_DIR
    (tmp_path / "models").mkdir()
    assert resolve_models_dir("models") == (tmp_path / "models").resolve()
    assert resolve_models_dir(tmp_path / "x") == tmp_path / "x"


def test_runner_is_created_once(tmp_path: Path) -> None:
    write_model(tmp_path, "a", sigmoid_graph())
    reg = ModelRegistry(tmp_path)
    vol = sample_volume(np.zeros((4, 8, 8), np.float32), np.eye(4), "CT")
    reg.run("a", vol)
    first = reg.runner("a")
    reg.run("a", vol)
    assert reg.runner("a") is first and first.backend is reg.runner("a").backend
