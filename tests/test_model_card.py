"""The model card: a huggingface_hub ModelCard whose model-index holds the run's numbers, merged with PEFT's card, and
the trainer's create_model_card / push_to_hub (offline: HfApi patched, HF_HUB_OFFLINE=1)."""

import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetInfo
from helpers import synthetic_images, tiny_vit, training_args
from huggingface_hub import HfApi, ModelCard, RepoUrl

from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks
from pegp_hf.continual.results import ContinualResults, MatrixSpec
from pegp_hf.io.checkpoint import CheckpointError, read_state
from pegp_hf.io.model_card import CardDataset, CardInfo, dataset_of, model_card

BASE = "google/vit-base-patch16-224-in21k"  # only a name: nothing is downloaded
TASKS = class_incremental_tasks(synthetic_images(num_labels=4), synthetic_images(num_labels=4, seed=1), 2, seed=0)
FOLDER = {"adapter_model.safetensors", "adapter_config.json", "pegp_subspaces.safetensors", "pegp_state.json",
          "README.md"}  # fmt: skip


def vit(base_name: str):
    model = tiny_vit()
    model.get_base_model().config._name_or_path = base_name  # what from_pretrained(base_name) would record
    return model


def make(output_dir, base_name: str = BASE, **overrides) -> ContinualPEGPTrainer:
    args = training_args(output_dir, threshold=0.95, num_train_epochs=1, **overrides)
    return ContinualPEGPTrainer(model=vit(base_name), args=args, tasks=TASKS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-task run on a base model with a Hub id: (trainer, output_dir)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        output_dir = tmp_path_factory.mktemp("run")
        trainer = make(output_dir)
        trainer.train()
    return trainer, output_dir


def headline(card: ModelCard) -> dict[str, tuple[str, float]]:
    """metric type -> (name, value) of the model-index results on the tasks' test splits."""
    found = {}
    for result in card.data.eval_results:
        if result.dataset_split == "test":
            assert result.metric_type not in found
            found[result.metric_type] = (result.metric_name, result.metric_value)
    return found


def test_the_model_index_holds_the_headline_acc_forgetting_and_bwt_after_each_task(trained):
    trainer, output_dir = trained
    card = ModelCard.load(output_dir / "task-2" / "README.md")
    summary = trainer.results.summary()
    assert headline(card) == {
        "acc": ("ACC", summary["average"]),
        "forgetting": ("Forgetting", summary["forgetting"]),
        "bwt": ("BWT", summary["bwt"]),
    }
    assert summary["average"] == trainer.continual_results()["acc"]
    assert {r.task_type for r in card.data.eval_results} == {"image-classification"}
    assert card.data.model_name == output_dir.name and card.data.pipeline_tag == "image-classification"
    # task-1's card: the figures after task 1, read off the matrix (one task: nothing forgotten yet)
    after_1 = trainer.results.matrices["class_incremental"].values[0, 0]
    first = ModelCard.load(output_dir / "task-1" / "README.md")
    assert headline(first) == {"acc": ("ACC", after_1), "forgetting": ("Forgetting", 0.0), "bwt": ("BWT", 0.0)}
    assert summary["average"] != after_1  # the two cards are told apart


def test_peft_metadata_survives_and_the_card_names_hyperparameters_and_versions(trained):
    _, output_dir = trained
    card = ModelCard.load(output_dir / "task-2" / "README.md")
    data = card.data
    assert data.library_name == "peft" and data.base_model == BASE
    # "transformers" and the adapter tag come from PEFT's card; the others are pegp_hf's
    assert {f"base_model:adapter:{BASE}", "transformers", "lora", "pegp", "continual-learning"} <= set(data.tags)
    assert data.license is None  # nobody chose one
    lines = card.text.splitlines()
    assert lines.count(f"- PEFT {version('peft')}") == 1  # PEFT's line, not repeated by ours
    for label, name in (("Transformers", "transformers"), ("PyTorch", "torch"), ("Accelerate", "accelerate"),
                        ("Datasets", "datasets"), ("pegp_hf", "pegp_hf")):  # fmt: skip
        assert f"- {label} {version(name)}" in lines
    for setting in ("method: pegp", "threshold: 0.95", "feature_samples: 64", "learning_rate: 0.05", "optimizer: sgd",
                    "num_epochs_per_task: 1", "train_batch_size: 16", "seed: 0"):  # fmt: skip
        assert f"- {setting}" in lines
    assert f'base = AutoModelForImageClassification.from_pretrained("{BASE}", num_labels=4' in card.text
    assert "PeftModel.from_pretrained(base" in card.text
    assert "## Task sequence" in card.text and "| 2 | task-2 |" in card.text and "2405.13383" in card.text
    assert "[More Information Needed]" not in card.text  # PEFT's empty template is not kept


def test_a_local_base_model_stays_out_of_the_metadata_and_is_named_in_the_text(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = tmp_path / "my-vit"
    local.mkdir()
    model = vit(str(local))
    model.save_pretrained(tmp_path / "peft")  # PEFT's card: base_model and an adapter tag with the local path
    peft_card = (tmp_path / "peft" / "README.md").read_text()
    assert f"base_model: {local}" in peft_card
    results = ContinualResults.empty("class_incremental", "accuracy", [MatrixSpec("accuracy")], 2)
    results.record_task(0, {"accuracy": [80.0]}, {}, {}, {})
    state = {"scenario": "class_incremental", "task_names": ["a", "b"], "task_classes": [[0], [1]],
             "config": {"method": "pegp", "threshold": 0.9}}  # fmt: skip
    info = CardInfo("peft", ("lora",), base_model=str(local), pipeline_tag="image-classification")
    card = ModelCard(model_card(state, results, info, ["README.md"], peft_card))
    assert card.data.base_model is None and not any(str(local) in tag for tag in card.data.tags)
    assert "transformers" in card.data.tags and card.data.library_name == "peft"
    assert f"the local model `{local}`" in card.text
    assert headline(card)["acc"] == ("ACC", 80.0)


def test_per_data_set_results_losses_and_held_out_figures():
    """Tasks from two data sets: the sequence's figures, then each data set's rows; a loss headline; figures on
    held-out sets stay apart from the sequence's."""
    values = np.array([[2.0, 2.5, 3.0], [np.nan, 1.0, 1.5], [np.nan, np.nan, 0.5]])
    results = ContinualResults.empty("domain_incremental", "loss", [MatrixSpec("loss", higher_is_better=False)], 3)
    for t in range(3):
        figures = {"general_perplexity": 12.5, "hallucination_rate": None, "match_threshold": 0.3} if t == 2 else {}
        results.record_task(t, {"loss": values[: t + 1, t].tolist()}, figures, {}, {})
    alpaca, dolly = CardDataset("alpaca", "alpaca"), CardDataset("dolly", "dolly")
    info = CardInfo("pegp_hf", ("adapter",), pipeline_tag="text-generation", task_datasets=(alpaca, alpaca, dolly))
    state = {"scenario": "domain_incremental", "task_names": ["a1", "a2", "d"], "task_classes": [[], [], []],
             "config": {"method": "pegp", "threshold": 0.9}}  # fmt: skip
    card = ModelCard(model_card(state, results, info, ["README.md"]))
    by_set = {}
    for r in card.data.eval_results:
        by_set.setdefault((r.dataset_type, r.dataset_name, r.dataset_split), {})[r.metric_type] = r.metric_value
    summary = results.summary()
    assert by_set.pop(("custom", "alpaca + dolly", "test")) == {
        "loss": summary["average"], "forgetting": summary["forgetting"], "bwt": summary["bwt"]
    }  # fmt: skip
    # alpaca = tasks 1, 2: final losses 3.0, 1.5; best earlier 2.0, 1.0 (lower is better)
    assert by_set.pop(("alpaca", "alpaca", "test")) == {"loss": 2.25, "forgetting": 0.75, "bwt": -0.75}
    assert by_set.pop(("dolly", "dolly", "test")) == {"loss": 0.5}  # the last task: nothing to forget yet
    assert by_set == {("custom", "held-out general text", "held-out"): {"general_perplexity": 12.5}}
    assert card.data.datasets == ["alpaca", "dolly"] and card.data.library_name == "pegp_hf"
    assert "load_pet_pretrained(base, snapshot_download(" in card.text


def test_data_sets_are_named_where_datasets_recorded_a_name():
    rows = {"x": [1, 2]}
    assert dataset_of(Dataset.from_dict(rows)) is None
    named = Dataset.from_dict(rows, info=DatasetInfo(dataset_name="cifar100", config_name="default"))
    assert dataset_of(named) == CardDataset("cifar100", "cifar100")
    configured = Dataset.from_dict(rows, info=DatasetInfo(dataset_name="glue", config_name="sst2"))
    assert dataset_of(configured) == CardDataset("glue", "glue (sst2)", "sst2")
    packaged = Dataset.from_dict(rows, info=DatasetInfo(dataset_name="json", builder_name="json"))
    assert dataset_of(packaged) is None


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A fake Hub: upload_folder records (repo, message, revision, folder) and copies into tmp_path/remote/<repo>."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    remote, commits = tmp_path / "remote", []

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
        commits.append((repo_id, commit_message, revision, Path(folder_path)))
        shutil.copytree(folder_path, remote / repo_id, dirs_exist_ok=True)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a push uploads the task folder with upload_folder")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, branch, exist_ok=False, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", refuse)
    return remote, commits


def test_push_to_hub_uploads_the_newest_task_folder_with_its_card(trained, tmp_path, hub):
    trainer, output_dir = trained
    remote, commits = hub
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy)
    pusher = make(copy, hub_model_id="user/pegp-vit")  # a trainer over a finished run's folder: nothing retrained
    pusher.push_to_hub(license="apache-2.0", tags=["vision"], dataset_tags="user/shapes", dataset="Shapes")
    assert [(repo, message) for repo, message, _, _ in commits] == [("user/pegp-vit", "End of training")]
    _, _, revision, folder = commits[0]
    assert folder == copy / "task-2" and revision is None  # not output_dir, not task-1
    assert {path.name for path in (remote / "user" / "pegp-vit").iterdir()} == FOLDER
    assert read_state(remote / "user" / "pegp-vit")["finished_tasks"] == 2
    card = ModelCard.load(remote / "user" / "pegp-vit" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["user/shapes"]
    assert {"vision", "continual-learning", f"base_model:adapter:{BASE}"} <= set(card.data.tags)
    assert card.data.model_name == "pegp-vit"
    sequence = [r for r in card.data.eval_results if r.dataset_split == "test"]
    assert {(r.dataset_type, r.dataset_name) for r in sequence} == {("user/shapes", "Shapes")}
    assert headline(card)["acc"] == ("ACC", trainer.results.summary()["average"])
    assert (copy / "README.md").read_text() == (remote / "user" / "pegp-vit" / "README.md").read_text()

    pusher.push_to_hub(commit_message="again", revision="experiment")
    assert commits[-1][1:] == ("again", "experiment", copy / "task-2")


def test_create_model_card_needs_a_finished_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="holds no task-<k> checkpoint"):
        make(tmp_path).create_model_card(license="mit")
    assert not (tmp_path / "README.md").exists()


def test_the_quick_start_of_a_statistics_head_loads_the_head_too():
    from pegp_hf.io.model_card import _quick_start

    info = CardInfo("peft", ("lora",), base_model="org/vit", pipeline_tag="image-classification", num_labels=10,
                    repo_id="user/run")  # fmt: skip
    for head in ("prototype", "ranpac"):
        code = _quick_start(info, 2, head)
        assert 'ContinualModel.from_pretrained("user/run", base)' in code and "PeftModel" not in code
    assert 'PeftModel.from_pretrained(base, "user/run")' in _quick_start(info, 2, "masked_linear")
