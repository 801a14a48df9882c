"""TEMPORARY: moved to :mod:`dicomnode.codec.part10`; delete this file when merging issue 9.

``dicomnode/worker.py`` (another part of the refactor) still imports
``dicomnode.encode.fastwrite`` in ``Pipeline.warm_up`` and ``to_part10`` from here in
``Worker._run``; it must import ``from dicomnode.codec.part10 import to_part10``.
"""

from __future__ import annotations

from dicomnode.codec.part10 import to_part10

__all__ = ["to_part10"]
