"""What the receive path's metrics cost per C-STORE (``python -m benchmarks.metrics``).

Measured in one process, in the same run:

* ``off``: :meth:`dicomnode.telemetry.Metrics.instance` while metrics are off
  (``http.enabled: false``): an attribute test;
* ``on``: the same call in prometheus_client's multiprocess mode (a dict lookup
  of the labelled child, two counter increments into mmapped files): what every
  stored instance pays;
* baseline: ``Store.ingest`` of one 512 x 512 CT slice (file written without
  fsync, row committed): the cheapest a stored instance can be.

Prints ns per call and ``on`` as a percentage of the baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.config import load_settings
from dicomnode.store import Store
from dicomnode.store.parse import read_meta
from dicomnode.telemetry import METRICS, Metrics, enable


def _slice(study: str, series: str, i: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "BENCH", i + 1
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((512, 512), np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def per_call_ns(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    t0 = time.perf_counter_ns()
    for _ in range(n):
        call("MODALITY", 0, 524288)  # type: ignore[operator]
    return (time.perf_counter_ns() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--slices", type=int, default=300)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = load_settings(None, environ={}, overrides={
            "storage": {"path": str(root / "storage"), "min_free_mb": 0, "fsync": False},
            "database": {"url": f"sqlite:///{root / 'db.sqlite'}"}})
        off = per_call_ns(Metrics().instance, args.calls)
        enable(root / "metrics")
        on = per_call_ns(METRICS.instance, args.calls)
        study, series = generate_uid(), generate_uid()
        blobs = [_slice(study, series, i) for i in range(args.slices)]
        with Store.open(settings, migrate=True) as store:
            metas = [read_meta(b) for b in blobs]
            t0 = time.perf_counter_ns()
            for meta, blob in zip(metas, blobs, strict=True):
                store.ingest(meta, blob)
            ingest = (time.perf_counter_ns() - t0) / len(blobs)
    print(f"{'per C-STORE':<34} {'ns':>10}")
    print(f"{'metrics off (no-op)':<34} {off:>10.0f}")
    print(f"{'metrics on (multiprocess mmap)':<34} {on:>10.0f}")
    print(f"{'baseline: Store.ingest, 512 KiB':<34} {ingest:>10.0f}")
    print(f"metrics on = {100 * on / ingest:.2f} % of the cheapest ingest "
          f"(off: {100 * off / ingest:.3f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
