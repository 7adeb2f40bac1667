"""``python -m lepton.demo`` (the ``lepton-demo`` command)."""

import sys

from lepton.demo.cli import main

sys.exit(main())
