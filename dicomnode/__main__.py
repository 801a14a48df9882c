from __future__ import annotations

import sys

from dicomnode.cli import main

sys.exit(main())
