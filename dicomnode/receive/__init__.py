"""Receiving: the DICOM SCP (C-ECHO, C-STORE): handlers -> statuses, pump, response encoders.

The node process around it (receiving processes, supervision) is :mod:`dicomnode.node`.
"""

from __future__ import annotations

from dicomnode.receive.scp import StorageSCP

__all__ = ["StorageSCP"]
