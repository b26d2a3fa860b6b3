"""``python -m reciprocal_attention.lab.data`` runs ``ra data`` (user errors as one line, exit 2)."""

import sys

from ..cli import main

sys.exit(main(["data", *sys.argv[1:]]))
