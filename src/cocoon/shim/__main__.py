"""``python -m cocoon.shim``: the same as ``containerd-shim-cocoon-v2``."""

import sys

from cocoon.shim.main import main

sys.exit(main())
