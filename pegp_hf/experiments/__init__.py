"""What the recipes and the benchmarks share: each experiment's arguments and their defaults, its data, model and
run (:mod:`~pegp_hf.experiments.image`, :mod:`~pegp_hf.experiments.crossmodal`), and the loop that compares methods
(:mod:`~pegp_hf.experiments.runner`). The recipes parse, run and print; the benchmarks call the same functions."""

from pegp_hf.experiments.runner import format_matrix, parse_with_defaults, run_methods

__all__ = ["format_matrix", "parse_with_defaults", "run_methods"]
