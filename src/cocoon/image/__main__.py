"""``python -m cocoon.image``: same as ``cocoon image build``."""

from cocoon.image.cli import main

raise SystemExit(main())
