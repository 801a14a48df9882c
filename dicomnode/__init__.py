"""dicomnode: a PACS-integrated DICOM network node for medical-imaging AI."""

from __future__ import annotations

__version__ = "0.1.0"
