"""``python -m lepton.coordinator.cli``."""

import sys

from lepton.coordinator.cli.main import main

sys.exit(main())
