"""Experiments behind `spd-ext experiment ...`: each prints a table and writes a plot."""
