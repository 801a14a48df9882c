"""Container health check: a DICOM C-ECHO to the node itself (exit 0 = healthy).

Reads the same configuration as the node ($DICOMNODE_CONFIG + environment),
so a changed port or AE title is followed. The calling AE title is
$DICOMNODE_HEALTHCHECK_AET, else HEALTHCHECK; with an allow list
(node.allowed_calling_aets) that lacks it, the first allowed title is used.
"""

from __future__ import annotations

import os
import sys

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.config import load_settings


def main() -> int:
    settings = load_settings()
    node = settings.node
    host = "127.0.0.1" if node.host in ("0.0.0.0", "", "::") else node.host
    calling = os.environ.get("DICOMNODE_HEALTHCHECK_AET", "HEALTHCHECK")
    if node.allowed_calling_aets and calling not in node.allowed_calling_aets:
        calling = node.allowed_calling_aets[0]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(host, node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        print(f"unhealthy: no association with {node.ae_title}@{host}:{node.port}",
              file=sys.stderr)
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code != 0:
        print(f"unhealthy: C-ECHO status {code!r}", file=sys.stderr)
        return 1
    print(f"healthy: C-ECHO to {node.ae_title}@{host}:{node.port} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
