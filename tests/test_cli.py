"""The recipes as HF example scripts: the installed ``pegp-hf`` command, ``--config file.yaml``, logging that follows
``--log_level``, and the heatmap's axes."""

import logging
import shutil
import subprocess

import pytest
import transformers

from pegp_hf import cli, plots
from pegp_hf.experiments import image
from pegp_hf.experiments.runner import setup_logging


def test_the_installed_command_lists_the_recipes():
    command = shutil.which("pegp-hf")
    assert command is not None, "pip install -e . installs the pegp-hf console script"
    shown = subprocess.run([command, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in shown for name in ("vit", "clip", "llm"))


def test_a_recipe_help_shows_its_own_defaults_under_the_command_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["vit", "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert shown.startswith("usage: pegp-hf vit") and "default: outputs/vit_class_incremental" in shown
    assert "--config" in shown


def test_an_unknown_recipe_is_named():
    with pytest.raises(SystemExit) as exit_:
        cli.main(["vitt"])
    assert exit_.value.code == 2


def test_a_config_file_replaces_the_defaults_and_flags_win(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rate: 1e-3\noptim: adamw_torch\nmethods: [pegp, head_only]\nthreshold: 0.9\n")
    script, args = image.parse_args(["--config", str(config), "--threshold", "0.95"])
    assert args.learning_rate == 1e-3 and args.optim.value == "adamw_torch"  # YAML's "1e-3" string is parsed as a flag
    assert script.methods == ["pegp", "head_only"]
    assert args.threshold == 0.95  # the command line wins over the file
    assert args.num_train_epochs == image.TRAINING_DEFAULTS["num_train_epochs"]  # untouched defaults stay the recipe's


@pytest.mark.parametrize(
    ("text", "message"),
    [("learning_rat: 0.1\n", r"does not have: \['learning_rat'\]"), ("- 1\n- 2\n", "must hold a mapping"),
     ("a: [\n", "not valid YAML")],
)  # fmt: skip
def test_a_bad_config_file_is_named(tmp_path, text, message):
    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        image.parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match="no such file"):
        image.parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_logging_follows_the_process_log_level(tmp_path):
    before = transformers.utils.logging.get_verbosity()
    try:
        _, args = image.parse_args(["--log_level", "info", "--output_dir", str(tmp_path)])
        setup_logging(args)
        assert logging.getLogger("pegp_hf").level == logging.INFO
        assert transformers.utils.logging.get_verbosity() == logging.INFO
        _, args = image.parse_args(["--log_level", "error", "--output_dir", str(tmp_path)])
        setup_logging(args)
        assert logging.getLogger("pegp_hf").getEffectiveLevel() == logging.ERROR
    finally:
        transformers.utils.logging.set_verbosity(before)
        logging.getLogger("pegp_hf").setLevel(logging.NOTSET)


def test_the_heatmap_colour_bar_has_no_task_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    ticks = {}
    savefig = Figure.savefig

    def record(figure, *args, **kwargs):  # what is on the axes when the file is written
        ticks["axes"] = [list(axis.get_xticks()) for axis in figure.axes]
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    plots.plot_accuracy_matrix([[90.0, 80.0], [None, 95.0]], tmp_path / "a.png", "A")
    heatmap, colour_bar = ticks["axes"]
    assert heatmap == [0, 1] and colour_bar == []


def test_a_scalar_config_value_of_a_list_flag_is_a_one_item_list(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("methods: pegp\nlora_target_modules: query\n")
    script, _ = image.parse_args(["--config", str(config)])
    assert script.methods == ["pegp"] and script.lora_target_modules == ["query"]


def test_the_trainer_keeps_a_level_set_on_pegp_hf_when_the_log_level_is_passive(tmp_path):
    from helpers import synthetic_images, tiny_vit, training_args

    from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks

    tasks = class_incremental_tasks(synthetic_images(), synthetic_images(seed=1), 2)
    package = logging.getLogger("pegp_hf")
    before = transformers.utils.logging.get_verbosity()  # Trainer sets transformers' verbosity from log_level too
    try:
        package.setLevel(logging.DEBUG)
        ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path), tasks=tasks)
        assert package.level == logging.DEBUG  # passive: the user's choice stands
        ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path, log_level="error"), tasks=tasks)
        assert package.level == logging.ERROR  # an explicit --log_level wins
    finally:
        package.setLevel(logging.NOTSET)
        transformers.utils.logging.set_verbosity(before)
