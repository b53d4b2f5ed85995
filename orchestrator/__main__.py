import sys

from bcorch.orchestrator.cli import main

sys.exit(main())
