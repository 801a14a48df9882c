"""``dicomnode models evaluate`` on real series, with references written by the node, by
dcmqi's ``itkimage2segimage`` and as NIfTI, and a classifier trained by the suite.

Expected numbers are counted from the masks in the test (voxels removed from a
reference), never taken from the code under test.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from dicomnode.cli import main
from dicomnode.domain import InferenceResult
from dicomnode.encode import EncodeOptions, encode_results
from dicomnode.infer import ModelRegistry, load_volume
from dicomnode.infer.nifti import nifti_affine
from dicomnode.infer.registry import SHIPPED_MODELS_DIR
from tests.support.infer_data import COLIN27_BET, cranium_ct_series
from tests.support.peers import dciodvfy
from tests.support.series import write_series

LABELS = ("Body", "Bone", "Air inside body")


def _evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["models", "evaluate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _report(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "report.json").read_text())


def _write_seg(result: InferenceResult, path: Path) -> Path:
    (ds,) = encode_results(result, formats=("seg",), options=EncodeOptions())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _png(path: Path) -> None:
    img = imread(path)  # raises on anything but a readable PNG
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Twenty slices of the Cranium head CT, ct-tissue's result on it and its SEG."""
    series = cranium_ct_series(k_range=(40, 60))
    reg = ModelRegistry(SHIPPED_MODELS_DIR, enabled=["ct-tissue"], threads=1)
    result = reg.run("ct-tissue", load_volume(series.directory))
    root = tmp_path_factory.mktemp("eval-ct")
    seg = _write_seg(result, root / "own" / "seg.dcm")
    return series, result, seg


def test_own_seg_is_perfect_agreement(ct, tmp_path: Path,  # type: ignore[no-untyped-def]
                                      capsys: pytest.CaptureFixture[str]) -> None:
    series, result, seg = ct
    assert dciodvfy(seg).errors == ()
    rc, out, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                           "--reference", str(seg.parent), "--out", str(tmp_path / "o"))
    assert rc == 0, out
    rep = _report(tmp_path / "o")
    (case,) = rep["cases"]
    assert case["status"] == "ok" and case["series_uid"] == series.series_uid
    assert case["reference_kind"] == "seg"
    assert case["placed_by"] == "referenced source SOP instances"
    assert [lab["name"] for lab in case["labels"]] == list(LABELS)
    for lab in case["labels"]:
        m = lab["metrics"]
        assert lab["matched_by"] == "property type code"
        assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["mean_surface_distance_mm"] == 0.0
        assert m["volume_difference_ml"] == 0.0 and m["voxels"] == m["reference_voxels"] > 0
    body = case["labels"][0]["metrics"]
    sx, sy, sz = load_volume(series.directory).spacing
    assert body["volume_ml"] == pytest.approx(body["voxels"] * sx * sy * sz / 1000)
    assert "Body" in out and "1.000" in out
    assert {Path(p).name for p in rep["plots"]} == {"dice.png", "bland-altman.png"}
    for p in rep["plots"]:
        _png(Path(p))


def test_enhanced_multiframe_series(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """One enhanced CT instance: SEG frames placed through the referenced source frames."""
    series = cranium_ct_series(enhanced=True, k_range=(40, 52))
    reg = ModelRegistry(SHIPPED_MODELS_DIR, enabled=["ct-tissue"], threads=1)
    result = reg.run("ct-tissue", load_volume(series.directory))
    ref, expected = _perturbed(result)
    _write_seg(ref, tmp_path / "ref" / "seg.dcm")
    rc, _, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                         "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "o"))
    case = _report(tmp_path / "o")["cases"][0]
    assert rc == 0, case
    assert case["placed_by"] == "referenced source SOP instances"
    for lab in case["labels"]:
        assert lab["metrics"]["dice"] == pytest.approx(expected[lab["name"]], abs=1e-12)


def test_progress_bar_on_a_terminal_only(ct, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The command in a real pseudo-terminal draws a progress bar; piped, it does not."""
    series, _, seg = ct
    cmd = [sys.executable, "-m", "dicomnode", "models", "evaluate", "ct-tissue", "--series",
           str(series.directory), "--reference", str(seg.parent), "--log-level", "WARNING"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "tty")], stdout=subprocess.DEVNULL,
                          stderr=slave, timeout=300)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    tty_err = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "evaluate ct-tissue: 100%" in tty_err and "1/1" in tty_err, tty_err
    piped = subprocess.run([*cmd, "--out", str(tmp_path / "pipe")], capture_output=True,
                           text=True, timeout=300)
    assert piped.returncode == 0 and "%|" not in piped.stderr, piped.stderr
    assert "Dice" in piped.stdout and "Traceback" not in piped.stderr


def _perturbed(result: InferenceResult) -> tuple[InferenceResult, dict[str, float]]:
    """Bone minus its voxels on slices 5 and 6, Body plus one 6-voxel-wide band of rows."""
    seg = result.segmentation
    assert seg is not None
    masks = seg.masks.copy()
    n_bone = int(masks[1].sum())
    removed = int(masks[1][5:7].sum())
    masks[1][5:7] = False
    body = masks[0]
    n_body = int(body.sum())
    band = np.zeros_like(body)
    band[:, 2:8, :] = True
    added = int((band & ~body).sum())
    masks[0] = body | band
    assert removed > 100 and added > 100
    expected = {"Bone": 2 * (n_bone - removed) / (n_bone + n_bone - removed),
                "Body": 2 * n_body / (n_body + n_body + added),
                "Air inside body": 1.0}
    return dataclasses.replace(result, segmentation=dataclasses.replace(seg, masks=masks)), \
        expected


def test_perturbed_seg_gives_the_counted_dice(ct, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              capsys: pytest.CaptureFixture[str]) -> None:
    series, result, _ = ct
    ref, expected = _perturbed(result)
    seg = _write_seg(ref, tmp_path / "ref" / "perturbed.dcm")
    assert dciodvfy(seg).errors == ()
    (tmp_path / "ref" / "notes.txt").write_text("not DICOM: ignored")
    rc, _, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                         "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "o"))
    assert rc == 0
    labels = {lab["name"]: lab["metrics"] for lab in _report(tmp_path / "o")["cases"][0]["labels"]}
    for name, dice in expected.items():
        assert labels[name]["dice"] == pytest.approx(dice, abs=1e-12), name
    # the reference bone lost two slices: surfaces now disagree, the maximum bounds the rest
    bone = labels["Bone"]
    assert 0 < bone["mean_surface_distance_mm"] < bone["hd95_mm"] <= bone["hausdorff_mm"]
    assert labels["Air inside body"]["hd95_mm"] == 0.0
    assert labels["Bone"]["volume_difference_percent"] > 0  # model > shrunken reference
    assert labels["Body"]["volume_difference_percent"] < 0


def test_nifti_references_in_another_orientation(
        ct, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """NIfTI stored RAS-canonical by nibabel (axes reordered and flipped vs the series): a
    folder of one mask per label (overlaps kept), and a label map (the last label wins)."""
    series, result, _ = ct
    ref, expected = _perturbed(result)
    seg = ref.segmentation
    assert seg is not None
    affine = nifti_affine(result.volume.affine)

    def canonical(a: np.ndarray) -> nib.Nifti1Image:
        img = nib.Nifti1Image(a.astype(np.uint8).transpose(2, 1, 0), affine)
        out = nib.as_closest_canonical(img)
        assert not np.allclose(out.affine, img.affine)  # really another storage order
        return out

    masks_dir = tmp_path / "ref" / series.directory.name
    masks_dir.mkdir(parents=True)
    for lab, m in zip(seg.labels, seg.masks, strict=True):
        nib.save(canonical(m), masks_dir / f"mask-{lab.value}-x.nii.gz")
    rc, _, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                         "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "o"))
    assert rc == 0
    case = _report(tmp_path / "o")["cases"][0]
    assert case["reference_kind"] == "nifti" and case["reference"] == str(masks_dir)
    for lab in case["labels"]:
        assert lab["metrics"]["dice"] == pytest.approx(expected[lab["name"]], abs=1e-12)

    labelmap = np.zeros(seg.masks.shape[1:], np.uint8)
    for lab, m in zip(seg.labels, seg.masks, strict=True):
        labelmap[m] = lab.value
    (tmp_path / "ref2").mkdir()
    nib.save(canonical(labelmap), tmp_path / "ref2" / f"{series.series_uid}.nii.gz")
    rc, _, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                         "--reference", str(tmp_path / "ref2"), "--out", str(tmp_path / "o2"))
    assert rc == 0
    labels = {lab["name"]: lab["metrics"] for lab in _report(tmp_path / "o2")["cases"][0]["labels"]}
    # Bone and air are disjoint, written after Body: unchanged; Body keeps what they left
    assert labels["Bone"]["dice"] == pytest.approx(expected["Bone"], abs=1e-12)
    assert labels["Air inside body"]["dice"] == pytest.approx(1.0)
    body_pred = result.segmentation.masks[0]
    body_ref = labelmap == 1
    n_common = int((body_pred & body_ref).sum())
    assert labels["Body"]["dice"] == pytest.approx(
        2 * n_common / (int(body_pred.sum()) + int(body_ref.sum())), abs=1e-12)


def test_seg_without_source_references_is_placed_by_positions(
        ct, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    series, _, seg = ct
    ds = pydicom.dcmread(seg)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        for kw in ("DerivationImageSequence",):
            if kw in frame:
                del frame[kw]
    if "SourceImageSequence" in ds:
        del ds.SourceImageSequence
    # the series is still named (ReferencedSeriesSequence) but no SOP instance of it
    ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = \
        "1.2.3.4"
    del ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[1:]
    (tmp_path / "ref").mkdir()
    ds.save_as(tmp_path / "ref" / "seg.dcm")
    rc, out, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                           "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "o"))
    case = _report(tmp_path / "o")["cases"][0]
    assert rc == 0, case
    assert case["placed_by"] == "plane positions"
    assert all(lab["metrics"]["dice"] == 1.0 for lab in case["labels"])


def test_seg_written_by_dcmqi(ct, tmp_path: Path,  # type: ignore[no-untyped-def]
                              capsys: pytest.CaptureFixture[str]) -> None:
    """A SEG from another producer: dcmqi's itkimage2segimage, from the node's NIfTI masks."""
    exe = shutil.which("itkimage2segimage") or str(Path(__file__).resolve().parents[2] / ".venv"
                                                   / "bin" / "itkimage2segimage")
    if not Path(exe).exists():
        pytest.skip("dcmqi not installed (pip install dcmqi)")
    series, result, _ = ct
    ref, expected = _perturbed(result)
    seg = ref.segmentation
    assert seg is not None
    from dicomnode.infer.nifti import write_nifti

    attrs = []
    images = []
    for lab, m in zip(seg.labels, seg.masks, strict=True):
        images.append(str(write_nifti(tmp_path / f"m{lab.value}.nii.gz", m,
                                      result.volume.affine)))
        attrs.append([{
            "labelID": 1, "SegmentDescription": lab.name, "SegmentLabel": lab.name,
            "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": lab.category.value, "CodingSchemeDesignator": lab.category.scheme,
                "CodeMeaning": lab.category.meaning},
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": lab.type.value, "CodingSchemeDesignator": lab.type.scheme,
                "CodeMeaning": lab.type.meaning},
            "recommendedDisplayRGBValue": list(lab.color)}])
    meta = {"ContentCreatorName": "Reader^One", "ClinicalTrialSeriesID": "1",
            "ClinicalTrialTimePointID": "1", "SeriesDescription": "reference",
            "SeriesNumber": "300", "InstanceNumber": "1", "BodyPartExamined": "HEAD",
            "segmentAttributes": attrs, "ContentLabel": "REF",
            "ContentDescription": "reference", "ClinicalTrialCoordinatingCenterName": "test"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "ref").mkdir()
    proc = subprocess.run(
        [exe, "--inputImageList", ",".join(images), "--inputDICOMDirectory",
         str(series.directory), "--outputDICOM", str(tmp_path / "ref" / "dcmqi.dcm"),
         "--inputMetadata", str(tmp_path / "meta.json")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rc, out, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                           "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "o"))
    case = _report(tmp_path / "o")["cases"][0]
    assert rc == 0, case
    assert case["reference_kind"] == "seg"
    # dcmqi's frames name their source images but do not state Spatial Locations Preserved,
    # so highdicom will not index them by source: they are placed by their plane positions
    assert case["placed_by"] == "plane positions"
    for lab in case["labels"]:
        assert lab["matched_by"] == "property type code"
        assert lab["metrics"]["dice"] == pytest.approx(expected[lab["name"]], abs=1e-12)


def test_bad_references_get_clear_answers(ct, tmp_path: Path,  # type: ignore[no-untyped-def]
                                          capsys: pytest.CaptureFixture[str]) -> None:
    series, result, seg = ct
    (tmp_path / "empty").mkdir()
    rc, _, err = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                           "--reference", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "holds no DICOM SEG or NIfTI" in err and "Traceback" not in err
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("series,class,label\n")
    rc, _, err = _evaluate(capsys, "ct-tissue", "--series", str(series.directory),
                           "--reference", str(csv_file), "--out", str(tmp_path / "o"))
    assert rc == 2 and "segmentation model" in err
    # a NIfTI on another grid (one voxel bigger in-plane) is refused with the reason, the
    # other series is still evaluated and the exit status says not all were
    other = tmp_path / "other-grid"
    vol = load_volume(series.directory)
    a = vol.affine.copy()
    a[:3, 1] *= 1.5
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(seg, ref / "seg.dcm")
    rng = np.random.default_rng(0)
    write_series(rng.normal(0, 1, (6, 16, 16)).astype(np.float32) * 100, other, modality="CT")
    nib.save(nib.Nifti1Image(np.ones((16, 16, 6), np.uint8), nifti_affine(a)),
             ref / f"{other.name}.nii.gz")
    rc, out, _ = _evaluate(capsys, "ct-tissue", "--series", str(series.directory), str(other),
                           str(series.directory), "--reference", str(ref),
                           "--out", str(tmp_path / "o"))
    assert rc == 1
    cases = _report(tmp_path / "o")["cases"]
    assert [c["status"] for c in cases] == ["ok", "error", "skipped"]
    assert "not on the series grid" in cases[1]["reason"]
    assert "not evaluated" in out


# --------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's small blob classifier (tests/integration/test_infer_classifier.py), ONNX."""
    torch = pytest.importorskip("torch")
    from tests.integration.test_infer_classifier import SIZE, _manifest, _train

    root = tmp_path_factory.mktemp("eval-cls")
    net = _train()
    (root / "blob").mkdir()
    path = root / "blob" / "model.onnx"
    torch.onnx.export(net, (torch.zeros((1, 1, *SIZE)),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "n", 2: "d", 3: "h", 4: "w"}, "logits": {0: "n"}})
    m = _manifest("blob", path.name, path.read_bytes(), "onnx", {"method": "none"})
    (root / "blob" / "model.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    return root


def test_classifier_against_a_csv(blob_model: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tests.integration.test_infer_classifier import _random_center, _volume

    rng = np.random.default_rng(7)
    dirs, truth = [], []
    for i in range(8):
        positive = i % 2 == 0
        d = tmp_path / "series" / f"case{i}"
        write_series(_volume(rng, _random_center(rng) if positive else None), d,
                     modality="CT", spacing=(2.0, 1.0, 1.0))
        dirs.append(d)
        truth.append(positive)
    truth[1] = True  # a reader calls one blob-free case positive: a false negative of the model
    with (tmp_path / "ref.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Series", "Class", "Label"])
        for i, (d, t) in enumerate(zip(dirs, truth, strict=True)):
            key = d.name if i % 2 else load_volume(d).series_uid  # folder names and UIDs
            w.writerow([key, "Bright blob" if i % 3 else "1", "yes" if t else "no"])
    out = tmp_path / "o"
    rc, text, _ = _evaluate(capsys, "blob", "--models-dir", str(blob_model), "--series",
                            *map(str, dirs), "--reference", str(tmp_path / "ref.csv"),
                            "--out", str(out))
    assert rc == 0, text
    rep = _report(out)
    cases = rep["cases"]
    probs = [c["classes"][0]["probability"] for c in cases]
    refs = [c["classes"][0]["reference"] for c in cases]
    assert refs == truth
    called = [p >= 0.5 for p in probs]
    assert called == [i % 2 == 0 for i in range(8)]  # the model itself is right on every case
    (cls,) = rep["summary"]["classes"]
    # reference: 5 positive (cases 0, 1, 2, 4, 6), 3 negative; the model misses case 1
    assert cls["confusion"] == [[3, 0], [1, 4]]
    assert cls["accuracy"] == pytest.approx(7 / 8)
    assert cls["precision"] == pytest.approx(1.0)
    assert cls["recall"] == cls["sensitivity"] == pytest.approx(4 / 5)
    assert cls["specificity"] == pytest.approx(1.0)
    assert cls["f1"] == pytest.approx(2 * 1.0 * 0.8 / 1.8)
    pos = [p for p, t in zip(probs, truth, strict=True) if t]
    neg = [p for p, t in zip(probs, truth, strict=True) if not t]
    pairs = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert cls["roc_auc"] == pytest.approx(pairs / (len(pos) * len(neg)))
    assert cls["roc"][0]["sensitivity"] == 0.0 and cls["roc"][-1]["sensitivity"] == 1.0
    assert "ROC AUC" in text and "specificity" in text
    assert [Path(p).name for p in rep["plots"]] == ["roc.png"]
    _png(out / "roc.png")


def test_classifier_csv_errors(blob_model: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "s"
    write_series(np.zeros((16, 16, 16), np.float32), d, modality="CT")
    bad = tmp_path / "bad.csv"
    bad.write_text("series,class,label\ns,Tumour,1\n")
    rc, _, err = _evaluate(capsys, "blob", "--models-dir", str(blob_model), "--series", str(d),
                           "--reference", str(bad), "--out", str(tmp_path / "o"))
    assert rc == 2 and "class 'Tumour' is not one of the model's" in err
    bad.write_text("uid,label\n")
    rc, _, err = _evaluate(capsys, "blob", "--models-dir", str(blob_model), "--series", str(d),
                           "--reference", str(bad), "--out", str(tmp_path / "o"))
    assert rc == 2 and "missing: series, class" in err
    bad.write_text("series,class,label\ns,1,maybe\n")
    rc, _, err = _evaluate(capsys, "blob", "--models-dir", str(blob_model), "--series", str(d),
                           "--reference", str(bad), "--out", str(tmp_path / "o"))
    assert rc == 2 and "line 2" in err and "'maybe'" in err
    rc, _, err = _evaluate(capsys, "blob", "--models-dir", str(blob_model), "--series", str(d),
                           "--reference", str(tmp_path), "--out", str(tmp_path / "o"))
    assert rc == 2 and "classifier: give a CSV" in err


# --------------------------------------------------------------------------- deepbet


@pytest.mark.slow
def test_deepbet_colin27_reproduces_dice_0936(colin27_mr, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped deepbet-brain on Colin27 vs ch2bet, as a mask in ch2bet's own NIfTI grid."""
    bet = nib.load(COLIN27_BET)
    mask = (np.asanyarray(bet.dataobj) > 0).astype(np.uint8)
    (tmp_path / "ref").mkdir()
    nib.save(nib.Nifti1Image(mask, bet.affine), tmp_path / "ref" /
             f"{colin27_mr.series_uid}.nii.gz")
    rc, text, _ = _evaluate(capsys, "deepbet-brain", "--threads", "2", "--series",
                            str(colin27_mr.directory), "--reference", str(tmp_path / "ref"),
                            "--out", str(tmp_path / "o"))
    assert rc == 0, text
    (lab,) = _report(tmp_path / "o")["cases"][0]["labels"]
    m = lab["metrics"]
    assert round(m["dice"], 3) == 0.936, m
    assert m["reference_voxels"] == int(mask.sum())
    # measured: HD95 10.8 mm, mean surface distance 3.1 mm (ch2bet cuts closer at the base)
    assert 0 < m["mean_surface_distance_mm"] < m["hd95_mm"] < 15
    print(json.dumps(m, indent=1))
