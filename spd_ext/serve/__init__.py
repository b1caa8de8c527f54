"""`spd-ext serve`: a reduced-sync GPT split over N local ranks behind an HTTP API and a
web page. The HTTP front end runs in the launching process; the ranks generate in lock
step (spd_ext.serve.ranks) and the group's first rank streams the tokens back."""

from spd_ext.serve.model_source import ModelSource, inspect_source

__all__ = ["ModelSource", "inspect_source"]
