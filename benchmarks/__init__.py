"""Benchmarks: importable so their smoke modes run as tests (``from benchmarks import cost``)."""
