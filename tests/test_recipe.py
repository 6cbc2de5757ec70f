"""The recipe end to end on real offline data (sklearn digits), small enough for CI."""

import json

import numpy as np
import pytest
import torch

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


def _own_images(folder):
    """A DatasetDict of PIL images (4 classes, RGB, 20 x 20) written with save_to_disk: a user's own local data."""
    from datasets import ClassLabel, DatasetDict, Features, Image

    rng = np.random.default_rng(0)

    def split(per_class):
        labels = np.repeat(np.arange(4), per_class)
        images = [(rng.random((20, 20, 3)) * 60 + 50 * label).astype(np.uint8) for label in labels]
        from datasets import Dataset

        features = Features({"img": Image(), "y": ClassLabel(num_classes=4)})
        return Dataset.from_dict({"img": images, "y": labels.tolist()}, features=features)

    DatasetDict({"train": split(8), "holdout": split(3)}).save_to_disk(str(folder))
    return str(folder)


@pytest.mark.parametrize("backbone", ["vit-tiny", "dinov2-small"])
def test_own_local_data_runs_with_no_network(tmp_path, backbone, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the recipe reached for the Hub")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", no_hub)
    data = _own_images(tmp_path / "data")
    common = ["--dataset_name", data, "--image_column", "img", "--label_column", "y", "--backbone", backbone,
              "--num_tasks", "2", "--max_steps", "1", "--feature_samples", "8", "--image_size", "28", "--methods",
              "pegp", "--disable_tqdm", "true", "--plots", "false"]  # fmt: skip
    with pytest.raises(ValueError, match=r"has no split 'validation' .*--test_split"):
        vit_class_incremental.main([*common, "--output_dir", str(tmp_path / "a")])
    summary = vit_class_incremental.main([*common, "--test_split", "holdout", "--output_dir", str(tmp_path / "b")])
    results = summary["pegp"]
    assert results["data"] == data and len(results["accuracy_matrix"]) == 2
    assert sum(results["subspace_dims"].values()) > 0


def test_pet_options_reach_the_tuners_config_and_bad_ones_fail_before_anything_is_loaded(tmp_path, monkeypatch):
    from pegp_hf.experiments import image
    from pegp_hf.tuners import Prefix

    options = '{"init_std": 0.5, "value_prefix": "freeze_after_first_task"}'
    script, _ = image.parse_args(["--pet", "prefix", "--dataset", "digits", "--pet_options", options])
    prefixes = [m for m in image.build_model(script, 10, seed=0).modules() if isinstance(m, Prefix)]
    assert prefixes and all(p.freeze_value for p in prefixes)
    assert 0.4 < float(torch.cat([p.value.flatten() for p in prefixes]).std()) < 0.6  # init_std 0.5, not 0.02

    def no_data(script):
        raise AssertionError("the data were loaded before --pet_options was checked")

    monkeypatch.setattr(image, "load_data", no_data)
    for pet, bad, message in (
        ("prefix", '{"init_std": 0.5', "not valid JSON"),
        ("prefix", "[0.5]", "must be a JSON object"),
        ("prefix", '{"init_sd": 0.5}', r"PrefixConfig has no field \['init_sd'\]"),
        ("lora", '{"lora_alfa": 16}', r"LoraConfig has no field \['lora_alfa'\]"),
        ("lora", '{"r": 16}', r"use \['--pet_width'\] instead"),
    ):
        script, args = image.parse_args(["--pet", pet, "--pet_options", bad, "--output_dir", str(tmp_path / "run")])
        with pytest.raises(ValueError, match=message):
            image.run(script, args)
    assert not any(tmp_path.iterdir())


def test_prefix_init_activations_starts_the_prefixes_from_first_task_tokens(tmp_path, monkeypatch):
    """``--prefix_init activations``: the same seed gives the same prefixes, drawn from the first task's images
    (their scale that of real keys, not ``init_std``); a bad value or another PET fails before the data load."""
    from pegp_hf.experiments import image
    from pegp_hf.tuners import Prefix

    script, _ = image.parse_args(["--pet", "prefix", "--dataset", "digits", "--prefix_init", "activations"])
    train, test, label_column = image.load_data(script)
    first = image.build_tasks(script, train, test, label_column)[0].train
    values = [
        torch.cat(
            [m.value.flatten() for m in image.build_model(script, 10, 0, first).modules() if isinstance(m, Prefix)]
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    assert float(values[0].std()) > 0.05  # the normal start is init_std 0.02
    with pytest.raises(ValueError, match="needs the first task"):
        image.build_model(script, 10, 0)

    monkeypatch.setattr(image, "load_data", lambda script: pytest.fail("data loaded before the flags were checked"))
    script, args = image.parse_args(["--pet", "lora", "--prefix_init", "activations", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="use --pet prefix"):
        image.run(script, args)
    options = ["--pet_options", '{"reparametrization": "mlp"}', "--output_dir", str(tmp_path)]
    script, args = image.parse_args(["--pet", "prefix", "--prefix_init", "activations", *options])
    with pytest.raises(ValueError, match="an MLP prefix starts from its MLP"):
        image.run(script, args)
    script.prefix_init = "real"  # the parser offers the choices; a script setting the field is checked too
    for call in (lambda: image.run(script, args), lambda: image.build_model(script, 10, 0)):
        with pytest.raises(ValueError, match="must be one of"):
            call()
    assert not any(tmp_path.iterdir())
