"""Test and demo support: the deterministic photo-like corpus and its hostile-file makers.

Used by the tests, the benchmarks and the flow's demo mode; never imported by the
product's hot path (``import imgtasks`` and the download/thumbnail stages do not load it).
"""
