"""Tiny models and synthetic data shared by the tests (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification

from pegp_hf import PEGPTrainingArguments

IMAGE = 8


def plain_vit(num_labels: int = 4, seed: int = 0, hidden: int = 32) -> ViTForImageClassification:
    """A 2-layer ViT for 8x8 one-channel images (4x4 patches: 5 tokens), no PET yet."""
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=IMAGE, patch_size=4, num_channels=1, num_labels=num_labels)  # fmt: skip
    return ViTForImageClassification(config)


def tiny_vit(
    num_labels: int = 4, seed: int = 0, rank: int = 4, hidden: int = 32, targets=("q_proj", "v_proj"), dropout=0.0
):
    """:func:`plain_vit` with LoRA on ``targets`` and a trainable head."""
    model = plain_vit(num_labels, seed, hidden)
    lora = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=list(targets), modules_to_save=["classifier"]
    )
    return get_peft_model(model, lora)


def synthetic_images(num_labels: int = 4, per_class: int = 24, seed: int = 0) -> Dataset:
    """Fixed class patterns plus ``seed``-dependent noise: ``pixel_values`` (1, 8, 8) float32 and ``label``."""
    prototypes = np.random.default_rng(1234).normal(size=(num_labels, 1, IMAGE, IMAGE)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_labels), per_class)
    pixels = prototypes[labels] + 0.5 * rng.normal(size=(len(labels), 1, IMAGE, IMAGE)).astype(np.float32)
    return Dataset.from_dict({"pixel_values": pixels, "label": labels}).with_format("torch")


def training_args(output_dir, **overrides) -> PEGPTrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        num_train_epochs=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        threshold=0.999,
        feature_samples=64,
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    defaults.update(overrides)
    return PEGPTrainingArguments(**defaults)


def lora_layer_outputs(model, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every LoRA-adapted linear layer (base + LoRA) on ``pixel_values``, eval mode, no grad."""
    from peft.tuners.lora import LoraLayer

    outputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            handles.append(
                module.register_forward_hook(lambda m, a, o, n=name: outputs.__setitem__(n, o.detach().clone()))
            )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(pixel_values=pixel_values)
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return outputs


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class AtTaskStart(TrainerCallback):
    """Calls ``fn(model)`` when task ``index`` (0-based) starts training and keeps the result in ``.result``."""

    def __init__(self, index: int, fn) -> None:
        self.index, self.fn, self.calls, self.result = index, fn, 0, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.calls == self.index:
            self.result = self.fn(model)
        self.calls += 1


def distributed_case(output_dir, per_device_batch: int, **overrides):
    """The run the 2-process test and its single-process reference share: same model, tasks and global batch 16
    (``overrides`` go to the TrainingArguments, e.g. a DeepSpeed config)."""
    from pegp_hf import class_incremental_tasks

    tasks = class_incremental_tasks(
        synthetic_images(num_labels=4, per_class=16), synthetic_images(num_labels=4, per_class=8, seed=1), 2, seed=0
    )
    args = training_args(
        output_dir, per_device_train_batch_size=per_device_batch, per_device_eval_batch_size=16,
        gradient_accumulation_steps=16 // (per_device_batch * _world_size()), optim="sgd", optim_args="momentum=0.9",
        threshold=0.99, feature_samples=24, max_grad_norm=1.0, dataloader_pin_memory=False, **overrides,
    )  # fmt: skip
    return tiny_vit(hidden=64, rank=4), tasks, args


def distributed_clip_case(output_dir, per_device_batch: int):
    """A tiny CLIP class-name classifier with LoRA on both towers, its 2-task sequence and arguments (global batch
    16), trained with :class:`~pegp_hf.multimodal.PrototypeReplayObjective` replaying the old class means exactly
    (noise 0): the 2-process replay test and its single-process reference share it. ``(model, tasks, args,
    objective, callbacks)``."""
    from pegp_hf import class_incremental_tasks
    from pegp_hf.multimodal import PrototypeReplayObjective, RevealSeenClasses
    from pegp_hf.tuners import get_pet_model

    tasks = class_incremental_tasks(
        synthetic_images(num_labels=4, per_class=16), synthetic_images(num_labels=4, per_class=8, seed=1), 2, seed=0
    )
    model = get_pet_model(tiny_clip_classifier(), "lora", width=4, layers="all", target_modules=("q_proj", "v_proj"))
    args = training_args(
        output_dir, per_device_train_batch_size=per_device_batch, per_device_eval_batch_size=16,
        gradient_accumulation_steps=16 // (per_device_batch * _world_size()), loss_classes="seen",
        threshold=0.99, feature_samples=24, dataloader_pin_memory=False,
    )  # fmt: skip
    return model, tasks, args, PrototypeReplayObjective(weight=1.0, noise=0.0), [RevealSeenClasses()]


def refit_clip_case(output_dir, per_device_batch: int):
    """:func:`distributed_clip_case` with the projections saved with the adapter and the stored embeddings replayed,
    the text projection re-fitted after each task against task 2's test images as the reference set."""
    from pegp_hf.multimodal import PrototypeReplayObjective
    from pegp_hf.multimodal.clip import get_clip_pet_model
    from pegp_hf.multimodal.refit import TextProjectionRefit

    _, tasks, args, _, callbacks = distributed_clip_case(output_dir, per_device_batch)
    model = get_clip_pet_model(
        tiny_clip_classifier(), "lora", width=4, layers="all", target_modules=("q_proj", "v_proj")
    )
    objective = PrototypeReplayObjective(weight=1.0, noise=0.0, spread="stored",
                                         refit=TextProjectionRefit(10.0, tasks[1].test))  # fmt: skip
    return model, tasks, args, objective, callbacks


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


CLIP_WORDS = ["a", "photo", "of", "the", "an", "image", "drawing", "bad", "close-up", ".", "circle", "square",
              "cross", "bar", "dot", "ring"]  # fmt: skip


def tiny_clip_tokenizer():
    """A word-level tokenizer built in memory (no download): ``[BOS] words [EOS]``, padded with ``[PAD]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *CLIP_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def tiny_clip(seed: int = 0, image_size: int = IMAGE, channels: int = 1):
    """A 2-layer CLIPModel (hidden 32, ``image_size`` images, patches of 4) that pools the text at ``[EOS]``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=4 + len(CLIP_WORDS), max_position_embeddings=16, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3),
        vision_config=dict(**tower, image_size=image_size, patch_size=4, num_channels=channels),
        projection_dim=16,
    )  # fmt: skip
    return CLIPModel(config).eval()


CLIP_NAMES = ["circle", "square", "cross", "bar"]
CLIP_TEMPLATES = ["a photo of a {} .", "an image of the {} ."]


def with_captions(split: Dataset, names: list[str], seed: int = 0) -> Dataset:
    """``split`` plus a ``caption`` column: each row's class name in one of the two :data:`CLIP_TEMPLATES`."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.with_format(None)["label"])
    captions = [CLIP_TEMPLATES[k].format(names[y])
                for k, y in zip(rng.integers(2, size=len(labels)), labels, strict=True)]  # fmt: skip
    return split.with_format(None).add_column("caption", captions).with_format("torch")


def tiny_clip_classifier(seed: int = 0, **clip_options):
    """:func:`tiny_clip` as a class-name classifier of the 4 :data:`CLIP_NAMES` in the :data:`CLIP_TEMPLATES`."""
    from pegp_hf.multimodal import CLIPForClassNameClassification

    return CLIPForClassNameClassification(tiny_clip(seed, **clip_options), tiny_clip_tokenizer(), CLIP_NAMES,
                                          CLIP_TEMPLATES)  # fmt: skip


def clip_tasks(seed: int = 0):
    """Two class-split tasks of captioned synthetic images (4 classes, 24 training and 8 test images each)."""
    from pegp_hf import class_incremental_tasks

    train = with_captions(synthetic_images(num_labels=4), CLIP_NAMES, seed)
    test = with_captions(synthetic_images(num_labels=4, per_class=8, seed=1), CLIP_NAMES, seed + 1)
    return class_incremental_tasks(train, test, 2, seed=0)


def matrices(trainer) -> dict[str, np.ndarray]:
    """Every ``T x T`` matrix of a trainer's results, by name (NaN where not measured)."""
    return {name: matrix.values for name, matrix in trainer.results.matrices.items()}


CHAT_WORDS = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n", "which", "topic", "?", "options", ":",
              "text", ".", ",", "answer", "with", "one", "of", "the", "red", "blue", "cat", "dog", "sun", "rain",
              "a", "b", "c", "d", "e", "f", "g", "h", "Options", "Text", "Answer"]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} \n {{ m['content'] }} <|im_end|> \n {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant \n {% endif %}"
)


def tiny_chat_tokenizer():
    """A word-level chat tokenizer built in memory (no download): ChatML-like template, ``<|im_end|>`` ends a turn
    and pads; words split on spaces, ``.``, ``,``, ``?`` and ``:`` are tokens of their own."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[UNK]", *CHAT_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), "isolated"), pre_tokenizers.Split(Regex(r"[.,?:]"), "isolated"),
        pre_tokenizers.Split(" ", "removed"),
    ])  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A random ``LlamaForCausalLM`` from a config (grouped-query attention, 4 heads, 2 key / value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def counting_sequences(first_token: int, step: int, count: int, seed: int, length: int = 12) -> Dataset:
    """``count`` sequences over tokens ``first_token .. first_token + 7`` that follow ``t -> t + step (mod 8)``:
    plain next-token data (``labels`` = ``input_ids``; the model shifts them)."""
    starts = np.random.default_rng(seed).integers(0, 8, size=count)
    ids = first_token + (starts[:, None] + step * np.arange(length)[None, :]) % 8
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    return Dataset.from_dict(data).with_format("torch")


def counting_tasks():
    """Two next-token tasks for a 32-token vocabulary: counting by 1 over tokens 0-7, then by 3 over tokens 8-15."""
    from pegp_hf import dataset_tasks

    return dataset_tasks({
        "count-by-1": (counting_sequences(0, 1, 64, seed=0), counting_sequences(0, 1, 16, seed=1)),
        "count-by-3": (counting_sequences(8, 3, 64, seed=2), counting_sequences(8, 3, 16, seed=3)),
    })  # fmt: skip
