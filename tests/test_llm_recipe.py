"""The language recipe's embedded default, shortened: the real SmolLM2 and real text from the wheels of
offline-wheels.txt, one step per task, every method and measure."""

import json

import pytest

from recipes import llm_continual


def test_the_embedded_default_runs_offline_and_writes_results_and_plots(tmp_path, capsys):
    pytest.importorskip("gguf", reason="pip install -e '.[llm]'")
    summary = llm_continual.main([
        "--output_dir", str(tmp_path), "--tasks", "reuters", "tweets", "--train_size", "8", "--test_size", "4",
        "--max_steps", "1", "--general_texts", "4", "--feature_samples", "8", "--reference_texts", "4",
        "--disable_tqdm", "true",
    ])  # fmt: skip
    assert set(summary) == {"pegp", "sequential", "joint"}
    for method in ("pegp", "sequential"):
        results = summary[method]
        assert results["headline"] == "accuracy" and results["tasks"] == ["reuters", "tweets"]
        assert results["trained_from_layer"] == 22  # LoRA on the top 8 of 30 layers, the bottom run once
        assert len(results["task_metrics"]) == 2 and "answer_agreement" in results["task_metrics"][1]
        assert results["initial_metrics"]["general_perplexity"] > 1
    assert sum(summary["pegp"]["subspace_dims"].values()) > 0 == sum(summary["sequential"]["subspace_dims"].values())
    assert summary["pegp"]["initial_metrics"]["reference_rows"] == 4  # the model's own answers to 4 chitchat turns
    assert summary["pegp"]["pegp_reference_texts"] == 4
    assert "reference_rows" not in summary["sequential"]["initial_metrics"]
    assert len(summary["joint"]["accuracy_per_task"]) == 2
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"pegp", "sequential", "joint"}
    for plot in ("accuracy_matrix_pegp.png", "general_ability.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert "joint" in capsys.readouterr().out
