"""`spd-ext serve`: a reduced-sync GPT split over N local ranks behind an HTTP API and a
web page. The HTTP front end runs in the launching process; the ranks generate in lock
step (spd_ext.serve.ranks) and the group's first rank streams the tokens back."""

from spd_ext.utils.lazy import lazy_exports

# Loaded on first use: the command line reads the options (spd_ext.serve.options) without
# loading torch.
_EXPORTS = {"ModelSource": "spd_ext.serve.model_source",
            "inspect_source": "spd_ext.serve.model_source",
            "ServeOptions": "spd_ext.serve.options"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
