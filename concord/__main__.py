"""`python -m concord`: the concord command."""

import sys

from concord.tools.cli import main

sys.exit(main())
