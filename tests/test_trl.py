"""TRL's SFTTrainer made continual in a few lines: the same PEFT model and one PEGPCallback for every task's trainer.

As in tests/test_language_model.py, LoRA sits on the first layer of a tiny random Llama, whose inputs are the
normalised token embeddings: task 1's text uses 6 words, task 2's 6 others, so task 1's features span 6 of 32
dimensions and its outputs can be kept exactly while task 2 is learned.
"""

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import CHAT_WORDS, tiny_chat_tokenizer, tiny_llama
from peft import LoraConfig, get_peft_model

from pegp_hf.callback import PEGPCallback

trl = pytest.importorskip("trl")

FIRST, SECOND = CHAT_WORDS[18:24], CHAT_WORDS[24:30]


def texts(words: list[str], count: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset.from_dict({"text": [" ".join(rng.choice(words, size=8)) for _ in range(count)]})


def run(tmp_path, with_pegp: bool):
    tokenizer = tiny_chat_tokenizer()
    targets = ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    model = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(r=8, lora_alpha=8, target_modules=targets))
    callbacks = [PEGPCallback(threshold=1.0, feature_batches=8)] if with_pegp else []
    old = tokenizer(list(texts(FIRST, 4, seed=9)["text"]), return_tensors="pt")["input_ids"]
    logits = []
    for index, words in enumerate((FIRST, SECOND)):
        # fp32 (SFTConfig's default is bf16): bf16 rounding alone would move the logits by about 1e-2
        config = trl.SFTConfig(output_dir=str(tmp_path / f"task-{index}"), max_length=16, per_device_train_batch_size=8,
                               num_train_epochs=3, learning_rate=0.02, lr_scheduler_type="constant", report_to="none",
                               save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True, seed=index,
                               bf16=False)  # fmt: skip
        trl.SFTTrainer(model=model, args=config, train_dataset=texts(words, 64, seed=index), processing_class=tokenizer,
                       callbacks=callbacks).train()  # fmt: skip
        model.eval()
        with torch.no_grad():
            logits.append(model(input_ids=old).logits)
    return logits, callbacks


def test_a_callback_keeps_task_1_for_sft_trainer_where_plain_sft_forgets(tmp_path):
    (after_1, after_2), (pegp,) = run(tmp_path / "pegp", with_pegp=True)
    assert pegp.finished_tasks == 2
    assert all(0 < k < 32 for k in pegp.projector.dims().values())  # task 1 left room in the bases
    torch.testing.assert_close(after_2, after_1, rtol=0, atol=2e-5)
    (plain_1, plain_2), _ = run(tmp_path / "plain", with_pegp=False)
    assert (plain_2 - plain_1).abs().max() > 1e-2
