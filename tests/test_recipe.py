"""The recipe end to end on real offline data (sklearn digits), small enough for CI."""

import json

import numpy as np
import pytest

from recipes import vit_class_incremental


def test_recipe_runs_both_methods_and_writes_results(tmp_path, capsys):
    summary = vit_class_incremental.main(
        [
            "--dataset", "digits", "--num_tasks", "2", "--num_train_epochs", "1", "--feature_samples", "64",
            "--output_dir", str(tmp_path), "--disable_tqdm", "true", "--use_cpu", "true",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "pegp (masked_linear head): class_incremental accuracy matrix" in printed and "sequential" in printed
    stored = json.loads((tmp_path / "results.json").read_text())
    assert set(stored) == {"pegp", "sequential"}
    for method in ("pegp", "sequential"):
        results = json.loads((tmp_path / method / "results.json").read_text())
        assert results["method"] == method and results["data"] == "digits"
        matrix = np.array(results["accuracy_matrix"], dtype=float)
        assert matrix.shape == (2, 2) and np.isnan(matrix[1, 0]) and not np.isnan(matrix[0, 1])
        assert results["acc"] == summary[method]["acc"] == np.mean(matrix[:, 1])
        assert len(results["timings"]) == 2 and all(t["train_seconds"] > 0 for t in results["timings"])
        assert (tmp_path / method / "task-2" / "adapter_model.safetensors").is_file()
        assert (tmp_path / f"accuracy_matrix_{method}.png").stat().st_size > 0
    assert (tmp_path / "acc_forgetting.png").stat().st_size > 0
    assert sum(stored["pegp"]["subspace_dims"].values()) > 0


def test_the_recipe_defaults_are_the_parser_defaults_that_help_shows(capsys):
    from pegp_hf.experiments.image import TRAINING_DEFAULTS, parse_args

    script, args = parse_args([])
    assert (args.learning_rate, args.optim.value, args.threshold, args.output_dir) == (
        0.05, "sgd", 0.99, "outputs/vit_class_incremental"
    )  # fmt: skip
    assert script.methods == ["pegp", "sequential"]
    assert parse_args(["--learning_rate", "0.1"])[1].learning_rate == 0.1  # a flag still wins
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "default: 0.05" in shown and "default: outputs/vit_class_incremental" in shown
    assert set(TRAINING_DEFAULTS) <= set(vars(args))
