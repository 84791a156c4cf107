"""Pure data-curation and data-selection algorithms.

Everything here works on numpy arrays and plain Python values: no Ray, no I/O,
deterministic for a given seed. `pipeline/` wraps these functions in Ray stages.
"""
