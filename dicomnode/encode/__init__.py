"""Result objects: DICOM SEG, TID 1500 SR and Secondary Capture, ready to send.

The worker calls one function::

    datasets = encode_results(result, sources, formats=("seg", "sr"), options=EncodeOptions(...))

* ``seg`` -- :func:`dicomnode.encode.seg.encode_seg` (one segment per label);
* ``sr``  -- :func:`dicomnode.encode.sr.encode_sr` (TID 1500, references the SEG);
* ``sc``  -- :func:`dicomnode.encode.sc.encode_sc` (burned-in overlays, one image per slice).

UIDs, series numbers and descriptions are deterministic
(:mod:`dicomnode.encode.uids`): encoding the same result twice gives the same
UIDs, so a PACS replaces instead of duplicating.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset

from dicomnode.domain import InferenceResult
from dicomnode.encode.common import (
    DEFAULT_CAVEAT,
    FORMATS,
    EncodeOptions,
    check_formats,
    load_sources,
    validate_result,
)
from dicomnode.encode.sc import encode_sc
from dicomnode.encode.seg import encode_seg
from dicomnode.encode.sr import encode_sr
from dicomnode.logs import kv

__all__ = ["DEFAULT_CAVEAT", "FORMATS", "EncodeOptions", "encode_results", "load_sources",
           "validate_result"]

log = logging.getLogger(__name__)


def encode_results(
    result: InferenceResult,
    sources: Sequence[Dataset] | None = None,
    formats: Sequence[str] = ("seg", "sr"),
    options: EncodeOptions | None = None,
) -> list[Dataset]:
    """Encode one model result as DICOM objects ready to send.

    Parameters
    ----------
    result
        What the model produced for one series version.
    sources
        The source series' datasets (headers suffice, any order). Default:
        read headers only from ``result.volume.paths``.
    formats
        Any of ``"seg"``, ``"sr"``, ``"sc"`` (a destination's choice).
        A format the result has nothing for (``seg`` for a classification-only
        model) is skipped.
    options
        :class:`EncodeOptions`; defaults if ``None``.

    Returns
    -------
    list of pydicom.Dataset
        In order SEG, SR, SC images. Each has file meta and can be saved or sent.

    Raises
    ------
    dicomnode.errors.EncodeError
        The result or the sources cannot be encoded; the message says why.
    """
    options = options or EncodeOptions()
    wanted = check_formats(formats)
    validate_result(result)
    if sources is None:
        sources = load_sources(result)
    out: list[Dataset] = []
    seg = None
    has_seg = result.segmentation is not None
    if has_seg and ("seg" in wanted or "sr" in wanted):
        seg = encode_seg(result, sources, options, validated=True)
        if "seg" in wanted:
            out.append(seg)
    if "sr" in wanted and (has_seg or result.classifications or result.measurements):
        # Without "seg" the SR must not reference an object nobody receives.
        out.append(encode_sr(result, sources, seg if "seg" in wanted else None, options,
                             validated=True))
    if "sc" in wanted and (has_seg or any(c.saliency is not None
                                          for c in result.classifications)):
        out.extend(encode_sc(result, sources, options, validated=True))
    skipped = [f for f in wanted if f not in {_kind(d) for d in out}]
    log.info("encoded results", extra=kv(model=result.model.name, series=result.volume.series_uid,
                                         objects=len(out), formats=",".join(wanted),
                                         skipped=",".join(skipped)))
    return out


def _kind(ds: Dataset) -> str:
    return {"SEG": "seg", "SR": "sr"}.get(str(ds.get("Modality", "")), "sc")
