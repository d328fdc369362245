"""python -m qexp.audit CHECKPOINT [--reference CLEAN] [--quantizer ...]: see qexp.audit."""

import sys

from qexp.audit.cli import main

if __name__ == "__main__":
    sys.exit(main())
