"""Classification support: a small classifier trained here on generated data.

The network learns "is there a bright blob in this volume?" from synthetic
volumes; it is exported to ONNX and TorchScript, described by a manifest,
and run by the node on DICOM series. Never shipped as a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomnode.domain import InferenceResult
from dicomnode.infer import ModelRegistry, load_volume
from tests.support.series import write_series

torch = pytest.importorskip("torch")
nn = torch.nn

SIZE = (16, 16, 16)
BLOB_RADIUS = 3.0


def _volume(rng: np.random.Generator, blob_at: tuple[int, int, int] | None) -> np.ndarray:
    x = rng.normal(0.0, 20.0, SIZE).astype(np.float32)
    if blob_at is not None:
        idx = np.indices(SIZE)
        d2 = sum((idx[a] - blob_at[a]) ** 2 for a in range(3))
        x[d2 <= BLOB_RADIUS ** 2] += 100.0
    return x


def _random_center(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(rng.integers(4, s - 4)) for s in SIZE)  # type: ignore[return-value]


class BlobNet(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x))


def _train() -> BlobNet:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    net = BlobNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(80):
        labels = rng.integers(0, 2, 16)
        xs = np.stack([_volume(rng, _random_center(rng) if y else None) for y in labels])
        x = torch.from_numpy(xs[:, None] * 0.01)  # the manifest's normalisation
        loss = nn.functional.cross_entropy(net(x), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _manifest(name: str, weights: str, data: bytes, backend: str, saliency: dict) -> dict:  # type: ignore[type-arg]
    return {
        "name": name, "version": "0.0.1", "family": "AI",
        "description": "test classifier trained by the test suite on synthetic blobs",
        "intended_use": "tests only; never shipped", "authors": "dicomnode tests",
        "licence": "Apache-2.0",
        "weights": [{"file": weights, "sha256": hashlib.sha256(data).hexdigest()}],
        "applies_to": {"modalities": ["CT"]},
        "runtime": {"backend": backend},
        "input": {"orientation": "RAS",  # exercises the inverse mapping of the saliency
                  "normalization": [{"type": "scale", "offset": 0, "factor": 0.01}],
                  "batch_size": 16},
        "output": {"task": "classification", "activation": "softmax",
                   "classes": [{"index": 1, "name": "Bright blob",
                                "code": {"value": "4147007", "scheme": "SCT",
                                         "meaning": "Mass"},
                                "threshold": 0.5}],
                   "saliency": saliency},
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("cls-models")
    net = _train()
    example = torch.zeros((1, 1, *SIZE))
    (root / "blob-onnx").mkdir()
    onnx_path = root / "blob-onnx" / "model.onnx"
    torch.onnx.export(net, (example,), str(onnx_path), dynamo=False, input_names=["x"],
                      output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "n", 2: "d", 3: "h", 4: "w"},
                                    "logits": {0: "n"}})
    (root / "blob-ts").mkdir()
    ts_path = root / "blob-ts" / "model.pt"
    torch.jit.save(torch.jit.script(net), str(ts_path))
    for name, path, backend, sal in (
            ("blob-onnx", onnx_path, "onnx",
             {"method": "occlusion", "patch": [4, 4, 4], "stride": [2, 2, 2]}),
            ("blob-ts", ts_path, "torchscript",
             {"method": "gradcam", "layer": "features", "head": "head"})):
        m = _manifest(name, path.name, path.read_bytes(), backend, sal)
        (path.parent / "model.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    return ModelRegistry(root)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tuple[int, ...]]]:
    root = tmp_path_factory.mktemp("cls-series")
    rng = np.random.default_rng(123)
    out = {}
    for name, center in (("positive", (11, 5, 9)), ("negative", None)):
        arr = _volume(rng, center)
        write_series(arr, root / name, modality="CT", spacing=(2.0, 1.0, 1.0))
        out[name] = (root / name, center)
    return out  # type: ignore[return-value]


def _run(registry: ModelRegistry, name: str, folder: Path) -> InferenceResult:
    return registry.run(name, load_volume(folder))


@pytest.mark.parametrize("model", ["blob-onnx", "blob-ts"])
def test_classifies_and_explains(registry: ModelRegistry, series, model: str) -> None:  # type: ignore[no-untyped-def]
    pos = _run(registry, model, series["positive"][0])
    neg = _run(registry, model, series["negative"][0])
    (cp,), (cn,) = pos.classifications, neg.classifications
    assert cp.positive and cp.probability > 0.9, cp.probability
    assert not cn.positive and cn.probability < 0.1, cn.probability
    assert cp.spec.code.meaning == "Mass"
    sal = cp.saliency
    assert sal is not None and sal.shape == pos.volume.shape and sal.dtype == np.float32
    assert 0.0 <= sal.min() and sal.max() == pytest.approx(1.0)
    center = np.array(series["positive"][1])
    peak = np.array(np.unravel_index(int(sal.argmax()), sal.shape))
    assert np.linalg.norm(peak - center) <= BLOB_RADIUS + 2, (peak, center)
    idx = np.indices(sal.shape)
    inside = sum((idx[a] - center[a]) ** 2 for a in range(3)) <= BLOB_RADIUS ** 2
    assert sal[inside].mean() > 3 * sal[~inside].mean()


def test_onnx_and_torchscript_agree(registry: ModelRegistry, series) -> None:  # type: ignore[no-untyped-def]
    a = _run(registry, "blob-onnx", series["positive"][0]).classifications[0].probability
    b = _run(registry, "blob-ts", series["positive"][0]).classifications[0].probability
    assert a == pytest.approx(b, abs=1e-4)
