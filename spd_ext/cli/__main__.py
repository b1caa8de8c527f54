"""``python -m spd_ext.cli``: the `spd-ext` command."""

import sys

from spd_ext.cli import main

sys.exit(main())
