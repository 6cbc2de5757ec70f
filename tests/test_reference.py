"""Reference protection ("task 0"): what the pre-trained model did on a reference set stays as it was.

A tiny random ``LlamaForCausalLM`` carries PEFT LoRA on the query / value projections of its first layer, whose
inputs are the RMS-normalised token embeddings. The reference set uses tokens 16-23, which no task uses, so their
8 features span 8 of the 32 dimensions; the tasks count over tokens 0-7 and 8-15. With ``reference_threshold=1.0``
LoRA ``A`` starts and stays orthogonal to those 8 directions, so ``B A x_ref = 0`` whatever ``B`` becomes: every
activation of a reference sequence, hence its logits, stays as the pre-trained model computed it.
"""

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import (
    AtTaskStart,
    counting_sequences,
    counting_tasks,
    plain_vit,
    synthetic_images,
    tiny_chat_tokenizer,
    tiny_llama,
    training_args,
)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks
from pegp_hf.core import GradientProjector, ProtectedTensor, module_input
from pegp_hf.core.subspace import max_overlap
from pegp_hf.io.checkpoint import load_subspaces
from pegp_hf.language.reference import own_conversations
from pegp_hf.tuners import AdapterConfig, PrefixConfig, inject_pet

REFERENCE = counting_sequences(16, 5, 32, seed=4)  # the "pre-training" behaviour to keep
HELD_OUT = counting_sequences(16, 7, 8, seed=5)  # other sequences over the same tokens: never seen by any pass


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def lora_llama():
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"])
    return get_peft_model(llama(), lora)


@torch.no_grad()
def logits(model, data: Dataset) -> torch.Tensor:
    model.eval()
    return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.clone()


@torch.no_grad()
def loss(model, data: Dataset) -> float:
    model.eval()
    return float(model(**{key: data[key] for key in ("input_ids", "attention_mask", "labels")}).loss)


def arguments(output_dir, **overrides):
    settings = dict(method="pegp", optim="adamw_torch", learning_rate=0.05, num_train_epochs=6, threshold=1.0,
                    feature_samples=64, per_device_eval_batch_size=16, reference_threshold=1.0)  # fmt: skip
    return training_args(output_dir, **{**settings, **overrides})


def run(output_dir, reference: Dataset | None):
    model = lora_llama()
    before = {"reference": logits(model, REFERENCE[:]), "held_out": logits(model, HELD_OUT[:])}
    sequence = counting_tasks()
    new_task_loss = {}
    trainer = ContinualPEGPTrainer(model=model, args=arguments(output_dir), tasks=sequence, reference_dataset=reference)
    trainer.add_callback(AtTaskStart(1, lambda m: new_task_loss.update(start=loss(m, sequence[1].test[:]))))
    trainer.train()
    new_task_loss["end"] = loss(trainer.model, sequence[1].test[:])
    after = {"reference": logits(trainer.model, REFERENCE[:]), "held_out": logits(trainer.model, HELD_OUT[:])}
    return trainer, before, after, new_task_loss


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return {"reference": run(root / "reference", REFERENCE), "plain": run(root / "plain", None)}


def drift(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).abs().max() / before.abs().max())


def test_reference_outputs_stay_where_the_pretrained_model_put_them(runs):
    _, before, after, _ = runs["reference"]
    # float32 noise: 1.1e-5 of the largest logit after 12 AdamW epochs (torch 2.13, transformers 5.25); without the
    # reference the same logits move by more than 1e-2
    assert drift(before["reference"], after["reference"]) < 5e-5
    assert drift(before["held_out"], after["held_out"]) < 5e-5  # the same features, other sequences
    _, before, after, _ = runs["plain"]
    assert drift(before["reference"], after["reference"]) > 1e-2  # without a reference they move


def test_the_tasks_are_still_learned_next_to_the_reference(runs):
    for name in ("reference", "plain"):
        _, _, _, new_task_loss = runs[name]
        assert new_task_loss["end"] < new_task_loss["start"] - 0.3, name
    with_reference = np.array(runs["reference"][0].continual_results()["loss"]["matrix"], dtype=float)
    plain = np.array(runs["plain"][0].continual_results()["loss"]["matrix"], dtype=float)
    assert with_reference[1, 1] < plain[1, 1] + 0.5  # the reference costs the new task little here


def test_lora_a_starts_and_stays_in_the_null_space_of_the_reference_features(runs, tmp_path):
    trainer, _, _, _ = runs["reference"]
    initial = trainer.results.initial_metrics
    assert initial["reference_rows"] == 32.0
    assert initial["reference_protected_share/lora_A"] == pytest.approx(8 / 32)
    assert "reference_protected_share/lora_B" not in initial  # B is not grown from the reference
    embeddings = trainer.model.get_input_embeddings().weight.detach()[16:24]
    for name, tensor in trainer.projector.tensors.items():
        if tensor.kind == "lora_A":
            weight = tensor.parameter.detach()
            normed = embeddings / embeddings.norm(dim=1, keepdim=True)
            assert float((weight @ normed.T).abs().max()) < 1e-5 * float(weight.abs().max()), name
            # the saved bases start with the reference's 8 directions
            stored = load_subspaces(trainer.args.output_dir + "/task-2/pegp_subspaces.safetensors",
                                    list(trainer.projector.tensors), trainer.pet.weight_key)[name]  # fmt: skip
            assert float(max_overlap(weight, stored[:, :8])) < 1e-5


def test_a_crash_after_task_1_resumes_to_the_same_result_without_redoing_the_reference(runs, tmp_path):
    class CrashError(Exception):
        pass

    def crash(model):
        raise CrashError

    trainer = ContinualPEGPTrainer(model=lora_llama(), args=arguments(tmp_path), tasks=counting_tasks(),
                                   reference_dataset=REFERENCE, callbacks=[AtTaskStart(1, crash)])  # fmt: skip
    with pytest.raises(CrashError):
        trainer.train()
    resumed = ContinualPEGPTrainer(model=lora_llama(), args=arguments(tmp_path), tasks=counting_tasks(),
                                   reference_dataset=REFERENCE)  # fmt: skip
    resumed.projector.null_reference_weights = crash  # the reference pass must not run again
    resumed.train(resume_from_checkpoint=True)
    uninterrupted = runs["reference"][0]
    assert resumed.continual_results()["loss"]["matrix"] == uninterrupted.continual_results()["loss"]["matrix"]
    assert resumed.results.initial_metrics == uninterrupted.results.initial_metrics
    assert resumed.projector.reference_dims == uninterrupted.projector.reference_dims
    assert set(resumed.projector.reference_dims.values()) == {8}  # read back from the subspace file's metadata


def test_task_bases_measure_their_threshold_on_the_features_outside_the_reference():
    """A task whose features lie 99% inside the reference span still gets its own directions: the LoRA A branch
    only ever sees the 1% outside (A U_ref = 0), so that 1% is what must be protected."""
    layer = torch.nn.Linear(32, 4, bias=False)
    tensor = ProtectedTensor("w", "lora_A", layer, "weight", layer, module_input, reference="null")
    projector = GradientProjector([tensor])
    reference = torch.zeros(32, 32, dtype=torch.float64)
    reference[:8, :8] = torch.eye(8, dtype=torch.float64)
    projector.grow({"w": reference}, threshold=0.99, reference=True)
    assert projector.reference_dims == {"w": 8}
    features = torch.randn(200, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    features[:, 8:12] *= 0.02  # about 0.1% of the energy outside the reference span, in 4 directions
    features[:, 12:] = 0
    projector.grow({"w": features.T @ features}, threshold=0.97)
    basis = projector.bases["w"]
    assert basis.shape[1] > 8  # plain GPM would stop at 8: 99.9% of the energy is already captured
    outside = torch.eye(32)[:, 8:12]
    assert float((outside.T @ basis[:, 8:]).norm()) ** 2 > 0.97 * basis[:, 8:].shape[1] - 1e-4  # new ones lie there


def test_an_adapter_whose_output_is_not_zero_is_refused_and_left_as_it_was(tmp_path):
    lora = LoraConfig(r=4, target_modules=["layers.0.self_attn.q_proj"], init_lora_weights=False)  # B random
    model = get_peft_model(llama(), lora)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ContinualPEGPTrainer(model=model, args=arguments(tmp_path), tasks=counting_tasks(),
                                   reference_dataset=REFERENCE)  # fmt: skip
    with pytest.raises(ValueError, match="the adapter's output is not zero at the start"):
        trainer.train()
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())
    assert not trainer.projector.active and trainer.projector.reference_dims == {}
    assert not any(tmp_path.iterdir())


def test_a_reference_that_would_protect_nothing_is_refused_before_the_model_changes(tmp_path):
    model = lora_llama()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    for overrides, reference, message in (
        ({"method": "sequential"}, REFERENCE, "protects the pre-trained model's outputs with pegp"),
        ({}, REFERENCE.select([]), "reference_dataset is empty"),
    ):
        with pytest.raises(ValueError, match=message):
            ContinualPEGPTrainer(model=model, args=arguments(tmp_path, **overrides), tasks=counting_tasks(),
                                 reference_dataset=reference)  # fmt: skip
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())
    prefixed = inject_pet(llama(), PrefixConfig(length=2))
    with pytest.raises(ValueError, match="the prefix adapter has none of these"):
        ContinualPEGPTrainer(model=prefixed, args=arguments(tmp_path), tasks=counting_tasks(),
                             reference_dataset=REFERENCE)  # fmt: skip
    with pytest.raises(ValueError, match="reference_threshold must be in"):
        arguments(tmp_path, reference_threshold=0.0)


def test_own_conversations_hold_the_user_turn_and_the_models_own_greedy_answer():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(len(tokenizer))
    texts = ["which topic ? the red cat", "a dog", "sun and rain . the blue sun"]
    rows = own_conversations(model, tokenizer, texts, answer_tokens=5, max_text_tokens=4, batch_size=2)
    stops = set(tokenizer.all_special_ids)
    assert len(rows) == len(texts)
    for text, row in zip(texts, rows, strict=True):
        short = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:4])
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": short}], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():  # brute force: one whole forward per greedy token
            for _ in range(5):
                token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(token)
                if token in stops:
                    break
        assert row["input_ids"] == ids
        assert row["attention_mask"] == [1] * len(ids) and row["labels"] == [-100] * len(ids)
    with pytest.raises(ValueError, match="at least one text"):
        own_conversations(model, tokenizer, [])


def test_bottleneck_adapters_keep_the_backbone_on_reference_images_and_sigmoid_ones_are_refused(tmp_path):
    """The adapter's down matrix starts in the null space of the reference features, so act(0) = 0 silences the
    branch there: the backbone's output on reference images stays as it was through two tasks (the head learns)."""
    images = synthetic_images(num_labels=4, per_class=8, seed=9)
    reference = images.select(range(4))  # 4 images x 5 tokens = 20 features in 32 dims: a partial basis
    sequence = class_incremental_tasks(synthetic_images(4, 16), synthetic_images(4, 8, seed=1), 2, seed=0)
    model = inject_pet(plain_vit(), AdapterConfig(width=4, layers=[0, 1], modules_to_save=["classifier"]))

    @torch.no_grad()
    def backbone(m):
        m.eval()
        return m.vit(pixel_values=reference[:]["pixel_values"]).last_hidden_state.clone()

    before = backbone(model)
    args = training_args(tmp_path / "adapter", reference_threshold=1.0, threshold=0.99, optim="adamw_torch",
                         learning_rate=0.01)  # fmt: skip
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=sequence, reference_dataset=reference)
    trainer.train()
    assert trainer.results.initial_metrics["reference_protected_share/adapter_down"] < 1.0
    assert drift(before, backbone(model)) < 1e-5
    moved = [t.parameter for t in trainer.projector.tensors.values() if t.kind == "adapter_up"]
    assert max(float(p.detach().abs().max()) for p in moved) > 1e-3  # the adapters did learn

    sigmoid = inject_pet(plain_vit(), AdapterConfig(width=4, activation="sigmoid", modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="none of these"):
        ContinualPEGPTrainer(model=sigmoid, args=training_args(tmp_path / "sigmoid"), tasks=sequence,
                             reference_dataset=reference)  # fmt: skip
