"""Kernel and collective microbenchmarks (`spd-ext bench ...`)."""
