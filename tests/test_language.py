"""The language path on tiny random models: instruction rows, token features without padding, option scoring against
a brute-force reference, general-ability figures, the frozen bottom's exactness, resume and plain-PEFT loading."""

import shutil

import numpy as np
import pytest
import torch
from helpers import AtTaskStart, matrices, tiny_chat_tokenizer, tiny_llama, training_args
from peft import LoraConfig, PeftModel, get_peft_model

from pegp_hf import ContinualPEGPTrainer, dataset_tasks
from pegp_hf.core import FeatureCovariances, GradientProjector
from pegp_hf.core.capture import token_selection
from pegp_hf.language import (
    GeneralAbilityEvaluator,
    InstructionEvaluator,
    InstructionObjective,
    LabelledText,
    class_subsets,
    greedy_answers,
    instruction_tasks,
    score_options,
)
from pegp_hf.language.frozen_bottom import AnswerOnlyCollator, TopLayers, encode_bottom
from pegp_hf.tuners import find_protected_tensors

WORDS = ["cat", "dog", "sun", "rain", "a", "b", "c", "d", "e", "f", "g", "h"]


def labelled(name: str, labels: list[str], seed: int, size: int = 48) -> LabelledText:
    """Texts of 3 random words with one label-revealing word at a random place."""
    rng = np.random.default_rng(seed)
    cues = ["cat", "dog", "sun", "rain"][: len(labels)]

    def split(count: int) -> tuple[list[str], list[int]]:
        ys = rng.integers(len(labels), size=count).tolist()
        texts = []
        for y in ys:
            words = list(rng.choice(WORDS[4:], size=3))
            words.insert(int(rng.integers(4)), cues[y])
            texts.append(" ".join(words))
        return texts, ys

    return LabelledText(name, *split(size), *split(12), labels, "which topic ?")


def tasks(tokenizer):
    return instruction_tasks([labelled("first", ["red", "blue"], 0), labelled("second", ["a", "b", "c"], 1)],
                             tokenizer, train_size=48, test_size=12, max_text_tokens=4)  # fmt: skip


def pad_collator(tokenizer):
    """Right padding of ``input_ids`` / ``attention_mask`` / ``labels`` (a stand-in for DataCollatorForSeq2Seq)."""

    def collate(rows):
        longest = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id

        def padded(key, value):
            return torch.tensor([list(r[key]) + [value] * (longest - len(r[key])) for r in rows])

        return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", -100)}  # fmt: skip

    return collate


def lora(model, layers=(0, 1)):
    targets = [f"layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "v_proj")]
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))


# ---- instruction rows ----------------------------------------------------------------------------------------------


def test_instruction_rows_put_the_loss_on_the_answer_and_list_every_option():
    tokenizer = tiny_chat_tokenizer()
    sequence = tasks(tokenizer)
    assert [t.name for t in sequence] == ["first", "second"] and not any(t.classes for t in sequence)
    row = sequence[1].test[0]
    answer = [t for t in row["labels"] if t != -100]
    assert row["input_ids"] == row["prompt_ids"] + answer
    assert answer == row["candidate_ids"][row["label"]] and answer[-1] == tokenizer.eos_token_id
    assert [tokenizer.decode(c[:-1]) for c in row["candidate_ids"]] == ["a", "b", "c"]
    assert "Options : a , b , c" in tokenizer.decode(row["prompt_ids"])
    assert set(sequence[0].train.column_names) == {"input_ids", "attention_mask", "labels"}
    halves = class_subsets(labelled("x", ["red", "blue", "a", "b"], 2), [[0, 1], [2, 3]])
    assert [h.label_words for h in halves] == [["red", "blue"], ["a", "b"]]
    assert set(halves[1].train_labels) == {0, 1} and len(halves[0].train_texts) + len(halves[1].train_texts) == 48


# ---- features of text: real tokens only ------------------------------------------------------------------------------


def test_token_selection_keeps_real_tokens_spread_evenly():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    assert token_selection(mask, None).equal(mask.bool())
    chosen = token_selection(mask, 3)
    assert chosen[0].nonzero().squeeze(1).tolist() == [0, 2, 5] and chosen[1].nonzero().squeeze(1).tolist() == [0, 1, 2]


def test_padding_never_reaches_a_basis():
    """The pad token's embedding is the only one with a component on the last axis: with the attention mask, the
    bases of the first layer's LoRA (whose features are the normalised embeddings) have none there."""
    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, -1] = 0.0
        model.model.embed_tokens.weight[tokenizer.pad_token_id] = torch.nn.functional.one_hot(torch.tensor(31), 32)
    model = lora(model, layers=(0,))
    tensors = [t for t in find_protected_tensors(model) if t.kind == "lora_A"]
    batch = pad_collator(tokenizer)([{"input_ids": [3, 4, 5], "attention_mask": [1, 1, 1], "labels": [3, 4, 5]},
                                     {"input_ids": [6, 7], "attention_mask": [1, 1], "labels": [6, 7]}])  # fmt: skip
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()
    reached = {}
    for masked in (True, False):
        with FeatureCovariances(tensors) as capture, torch.no_grad():
            capture.select_tokens(batch["attention_mask"] if masked else None)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        projector = GradientProjector(tensors)
        projector.grow(capture.covariances, threshold=1.0)
        reached[masked] = max(float(basis[-1].abs().max()) for basis in projector.bases.values())
    assert reached[True] < 1e-6 < 0.5 < reached[False]


# ---- scoring ---------------------------------------------------------------------------------------------------------


def varied_options(tokenizer):
    """Test rows whose options have 1, 2 and 3 words, so the option pass pads some of them."""
    return instruction_tasks([labelled("varied", ["red", "blue cat", "a b c"], 3)], tokenizer, train_size=8,
                             test_size=6, max_text_tokens=4)[0].test  # fmt: skip


@torch.no_grad()
def brute_force(model, row) -> tuple[list[float], bool]:
    """Each option's summed log-probability from a full forward pass of prompt + option, and whether
    ``generate`` writes exactly the right option."""
    scores = []
    for option in row["candidate_ids"]:
        logp = model(input_ids=torch.tensor([row["prompt_ids"] + option])).logits[0].log_softmax(-1)
        start = len(row["prompt_ids"])
        scores.append(sum(float(logp[start - 1 + j, token]) for j, token in enumerate(option)))
    right = row["candidate_ids"][row["label"]]
    written = model.generate(torch.tensor([row["prompt_ids"]]), max_new_tokens=len(right), do_sample=False)
    return scores, written[0, len(row["prompt_ids"]) :].tolist() == right


@torch.no_grad()
def test_option_scores_and_exact_match_equal_a_brute_force_reference_for_every_row():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(len(tokenizer))
    test = varied_options(tokenizer)
    assert len({len(option) for option in test[0]["candidate_ids"]}) == 3  # 2, 3 and 4 tokens with the end of turn
    rows = list(test)
    scores, exact = score_options(model, [r["prompt_ids"] for r in rows], rows[0]["candidate_ids"],
                                  [r["label"] for r in rows])  # fmt: skip
    for row, row_scores, row_exact in zip(rows, scores, exact.tolist(), strict=True):
        expected, written = brute_force(model, row)
        assert row_scores.tolist() == pytest.approx(expected, abs=1e-4)
        assert row_exact == written
    answers = greedy_answers(model, [rows[0]["prompt_ids"], rows[1]["prompt_ids"]], 3)
    alone = model.generate(torch.tensor([rows[1]["prompt_ids"]]), max_new_tokens=3, do_sample=False)
    assert answers[1] == alone[0, -3:].tolist()


@torch.no_grad()
def test_instruction_evaluator_figures_equal_the_brute_force_ones():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(len(tokenizer))
    test = varied_options(tokenizer)
    right = exact = 0
    loss = 0.0
    for row in test:
        scores, written = brute_force(model, row)
        right += int(np.argmax(scores)) == row["label"]
        exact += written
        loss -= scores[row["label"]] / len(row["candidate_ids"][row["label"]])
    figures = InstructionEvaluator().evaluate(model, test, batch_size=4)
    assert figures == pytest.approx((100 * right / len(test), 100 * exact / len(test), loss / len(test)), abs=1e-4)
    with pytest.raises(ValueError, match="instruction_tasks"):
        InstructionEvaluator().evaluate(model, test.remove_columns("candidate_ids"))


def test_the_answer_ends_at_the_templates_end_of_turn_not_at_eos():
    """A Gemma-style template ends a turn with its own token, not the end-of-sequence one."""
    tokenizer = tiny_chat_tokenizer()
    tokenizer.eos_token = "<|im_start|>"  # another special token than the one that ends a turn
    row = instruction_tasks([labelled("x", ["red", "blue"], 0)], tokenizer, 4, 2)[0].test[0]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(option[-1] == end and end not in option[:-1] for option in row["candidate_ids"])
    assert [tokenizer.decode(option[:-1]) for option in row["candidate_ids"]] == ["red", "blue"]


# ---- the frozen bottom -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_top_layers_on_the_frozen_bottom_give_the_whole_model_and_its_answer_loss():
    tokenizer = tiny_chat_tokenizer()
    model = lora(tiny_llama(len(tokenizer), layers=3), layers=(2,))
    train = tasks(tokenizer)[0].train.select(range(6))
    encoded = encode_bottom(model, train, start=2)
    assert "input_ids" not in encoded.column_names and encoded[0]["inputs_embeds"].shape[1] == 32
    whole = model(**pad_collator(tokenizer)([train[i] for i in range(6)]))
    batch = AnswerOnlyCollator()([encoded[i] for i in range(6)])
    with TopLayers(model, 2).active():
        top = model(**batch)
    assert float(top.loss) == pytest.approx(float(whole.loss), abs=1e-5)
    for i in range(6):  # the kept logits are the whole model's at the last positions of each row
        n, keep = len(train[i]["input_ids"]), batch["logits_to_keep"]
        torch.testing.assert_close(top.logits[i], whole.logits[i, n - keep : n], atol=1e-5, rtol=1e-5)
    assert len(model.base_model.model.model.layers) == 3  # back in place
    with pytest.raises(ValueError, match="would train"):
        TopLayers(lora(tiny_llama(len(tokenizer), layers=3), layers=(0,)), 2)


def run_sequence(tmp_path, frozen_bottom: bool, crash_at: int | None = None, resume=None, general=None):
    tokenizer = tiny_chat_tokenizer()
    sequence = tasks(tokenizer)
    model = lora(tiny_llama(len(tokenizer), layers=3), layers=(2,))
    collator = pad_collator(tokenizer)
    if frozen_bottom:
        base = tiny_llama(len(tokenizer), layers=3)
        sequence = dataset_tasks({t.name: (encode_bottom(base, t.train, 2), t.test) for t in sequence})
        collator = AnswerOnlyCollator()
    args = training_args(tmp_path, optim="adamw_torch", learning_rate=0.02, threshold=0.99, feature_samples=24,
                         logging_steps=100)  # fmt: skip
    objective = InstructionObjective(train_from_layer=2 if frozen_bottom else None)
    evaluators = [] if general is None else [GeneralAbilityEvaluator(tokenizer, general, ("which topic ?",), 4)]
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=sequence, objective=objective, data_collator=collator,
                                   evaluators=evaluators)  # fmt: skip
    if crash_at is not None:
        trainer.add_callback(AtTaskStart(crash_at, lambda m: (_ for _ in ()).throw(RuntimeError("crash"))))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_training_on_the_frozen_bottom_equals_training_the_whole_model(tmp_path):
    whole = run_sequence(tmp_path / "whole", frozen_bottom=False)
    top = run_sequence(tmp_path / "top", frozen_bottom=True)
    assert whole.results.headline == "accuracy"
    for name, values in matrices(whole).items():
        np.testing.assert_allclose(matrices(top)[name], values, atol=1e-3, equal_nan=True, err_msg=name)
    for (name, a), b in zip(whole.pet.state_dict().items(), top.pet.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)
    for name, basis in whole.projector.bases.items():  # the same features, the same subspaces
        other = top.projector.bases[name]
        assert other.shape == basis.shape, name
        torch.testing.assert_close(other @ other.T, basis @ basis.T, atol=1e-3, rtol=0)


def test_a_crash_on_the_frozen_bottom_restores_the_whole_model_and_resumes_to_the_same_results(tmp_path):
    full = run_sequence(tmp_path / "full", frozen_bottom=True)
    tokenizer = tiny_chat_tokenizer()
    sequence = dataset_tasks({t.name: (encode_bottom(tiny_llama(len(tokenizer), layers=3), t.train, 2), t.test)
                              for t in tasks(tokenizer)})  # fmt: skip
    model = lora(tiny_llama(len(tokenizer), layers=3), layers=(2,))
    args = training_args(tmp_path / "run", optim="adamw_torch", learning_rate=0.02, threshold=0.99, feature_samples=24)
    crashing = ContinualPEGPTrainer(model=model, args=args, tasks=sequence, objective=InstructionObjective(
        train_from_layer=2), data_collator=AnswerOnlyCollator())  # fmt: skip
    crashing.add_callback(AtTaskStart(1, lambda m: (_ for _ in ()).throw(RuntimeError("crash"))))
    with pytest.raises(RuntimeError, match="crash"):
        crashing.train()
    assert len(model.base_model.model.model.layers) == 3  # the whole model again, not its top layer
    resumed = run_sequence(tmp_path / "run", frozen_bottom=True, resume=True)
    for name, values in matrices(full).items():
        np.testing.assert_array_equal(matrices(resumed)[name], values, err_msg=name)


def test_a_crashed_language_sequence_resumes_to_the_same_results_and_loads_in_plain_peft(tmp_path):
    general = ["cat sun a b", "dog rain c d", "sun rain e f"]
    full = run_sequence(tmp_path / "full", frozen_bottom=False, general=general)
    with pytest.raises(RuntimeError, match="crash"):
        run_sequence(tmp_path / "run", frozen_bottom=False, crash_at=1, general=general)
    resumed = run_sequence(tmp_path / "run", frozen_bottom=False, resume=True, general=general)
    for name, values in matrices(full).items():
        np.testing.assert_array_equal(matrices(resumed)[name], values, err_msg=name)
    assert resumed.results.task_metrics == full.results.task_metrics  # the agreement is against the base model
    assert full.results.task_metrics[0]["answer_agreement"] <= 100
    assert full.results.initial_metrics["general_perplexity"] > 1

    folder = tmp_path / "copy"
    shutil.copytree(tmp_path / "full" / "task-2", folder)
    tokenizer = tiny_chat_tokenizer()
    plain = PeftModel.from_pretrained(tiny_llama(len(tokenizer), layers=3), folder).eval()
    ids = torch.tensor([tasks(tokenizer)[0].test[0]["prompt_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, full.model.eval()(input_ids=ids).logits)


def test_general_perplexity_is_the_exponent_of_the_mean_token_loss():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(len(tokenizer))
    evaluator = GeneralAbilityEvaluator(tokenizer, ["cat sun a b c", "dog"], ("which topic ?",), answer_tokens=3)
    ids = tokenizer("cat sun a b c", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(
            model(input_ids=torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:])
        )
    assert evaluator.perplexity(model) == pytest.approx(float(nll.exp()), rel=1e-5)  # "dog" has nothing to predict
    assert [len(answer) for answer in evaluator.answers(model)] == [3]


@torch.no_grad()
def test_the_model_loss_on_instruction_rows_is_the_answer_tokens_mean_loss():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(len(tokenizer))
    rows = [tasks(tokenizer)[1].train[i] for i in range(4)]
    loss = float(model(**pad_collator(tokenizer)(rows)).loss)
    total, count = 0.0, 0
    for row in rows:
        logp = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].log_softmax(-1)
        for position, label in enumerate(row["labels"]):
            if label != -100:
                total -= float(logp[position - 1, label])
                count += 1
    assert count == sum(sum(label != -100 for label in row["labels"]) for row in rows) > 0
    assert loss == pytest.approx(total / count, abs=1e-5)


def test_gpt2_blocks_are_found_by_their_fused_projection_and_its_lora_is_protected(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pegp_hf.tuners import get_pet_model
    from pegp_hf.tuners.discovery import find_block_stacks, hidden_size

    torch.manual_seed(0)
    tokenizer = tiny_chat_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                                      bos_token_id=1, eos_token_id=2))  # fmt: skip
    ((name, stack),) = find_block_stacks(gpt2)
    assert name == "transformer.h" and hidden_size(stack[0]) == 32
    model = get_pet_model(gpt2, "lora", width=4, layers="all", target_modules=("c_attn",))
    trainer = ContinualPEGPTrainer(model=model, args=training_args(tmp_path, optim="adamw_torch", learning_rate=0.01,
                                   feature_samples=16), tasks=tasks(tokenizer), objective=InstructionObjective(),
                                   data_collator=pad_collator(tokenizer))  # fmt: skip
    trainer.train()
    assert {t.kind for t in trainer.projector.tensors.values()} == {"lora_A", "lora_B"}
    assert all(k > 0 for k in trainer.projector.dims().values())
    assert trainer.continual_results()["updates"][1]["max_update_overlap"] < 1e-6


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
@torch.no_grad()
def test_qwen2_and_gemma_decoders_are_found_adapted_and_trained_on_their_frozen_bottom(family):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GemmaConfig,
        GemmaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from pegp_hf.tuners import get_pet_model
    from pegp_hf.tuners.discovery import attention_heads, attention_module, find_block_stacks

    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    if family == "qwen2":
        base = Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    else:  # Gemma scales its embeddings inside the embedding module: the cached states must not be scaled twice
        base = GemmaForCausalLM(GemmaConfig(**shape, head_dim=8)).eval()
    ((name, stack),) = find_block_stacks(base)
    assert name == "model.layers" and attention_heads(attention_module(stack[0])[1]) == (4, 8)
    model = get_pet_model(base, "lora", width=4, layers=[2], target_modules=None)
    adapted = {n.split("base_model.model.")[-1].rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters()
               if ".lora_A." in n}  # fmt: skip
    assert adapted == {"model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"}
    train = tasks(tokenizer)[0].train.select(range(4))
    whole = model(**pad_collator(tokenizer)([train[i] for i in range(4)]))
    batch = AnswerOnlyCollator()([row for row in encode_bottom(model, train, start=2)])
    with TopLayers(model, 2).active():
        top = model(**batch)
    assert float(top.loss) == pytest.approx(float(whole.loss), abs=1e-5)
    if family == "gemma":  # alternating sliding-window layers: a start that shifts the pattern is refused
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        gemma2 = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, layer_types=layer_types)).requires_grad_(False)
        with pytest.raises(ValueError, match="layer_types"):
            TopLayers(gemma2, 1)
        TopLayers(gemma2, 2)  # sliding, full | sliding: the top layer's type is layer 0's
