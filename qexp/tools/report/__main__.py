"""`python -m qexp.tools.report DIR`: the same as `qexp-report DIR`."""

import sys

from qexp.tools.report.cli import main

sys.exit(main())
