"""A causal language model trained with its own loss through the same trainer: PEGP keeps task 1's loss and logits.

A tiny random ``LlamaForCausalLM`` (built from a config) carries PEFT LoRA on the query / value projections of its
first layer, whose inputs are the RMS-normalised token embeddings: task 1 uses tokens 0-7 and task 2 tokens 8-15, so
the features of task 1 span 8 of the 32 dimensions, and task 2 has room to learn.
"""

import numpy as np
import pytest
import torch
from helpers import AtTaskStart, counting_sequences, counting_tasks, training_args
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pegp_hf import ContinualPEGPTrainer, ModelLossObjective, dataset_tasks


def lora_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


@torch.no_grad()
def logits_and_loss(model, batch: dict) -> tuple[torch.Tensor, float]:
    model.eval()
    inputs = {key: value.to(model.device) for key, value in batch.items()}
    outputs = model(**inputs)
    return outputs.logits.detach().clone(), float(outputs.loss)


def run(tmp_path, method: str):
    sequence = counting_tasks()
    old = sequence[0].test[:]
    args = training_args(tmp_path / method, method=method, optim="adamw_torch", learning_rate=0.05, num_train_epochs=6,
                         threshold=1.0, feature_samples=64, per_device_eval_batch_size=16)  # fmt: skip
    trainer = ContinualPEGPTrainer(model=lora_llama(), args=args, tasks=sequence)
    seen = {}
    trainer.add_callback(AtTaskStart(1, lambda model: seen.update(
        old=logits_and_loss(model, old), new=logits_and_loss(model, sequence[1].test[:]))))  # fmt: skip
    trainer.train()
    after = {"old": logits_and_loss(trainer.model, old), "new": logits_and_loss(trainer.model, sequence[1].test[:])}
    return trainer, seen, after


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {method: run(root, method) for method in ("pegp", "sequential")}


def test_the_model_loss_objective_is_chosen_and_judges_by_the_per_task_loss(runs):
    trainer, _, _ = runs["pegp"]
    assert isinstance(trainer.objective, ModelLossObjective)
    results = trainer.continual_results()
    assert results["headline"] == "loss" and results["loss"]["higher_is_better"] is False
    loss = np.array(results["loss"]["matrix"], dtype=float)
    assert np.isnan(loss[1, 0]) and not np.isnan(loss[np.triu_indices(2)]).any()
    assert results["average"] == pytest.approx(loss[:, 1].mean()) and "acc" not in results  # a loss is no accuracy
    assert {name for name in trainer.projector.tensors} and all(
        "layers.0.self_attn" in name for name in trainer.projector.tensors
    )
    logged = [log for log in trainer.state.log_history if "task_1_loss" in log]
    assert logged  # Trainer.evaluate ran per task, logged as usual


def test_pegp_keeps_task_1_loss_and_logits_while_task_2_is_learned(runs):
    trainer, before, after = runs["pegp"]
    torch.testing.assert_close(after["old"][0], before["old"][0], rtol=0, atol=2e-5)
    assert after["old"][1] == pytest.approx(before["old"][1], abs=1e-5)
    loss = trainer.results.matrices["loss"].values
    assert loss[0, 1] == pytest.approx(loss[0, 0], abs=1e-5)  # the evaluator's matrix says the same
    assert after["new"][1] < before["new"][1] - 0.3  # task 2 was learned (its loss fell by 0.3 nats or more)
    dims = trainer.projector.dims()
    lora_a = {name: k for name, k in dims.items() if "lora_A" in name}
    assert lora_a and all(k == 16 for k in lora_a.values())  # 8 token directions per task, of 32: room was left


def test_sequential_moves_task_1_loss_and_logits(runs):
    trainer, before, after = runs["sequential"]
    drift = (after["old"][0] - before["old"][0]).abs().max().item()
    assert drift > 1e-2, drift
    loss = trainer.results.matrices["loss"].values
    assert abs(loss[0, 1] - loss[0, 0]) > 1e-3
    assert after["new"][1] < before["new"][1] - 0.3


def test_a_seq2seq_model_trains_with_its_own_loss_and_its_decoder_is_protected(tmp_path):
    """T5 needs the labels to build its decoder inputs, in training and in the feature pass alike; LoRA on every
    query / value of its encoder and decoder, eps 0.99: pegp keeps task 1's loss far better than sequential."""
    from transformers import T5Config, T5ForConditionalGeneration

    def t5():
        torch.manual_seed(0)
        config = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
        return get_peft_model(T5ForConditionalGeneration(config), LoraConfig(r=4, target_modules=["q", "v"]))

    sequence = dataset_tasks({
        "copy-1": (counting_sequences(1, 1, 32, seed=0), counting_sequences(1, 1, 8, seed=1)),
        "copy-3": (counting_sequences(9, 3, 32, seed=2), counting_sequences(9, 3, 8, seed=3)),
    })  # fmt: skip
    drift, trainers = {}, {}
    for method in ("pegp", "sequential"):
        args = training_args(tmp_path / method, method=method, optim="adamw_torch", learning_rate=0.01,
                             threshold=0.99, feature_samples=32)  # fmt: skip
        trainers[method] = ContinualPEGPTrainer(model=t5(), args=args, tasks=sequence)
        trainers[method].train()
        loss = trainers[method].results.matrices["loss"].values
        assert np.isfinite(loss[np.triu_indices(2)]).all()
        drift[method] = abs(loss[0, 1] - loss[0, 0])
    dims = trainers["pegp"].projector.dims()
    assert any(".decoder." in name and k > 0 for name, k in dims.items())  # features came from the decoder too
    assert any(".encoder." in name and k > 0 for name, k in dims.items())
    assert drift["pegp"] < 0.25 * drift["sequential"], drift


def next_token_accuracy(prediction) -> dict[str, float]:
    """``compute_metrics``: percent of shifted label tokens whose arg-max logit is right."""
    logits, labels = prediction.predictions, prediction.label_ids
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    return {"token_accuracy": float(100 * (predicted == target)[target != -100].mean())}


def test_compute_metrics_fills_more_matrices_and_a_missing_one_is_named(tmp_path):
    args = training_args(tmp_path, optim="adamw_torch", learning_rate=0.05, threshold=1.0, feature_samples=64)
    objective = ModelLossObjective(metrics=["token_accuracy"])
    trainer = ContinualPEGPTrainer(model=lora_llama(), args=args, tasks=counting_tasks(), objective=objective,
                                   compute_metrics=next_token_accuracy)  # fmt: skip
    trainer.train()
    accuracy = trainer.results.matrices["token_accuracy"]
    assert accuracy.higher_is_better and trainer.results.headline == "loss"
    assert ((accuracy.values[np.triu_indices(2)] >= 0) & (accuracy.values[np.triu_indices(2)] <= 100)).all()
    assert accuracy.values[0, 1] == accuracy.values[0, 0]  # pegp keeps task 1's predictions
    missing = ContinualPEGPTrainer(model=lora_llama(), args=training_args(tmp_path / "missing"), tasks=counting_tasks(),
                                   objective=ModelLossObjective(metrics=["bleu"]))  # fmt: skip
    with pytest.raises(ValueError, match=r"no 'task_1_bleu'.*compute_metrics"):
        missing.train()
