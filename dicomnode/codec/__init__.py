"""Byte-level DICOM: the fast paths shared by store, infer and encode.

Each module has a general twin in pydicom and a test proving both give the same answer:

* :mod:`dicomnode.codec.walker` -- the strict byte walker over little-endian datasets
  (twin: ``pydicom.dcmread``); used by :mod:`dicomnode.store.parse` on receive and by
  :mod:`dicomnode.codec.reader`.
* :mod:`dicomnode.codec.part10` -- Part 10 bytes: :func:`~dicomnode.codec.part10.to_part10`
  for the objects the node creates (twin: ``Dataset.save_as``) and
  :func:`~dicomnode.codec.part10.part10_header`, the file meta of a received instance.
* :mod:`dicomnode.codec.reader` -- the light header + raw pixel reader of classic
  single-frame images that :mod:`dicomnode.infer.volume` assembles volumes from
  (twin: ``pydicom.dcmread``).
"""
