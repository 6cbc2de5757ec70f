"""The README's "Use it" example runs as written, with a tiny model standing in for the Hub one (no download)."""

import re
from pathlib import Path

import numpy as np
from helpers import plain_vit, synthetic_images
from transformers import AutoModelForImageClassification

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_example_runs_unchanged(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Use it", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(  # the Hub model: a tiny ViT with the asked label count
        AutoModelForImageClassification, "from_pretrained", lambda name, num_labels: plain_vit(num_labels=num_labels)
    )
    monkeypatch.chdir(tmp_path)  # output_dir="out"
    data = {"train_ds": synthetic_images(num_labels=10, per_class=4), "test_ds": synthetic_images(10, 2, seed=1)}
    namespace = dict(data)
    exec(compile(code, str(README), "exec"), namespace)  # the README's own code
    trainer = namespace["trainer"]
    assert trainer.results.finished_tasks == 10 and (tmp_path / "out" / "task-10" / "pegp_state.json").is_file()
    matrix = np.array(trainer.continual_results()["accuracy_matrix"], dtype=float)
    assert matrix.shape == (10, 10) and not np.isnan(matrix[:, -1]).any()
    assert str(trainer.continual_results()["forgetting"]) in capsys.readouterr().out
