"""Receiving: the DICOM SCP (C-ECHO, C-STORE) and the node process around it."""

from __future__ import annotations

from dicomnode.receive.node import CompletenessTracker, Node, Service, run_node
from dicomnode.receive.scp import StorageSCP

__all__ = ["CompletenessTracker", "Node", "Service", "StorageSCP", "run_node"]
