"""matplotlib, optional everywhere spd_ext draws a plot."""
from __future__ import annotations

import sys


def pyplot():
    """matplotlib's pyplot on a file backend, or None (with a note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'spd_ext[experiments]'); no plot written",
              file=sys.stderr)
        return None
    return plt
