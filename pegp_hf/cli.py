"""The ``pegp-hf`` command, installed with the package: the repository's recipes without a checkout.

    pegp-hf vit [flags]    # recipes/vit_class_incremental.py: pegp_hf.experiments.image
    pegp-hf clip [flags]   # recipes/clip_bitm.py: pegp_hf.experiments.crossmodal
    pegp-hf llm [flags]    # recipes/llm_continual.py: pegp_hf.experiments.language

``pegp-hf <recipe> --help`` lists the recipe's flags with its defaults; every recipe takes ``--config file.yaml``.
Under Accelerate: ``accelerate launch -m pegp_hf.cli vit ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

RECIPES = {
    "vit": ("pegp_hf.experiments.image", "class-incremental image classification with any PET (ViT, DINOv2, ...)"),
    "clip": ("pegp_hf.experiments.crossmodal", "a CLIP-style dual encoder: forgetting, zero-shot, hallucination"),
    "llm": ("pegp_hf.experiments.language", "continual instruction tuning of a causal language model with LoRA"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pegp-hf <recipe> [flags]``; returns the exit status (0, or 2 for an unknown recipe)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="pegp-hf",
        description="Continual parameter-efficient tuning with PEGP gradient projection: run a recipe.",
        epilog="\n".join(f"  {name:<6}{about}" for name, (_, about) in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", choices=list(RECIPES), help="which recipe; its flags follow it (--help for them)")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args(argv[:1])
    module = importlib.import_module(RECIPES[options.recipe][0])
    sys.argv = [f"pegp-hf {options.recipe}", *argv[1:]]  # the recipe's --help names the command
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
