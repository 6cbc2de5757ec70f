"""Runnable training scripts; importable so benchmarks and tests reuse them (``from recipes import ...``)."""
