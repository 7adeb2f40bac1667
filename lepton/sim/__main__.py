"""``python -m lepton.sim`` (the ``lepton-sim`` command)."""

import sys

from lepton.sim.cli import main

sys.exit(main())
