import sys

from lepton.agent.cli import main

sys.exit(main())
