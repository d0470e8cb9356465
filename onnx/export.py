#!/usr/bin/env python3
"""Export an open_clip CLIP and a CoOp-family prompt learner as a cac-edge bundle.

The bundle (docs/FORMATS.md section 1) holds three ONNX graphs, the tokenizer and a manifest:

    image_zs.onnx   pixel_values [N,3,S,S] float32 -> image_embeds [N,D]  (model.encode_image)
    text_zs.onnx    input_ids    [N,L]     int64   -> text_embeds  [N,D]  (model.encode_text)
    text_ft.onnx    input_ids of "X X X X {}." -> text_embeds [N,D]: positions 1..=n_ctx take
                    the learned context, then the rest of encode_text (CoOp's prompt learner)
    image_ft.onnx   MaPLe/PromptSRC only (--method maple|promptsrc, onnx/deep_prompts.py): the image
                    encoder with the deep vision prompts; text_ft.onnx then also carries the deep
                    text prompts

Examples (run from the repository root with the export venv, see onnx/README.md):

    python onnx/export.py --arch ViT-B-32 --checkpoint open_clip_pytorch_model.bin \\
        --prompt-learner output/coop/prompt_learner/model.pth.tar-50 --out bundles/coop-b32
    python onnx/export.py --arch ViT-B-32 --random-weights --seed 0 --out /tmp/b32-random

The image graph of a vision transformer ships with ONNX Runtime's fused attention (see
fuse_image_graph; --no-fuse-attention keeps the plain graph). --quantize int8-dynamic|int8-static
adds image_zs.int8.onnx (bundle format 2, onnx/quantize.py), checked against the fp32 encoder.

Every graph is checked against PyTorch with ONNX Runtime before the bundle is moved into place
(`--no-parity` skips it). The bundle is written to a temporary directory beside --out and renamed
when complete, so a half-written bundle never appears under the final name.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import safetensors
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tokenizer import build_tokenizer_json  # noqa: E402  (sibling module, not a package)
from bundle_io import (  # noqa: E402  (sibling module: the helpers onnx/quantize.py shares)
    BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, BUNDLE_FORMAT_VERSION_VARIANTS, IMAGE_FILE, IMAGE_FT_FILE, IMAGE_INT8_FILE,
    MANIFEST_FILE, TEXT_FT_FILE, TEXT_ZS_FILE, TOKENIZER_FILE, ExportError, eval_transform, load_pixels, parity_images,
    render_manifest, sha256_file,
)
import deep_prompts  # noqa: E402  (sibling module: MaPLe/PromptSRC prompts and graph wrappers)
from deep_prompts import DEEP_METHODS, DeepPrompts  # noqa: E402

# Expected and harmless here: the TorchScript exporter is chosen on purpose (see export_graph), and
# the advanced-indexing warning concerns negative indices, while EOT pooling indexes by argmax.
warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARITY_IMAGES = REPO_ROOT / "tests" / "fixtures" / "images" / "photos"

ZERO_SHOT_TEMPLATE = "a photo of a {}."
# CoOp's placeholder token; the graph ignores the ids at the context positions.
PLACEHOLDER_TOKEN = "X"
# Without a prompt learner the context starts as CoOp's usual `CTX_INIT`.
PLACEHOLDER_CONTEXT_INIT = "a photo of a"
PROMPT_LEARNER_METHODS = ("coop", "kgcoop", "prograd")
CLIP_VOCAB_SIZE = 49408


# Class names for the text parity check: single and multi-token names, punctuation, non-ASCII,
# and one name long enough to be truncated (end-of-text then sits at the last position).
PARITY_CLASSES = (
    "cat", "astronaut", "rocket", "coffee mug", "sunflower", "fire truck", "crème brûlée",
    "St. Bernard", "t-shirt", "hubble deep field", "42", "very " * 80 + "long name",
)
PARITY_BATCH = 7


@dataclass(frozen=True)
class Tolerance:
    """Bounds on ONNX Runtime vs PyTorch: |diff| <= atol + rtol * max|reference| and row cosine."""

    atol: float
    rtol: float
    min_cosine: float

    def limit(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max())


# fp32 graphs agree with PyTorch to ~1e-6 relative; the bounds leave room for other CPUs' kernels.
TOLERANCE_FP32 = Tolerance(atol=1e-5, rtol=1e-4, min_cosine=1 - 1e-5)
# --fp16 rounds the weights to half precision (about 3 significant digits).
TOLERANCE_FP16 = Tolerance(atol=1e-3, rtol=2e-2, min_cosine=0.999)


@dataclass
class ExportOptions:
    out: Path
    arch: str | None = None
    model_config: Path | None = None
    checkpoint: Path | None = None
    random_weights: bool = False
    seed: int = 0
    prompt_learner: Path | None = None
    method: str | None = None
    ctx_init: str = deep_prompts.DEFAULT_CTX_INIT
    name: str | None = None
    description: str | None = None
    opset: int = 17
    fp16: bool = False
    fuse_attention: bool = True
    quantize: str | None = None
    calibration_images: Path | None = None
    parity_classes: Path | None = None
    force_parity_fail: bool = False
    parity: bool = True
    parity_images: Path = DEFAULT_PARITY_IMAGES
    force: bool = False
    trust_pickle: bool = False


@dataclass
class PromptContext:
    """The learned context vectors [n_ctx, width] that replace the placeholder tokens."""

    ctx: torch.Tensor
    method: str
    source: str

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    @property
    def template(self) -> str:
        return " ".join([PLACEHOLDER_TOKEN] * self.n_ctx) + " {}."


@dataclass
class LoadedClip:
    model: nn.Module
    model_name: str
    tokenizer: SimpleTokenizer
    preprocess: dict
    source: str


@dataclass
class ExportResult:
    bundle_dir: Path
    clip: LoadedClip
    context: PromptContext
    sizes: dict[str, int]
    seconds: dict[str, float]
    parity: dict = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)
    fusion_ft: dict = field(default_factory=dict)  # image_ft.onnx (MaPLe/PromptSRC)
    variant: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Loading the CLIP model and the prompt learner


def load_clip(opts: ExportOptions) -> LoadedClip:
    """Builds the open_clip model (fp32, eval) from a built-in name or a model-config JSON."""
    if opts.random_weights == (opts.checkpoint is not None):
        raise ExportError("give exactly one of --checkpoint PATH or --random-weights")
    model_name = _register_model_name(opts)
    if opts.checkpoint is not None and not opts.checkpoint.is_file():
        raise ExportError(f"{opts.checkpoint}: checkpoint file not found")
    torch.manual_seed(opts.seed)  # random initialisation is then reproducible
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=str(opts.checkpoint) if opts.checkpoint else None,
            precision="fp32",
            device="cpu",
            weights_only=not opts.trust_pickle,
        )
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise _load_error(error, opts, model_name) from error
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    _check_supported(model, model_name, tokenizer)
    source = (
        f"checkpoint {opts.checkpoint.name} (sha256 {sha256_file(opts.checkpoint)[:12]})"
        if opts.checkpoint
        else f"random weights (seed {opts.seed})"
    )
    return LoadedClip(model, model_name, tokenizer, _preprocess_config(model, model_name), source)


def _load_error(error: Exception, opts: ExportOptions, model_name: str) -> ExportError:
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        # Training checkpoints and OpenAI's TorchScript archives hold more than tensors.
        return ExportError(
            f"{opts.checkpoint}: holds pickled objects beyond tensors; if you trust the file, re-run "
            f"with --trust-pickle ({_short_error(error, 'GLOBAL')})"
        )
    hint = f" (does {opts.checkpoint} belong to '{model_name}'?)" if opts.checkpoint else ""
    return ExportError(f"open_clip could not build '{model_name}'{hint}: {_short_error(error)}")


def _short_error(error: Exception, marker: str | None = None, limit: int = 600) -> str:
    """The informative part of a long library message (state-dict key lists run to kilobytes)."""
    lines = str(error).splitlines()
    text = next((line.strip() for line in lines if marker and marker in line), " ".join(lines))
    return text if len(text) <= limit else text[:limit] + " ..."


def _register_model_name(opts: ExportOptions) -> str:
    """open_clip looks models up by name; a config file is registered under its file stem."""
    if opts.model_config is None:
        if not opts.arch:
            raise ExportError("give --arch NAME (an open_clip model, e.g. ViT-B-32) or --model-config FILE")
        if opts.arch.replace("/", "-") not in open_clip.list_models():
            raise ExportError(
                f"'{opts.arch}' is not an open_clip architecture; list them with "
                "python -c 'import open_clip; print(open_clip.list_models())', or pass --model-config FILE"
            )
        return opts.arch
    if not opts.model_config.is_file():
        raise ExportError(f"{opts.model_config}: model config file not found")
    try:
        config = json.loads(opts.model_config.read_text())
    except ValueError as error:
        raise ExportError(f"{opts.model_config}: not valid JSON: {error}") from error
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config if isinstance(config, dict) else {})
    if missing:
        raise ExportError(f"{opts.model_config}: not an open_clip model config, missing {sorted(missing)}")
    open_clip.add_model_config(opts.model_config)
    return opts.model_config.stem


def _check_supported(model: nn.Module, model_name: str, tokenizer) -> None:
    """The text graphs follow `open_clip.CLIP.encode_text`; other text towers are not supported."""
    if type(model) is not open_clip.CLIP:
        raise ExportError(
            f"'{model_name}' builds a {type(model).__name__}; cac-edge bundles need open_clip's "
            "built-in CLIP text transformer (CoOp's prompt construction is defined on it)"
        )
    if model.text_pool_type != "argmax":
        raise ExportError(
            f"'{model_name}' pools text with '{model.text_pool_type}'; the bundle contract takes "
            "the end-of-text token at argmax(input_ids) (text_cfg pool_type 'argmax')"
        )
    if not isinstance(tokenizer, SimpleTokenizer) or model.vocab_size != CLIP_VOCAB_SIZE:
        raise ExportError(
            f"'{model_name}' does not use the CLIP BPE tokenizer with {CLIP_VOCAB_SIZE} tokens; "
            "the bundle's tokenizer.json is that tokenizer"
        )


def _preprocess_config(model: nn.Module, model_name: str) -> dict:
    cfg = dict(model.visual.preprocess_cfg)
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ExportError(f"'{model_name}' has a non-square input {size}; bundles need S x S")
        size = size[0]
    if cfg.get("interpolation", "bicubic") != "bicubic" or cfg.get("resize_mode", "shortest") != "shortest":
        raise ExportError(
            f"'{model_name}' preprocesses with {cfg.get('interpolation')}/{cfg.get('resize_mode')}; "
            "cac-edge implements bicubic resize of the shorter side then centre crop only"
        )
    return {"image_size": int(size), "interpolation": "bicubic",
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}


def load_prompt_learner(opts: ExportOptions, clip: LoadedClip) -> PromptContext | DeepPrompts:
    """The learned context from --prompt-learner, or the placeholder one without it. A MaPLe or
    PromptSRC Dassl checkpoint (recognised by its keys) gives DeepPrompts (onnx/deep_prompts.py)."""
    wants_deep = opts.method in DEEP_METHODS
    if opts.prompt_learner is None:
        if wants_deep:
            raise ExportError(f"--method {opts.method} needs --prompt-learner: the official Dassl checkpoint "
                              f"({deep_prompts.official_file(opts.method)})")
        context = placeholder_context(clip)
    else:
        path = opts.prompt_learner
        if not path.is_file():
            raise ExportError(f"{path}: prompt-learner file not found")
        if path.suffix == ".safetensors":
            if wants_deep:
                raise ExportError(f"{path}: --method {opts.method} reads the official Dassl checkpoint "
                                  f"({deep_prompts.official_file(opts.method)}), not a .safetensors context")
            context = _read_project_prompt_learner(path)
        else:
            checkpoint, state = _read_dassl_checkpoint(path)
            detected = deep_prompts.detect_method(state, path)
            if detected in DEEP_METHODS:
                return _deep_prompt_learner(opts, clip, path, checkpoint, state, detected)
            if wants_deep:
                raise ExportError(
                    f"{path}: --method {opts.method} but the file has no {deep_prompts.method_label(opts.method)} "
                    "prompts (only a CoOp-style 'ctx'); pass the "
                    f"{deep_prompts.official_file(opts.method)} file, or --method coop for a CoOp/KgCoOp/ProGrad one"
                )
            context = _coop_context(path, checkpoint, state)
    if opts.method:
        context.method = opts.method
    _check_context(context, clip)
    return context


def _deep_prompt_learner(opts: ExportOptions, clip: LoadedClip, path: Path, checkpoint: dict, state: dict,
                         detected: str) -> DeepPrompts:
    label = deep_prompts.method_label(detected)
    if opts.method is None:
        print(f"{path.name}: {label} checkpoint (recognised by its keys); exporting with --method {detected}")
    elif opts.method != detected:
        raise ExportError(
            f"{path}: this is a {label} checkpoint (its keys: deep prompts of {label}), but --method is "
            f"'{opts.method}'; pass --method {detected} (or leave --method out: it is recognised from the keys)"
        )
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    source = f"{path.name} (Dassl, epoch {epoch}, sha256 {sha256_file(path)[:12]})"
    prompts = deep_prompts.load_deep_prompts(state, detected, path, source, clip.model, clip.model_name,
                                             clip.tokenizer, opts.ctx_init)
    _check_context(prompts, clip)
    print(f"{label}: {prompts.summary()}; " + "; ".join(prompts.notes))
    return prompts


def placeholder_context(clip: LoadedClip) -> PromptContext:
    """Embeddings of "a photo of a": the fine-tuned graph then equals the zero-shot one."""
    ids = clip.tokenizer([PLACEHOLDER_CONTEXT_INIT])[0]
    n_ctx = int(ids.argmax()) - 1  # tokens between start and end of text
    with torch.no_grad():
        ctx = clip.model.token_embedding(ids[1 : 1 + n_ctx]).clone()
    return PromptContext(ctx, "zero-shot", f'placeholder context "{PLACEHOLDER_CONTEXT_INIT}" (not trained)')


def _read_project_prompt_learner(path: Path) -> PromptContext:
    """The project format (docs/FORMATS.md section 2): tensor `ctx`, metadata `method`."""
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            if "ctx" not in f.keys():
                raise ExportError(f"{path}: no tensor 'ctx' (have {sorted(f.keys())}); see docs/FORMATS.md section 2")
            ctx = f.get_tensor("ctx")
            method = (f.metadata() or {}).get("method", "coop")
    except safetensors.SafetensorError as error:
        raise ExportError(f"{path}: not a readable safetensors file: {error}") from error
    return PromptContext(_generic_context(ctx, path), method, f"{path.name} (sha256 {sha256_file(path)[:12]})")


def _read_dassl_checkpoint(path: Path) -> tuple[dict, dict]:
    """An official Dassl checkpoint {"state_dict": ..., "epoch", "optimizer", "scheduler", ...},
    read without running pickled code; returns (checkpoint, state_dict)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TENSORS_ONLY_PICKLE)
    except Exception as error:  # torch and pickle raise many types for foreign files
        raise ExportError(f"{path}: cannot read as a Dassl prompt-learner checkpoint (torch.save file): {error}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ExportError(f"{path}: expected a dict with 'state_dict' (Dassl's save_checkpoint layout)")
    return checkpoint, deep_prompts.strip_module_prefix(state)


def _coop_context(path: Path, checkpoint: dict, state: dict) -> PromptContext:
    # DataParallel and whole-model saves prefix the names; token_prefix/suffix are fixed buffers.
    ctx_keys = [k for k in state if k == "ctx" or k.endswith(".ctx")]
    if len(ctx_keys) != 1 or not isinstance(state[ctx_keys[0]], torch.Tensor):
        raise ExportError(
            f"{path}: expected one 'ctx' tensor in state_dict, found {ctx_keys or 'none'} "
            f"(keys: {sorted(state)[:8]}); is this a CoOp/KgCoOp/ProGrad prompt_learner checkpoint?"
        )
    epoch = checkpoint.get("epoch")
    source = f"{path.name} (Dassl, epoch {epoch}, sha256 {sha256_file(path)[:12]})"
    return PromptContext(_generic_context(state[ctx_keys[0]], path), "coop", source)


class _Stub:
    """Stands in for every object a checkpoint pickles besides tensors and dicts.

    Dassl saves the LR scheduler's whole __dict__, which holds the successor scheduler and the
    optimizer *objects*, so `weights_only=True` refuses official CoOp checkpoints. Rebuilding
    those objects as inert stubs reads the tensors without running any code from the file.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _TensorsOnlyUnpickler(pickle.Unpickler):
    # Globals needed to rebuild tensors and state dicts; torch maps storages before this is asked.
    ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch", "Size"): torch.Size,
    }

    def find_class(self, module: str, name: str):
        return self.ALLOWED.get((module, name), _Stub)


_TENSORS_ONLY_PICKLE = types.SimpleNamespace(
    __name__="tensors_only_pickle",
    Unpickler=_TensorsOnlyUnpickler,
    load=lambda f, **kwargs: _TensorsOnlyUnpickler(f, **kwargs).load(),
)


def _generic_context(ctx: torch.Tensor, path: Path) -> torch.Tensor:
    if ctx.ndim == 3:
        raise ExportError(
            f"{path}: ctx has shape {list(ctx.shape)}, a class-specific context (CSC) for "
            f"{ctx.shape[0]} fixed classes; it cannot serve new classes. Train with a generic "
            "context (CoOp's TRAINER.COOP.CSC False) to export."
        )
    if ctx.ndim != 2:
        raise ExportError(f"{path}: ctx must be [n_ctx, width], got shape {list(ctx.shape)}")
    if not ctx.is_floating_point():
        raise ExportError(f"{path}: ctx must be a floating-point tensor, got {ctx.dtype}")
    # CoOp trained with PREC fp16 stores a half-precision ctx; the graphs run in fp32.
    return ctx.detach().to(torch.float32).contiguous()


def _check_context(context: PromptContext, clip: LoadedClip) -> None:
    width = clip.model.token_embedding.weight.shape[1]
    length = clip.model.context_length
    if context.ctx.shape[1] != width:
        raise ExportError(
            f"{context.source}: context width {context.ctx.shape[1]} != text width {width} of "
            f"'{clip.model_name}'; the prompt learner was trained on another CLIP architecture"
        )
    if context.n_ctx + 3 > length:  # start, one class token, end
        raise ExportError(f"{context.source}: {context.n_ctx} context tokens do not fit context length {length}")
    if not torch.isfinite(context.ctx).all():
        raise ExportError(f"{context.source}: ctx holds NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# Graph wrappers


class ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class FusableSelfAttention(nn.Module):
    """`nn.MultiheadAttention` self-attention (no mask, batch first) written as the subgraph that
    ONNX Runtime's CLIP attention fusion (onnxruntime.transformers, FusionAttentionClip) matches:
    separate q/k/v projections (MatMul + Add), Reshape to heads, Transpose (k straight to
    [B,H,d,L]), MatMul, Mul by the scale, Softmax, MatMul, Transpose, Reshape, output projection.

    Same weights and the same arithmetic as `F.multi_head_attention_forward` except that the
    scale multiplies q·k instead of q (a rounding-level difference, inside the fp32 parity bound).
    The TorchScript export of `nn.MultiheadAttention` itself packs q/k/v into one MatMul and splits
    it, which no ORT fusion recognises.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.in_proj_bias is None:
            raise ExportError("internal: fusable attention needs a batch-first nn.MultiheadAttention with packed q/k/v and biases")
        width, self.heads = mha.embed_dim, mha.num_heads
        self.head_dim = width // self.heads
        self.scale = float(self.head_dim) ** -0.5
        weights, biases = mha.in_proj_weight.detach().chunk(3), mha.in_proj_bias.detach().chunk(3)
        self.q, self.k, self.v = (self._linear(w, b) for w, b in zip(weights, biases))
        self.out_proj = mha.out_proj

    @staticmethod
    def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)
        return layer

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        if (k_x is not None and k_x is not q_x) or (v_x is not None and v_x is not q_x) or attn_mask is not None:
            raise ExportError("internal: fusable attention covers self-attention without a mask only")
        batch, length, width = q_x.shape
        q = self.q(q_x).reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)  # [B,H,L,d]
        k = self.k(q_x).reshape(batch, length, self.heads, self.head_dim).permute(0, 2, 3, 1)  # [B,H,d,L]
        v = self.v(q_x).reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)  # [B,H,L,d]
        weights = torch.softmax(torch.matmul(q, k) * self.scale, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out), None


@contextlib.contextmanager
def fusable_image_attention(model: nn.Module):
    """Temporarily replaces the attention of every vision-transformer block by FusableSelfAttention
    (same weights); yields the number of blocks replaced (0 for ResNet image towers)."""
    blocks = getattr(getattr(getattr(model, "visual", None), "transformer", None), "resblocks", [])
    swapped = []
    for block in blocks:
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention) and not hasattr(block, "ln_1_kv"):
            block.attn = FusableSelfAttention(attn)
            swapped.append((block, attn))
    try:
        yield len(swapped)
    finally:
        for block, attn in swapped:
            block.attn = attn


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


class PromptedTextEncoder(nn.Module):
    """open_clip 3.3.0 `CLIP.encode_text` with the context rows 1..=n_ctx replaced by `ctx`.

    The replacement is a `where` over a constant row mask rather than CoOp's concatenation, so
    the parity check against the concatenating reference (`coop_text_features`) tests it.
    """

    def __init__(self, model: nn.Module, ctx: torch.Tensor):
        super().__init__()
        self.model = model
        length, n_ctx = model.context_length, ctx.shape[0]
        rows = torch.zeros(length, ctx.shape[1], dtype=ctx.dtype)
        rows[1 : 1 + n_ctx] = ctx
        mask = torch.zeros(length, 1, dtype=torch.bool)
        mask[1 : 1 + n_ctx] = True
        self.register_buffer("ctx_rows", rows)
        self.register_buffer("ctx_mask", mask)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(input_ids).to(cast_dtype)
        x = torch.where(self.ctx_mask, self.ctx_rows.to(cast_dtype), x)
        return _encode_text_tail(m, x, input_ids)


def _encode_text_tail(m: nn.Module, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`CLIP.encode_text` after the token embedding (open_clip 3.3.0, line for line)."""
    cast_dtype = m.transformer.get_cast_dtype()
    x = x + m.positional_embedding.to(cast_dtype)
    x = m.transformer(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    x = text_global_pool(x, input_ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    if m.text_projection is not None:
        if isinstance(m.text_projection, nn.Linear):
            x = m.text_projection(x)
        else:
            x = x @ m.text_projection
    return x


def coop_text_features(model: nn.Module, ctx: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Reference: CoOp's PromptLearner (prefix, ctx, suffix concatenation) + TextEncoder."""
    n_ctx = ctx.shape[0]
    with torch.no_grad():
        embedding = model.token_embedding(input_ids).to(torch.float32)
        prefix, suffix = embedding[:, :1, :], embedding[:, 1 + n_ctx :, :]
        prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(len(input_ids), -1, -1), suffix], dim=1)
        x = prompts + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)  # batch-first in open_clip 3.x
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0]), input_ids.argmax(dim=-1)]
        projection = model.text_projection
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


# ---------------------------------------------------------------------------------------------
# ONNX export


def export_graph(module: nn.Module, example: torch.Tensor, names: tuple[str, str], path: Path, opset: int) -> None:
    """TorchScript exporter (the dynamo one has broken graphs on renamed outputs)."""
    input_name, output_name = names
    # nn.MultiheadAttention's inference fast path traces to an op ONNX has no symbolic for.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _torchscript_export(module, example, input_name, output_name, path, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _torchscript_export(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str,
                        path: Path, opset: int) -> None:
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )


# Fused operators (com.microsoft domain) counted in the optimised image graph.
FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "QuickGelu", "Gelu")


def op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in graph.graph.node)
    return {"nodes": len(graph.graph.node), **{op: counts[op] for op in FUSED_OPS + ("LayerNormalization",)}}


def fuse_image_graph(path: Path, model: nn.Module, blocks: int) -> dict:
    """Runs ONNX Runtime's transformer optimiser (CLIP fusions, Python graph rewrites only:
    opt_level 0, so nothing machine-specific is baked in) over the image graph and stores the
    result: one com.microsoft `Attention` per block, `SkipLayerNormalization` for the residual
    adds, `BiasGelu`/`QuickGelu` for the MLP. ORT's in-session optimiser (ORT_ENABLE_ALL) does not
    fuse this attention itself, so the fused graph is what ships. Returns the node counts."""
    import logging
    from onnxruntime.transformers import optimizer

    before = op_counts(onnx.load(str(path), load_external_data=False))
    transformer = model.visual.transformer
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimizer.optimize_model(str(path), model_type="clip", num_heads=transformer.resblocks[0].attn.num_heads,
                                         hidden_size=transformer.width, opt_level=0)
    optimized.save_model_to_file(str(path))
    after = op_counts(onnx.load(str(path), load_external_data=False))
    print(f"fused image graph: {before['nodes']} -> {after['nodes']} nodes; "
          + ", ".join(f"{after[op]} {op}" for op in FUSED_OPS if after[op]) + f" ({blocks} transformer blocks)")
    session = _session_counts(path)
    print(f"  in an ORT_ENABLE_ALL session (what cac-edge runs): {session['nodes']} nodes; "
          + ", ".join(f"{session[op]} {op}" for op in FUSED_OPS if session[op]))
    if after["Attention"] != blocks:
        print(f"warning: ONNX Runtime fused {after['Attention']} of {blocks} attention blocks; the graph is still "
              "correct (checked below), only slower", file=sys.stderr)
    return {"blocks": blocks, "before": before, "after": after, "session": session}


def _session_counts(path: Path) -> dict[str, int]:
    """Node counts of the graph as an ORT_ENABLE_ALL CPU session optimises it (saved through
    SessionOptions.optimized_model_filepath): the fused nodes must survive into what runs."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # the "hardware-specific optimisations" notice about the saved copy
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return op_counts(onnx.load(options.optimized_model_filepath, load_external_data=False))


def finalize_graph(path: Path, metadata: dict[str, str], fp16: bool) -> None:
    """Adds provenance metadata, optionally stores weights in fp16, and validates the graph."""
    graph = onnx.load(str(path), load_external_data=False)
    if any(onnx.external_data_helper.uses_external_data(t) for t in graph.graph.initializer):
        raise ExportError(f"{path.name}: the graph exceeds 2 GB and was split into external data, "
                          "which bundle format 1 does not support")
    if fp16:
        _store_weights_fp16(graph)
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "cac-edge onnx/export.py"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def _store_weights_fp16(graph: onnx.ModelProto) -> None:
    """Half-precision weight storage with fp32 compute: each float initializer becomes fp16 plus a
    Cast back to fp32, so inputs/outputs stay float32 as the contract requires and ONNX Runtime
    folds the casts when the session loads. Halves the file size."""
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in graph.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init).astype(np.float16)
        if not np.isfinite(values).all():
            raise ExportError(f"weight '{init.name}' exceeds the fp16 range (65504); export without --fp16")
        name = init.name
        init.CopyFrom(numpy_helper.from_array(values, name=f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT, name=f"{name}__cast"))
    nodes = list(graph.graph.node)
    del graph.graph.node[:]
    graph.graph.node.extend(casts + nodes)


def _graph_metadata(clip: LoadedClip, context: PromptContext | None, role: str) -> dict[str, str]:
    meta = {
        "cac_edge.role": role,
        "cac_edge.model": clip.model_name,
        "cac_edge.weights": clip.source,
        "cac_edge.torch": torch.__version__,
        "cac_edge.open_clip": open_clip.__version__,
    }
    if context is not None:
        meta["cac_edge.prompt_learner"] = f"{context.method}: {context.source}"
        meta["cac_edge.n_ctx"] = str(context.n_ctx)
    return meta


def example_inputs(clip: LoadedClip) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-2 examples: a batch of 1 could let the tracer bake the batch size into a shape."""
    size = clip.preprocess["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = clip.tokenizer([ZERO_SHOT_TEMPLATE.format("cat"), ZERO_SHOT_TEMPLATE.format("fire truck")])
    return pixels, ids


# ---------------------------------------------------------------------------------------------
# Manifest


def build_manifest(opts: ExportOptions, clip: LoadedClip, context: PromptContext, bundle_dir: Path) -> dict:
    model = clip.model
    logit_scale = float(model.logit_scale.detach().exp().item())
    files = {name: sha256_file(bundle_dir / name) for name in (TOKENIZER_FILE, IMAGE_FILE, TEXT_ZS_FILE, TEXT_FT_FILE)}
    deep = isinstance(context, DeepPrompts)
    if deep:
        files[IMAGE_FT_FILE] = sha256_file(bundle_dir / IMAGE_FT_FILE)
    prompts = context.summary() if deep else f"{context.n_ctx} context tokens"
    description = opts.description or (
        f"open_clip {clip.model_name}, {clip.source}; fine-tuned: {context.method}, "
        f"{prompts} from {context.source}; exported by onnx/export.py "
        f"(torch {torch.__version__}, open_clip {open_clip.__version__}, opset {opts.opset}"
        f"{', fp16 weights' if opts.fp16 else ''})"
    )
    # CoOp, KgCoOp and ProGrad keep CLIP's logit scale fixed while learning the context; so do MaPLe
    # and PromptSRC (deep_prompts.check_frozen_clip compares the checkpoint's logit_scale when present).
    fine_tuned = {"method": context.method, "text_encoder": TEXT_FT_FILE,
                  "template": context.template, "logit_scale": logit_scale}
    if deep:
        fine_tuned["image_encoder"] = IMAGE_FT_FILE
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": opts.name or opts.out.name,
        "description": description,
        "embed_dim": int(model.text_projection.shape[1]),
        "preprocess": dict(clip.preprocess),
        "text": {"tokenizer": TOKENIZER_FILE, "context_length": int(model.context_length)},
        "zero_shot": {"image_encoder": IMAGE_FILE, "text_encoder": TEXT_ZS_FILE,
                      "template": ZERO_SHOT_TEMPLATE, "logit_scale": logit_scale},
        "fine_tuned": fine_tuned,
        "files": files,
    }


# ---------------------------------------------------------------------------------------------
# Parity check


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, array: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: array})[0]


def compare(name: str, ours: np.ndarray, reference: np.ndarray, tol: Tolerance) -> dict:
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    if ours.shape != reference.shape:
        raise ExportError(f"{name}: ONNX output shape {ours.shape} != PyTorch {reference.shape}")
    diff = float(np.abs(ours - reference).max())
    cos = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    result = {"max_abs_diff": diff, "min_cosine": float(cos.min()), "limit": tol.limit(reference)}
    result["ok"] = bool(diff <= result["limit"] and result["min_cosine"] >= tol.min_cosine)
    return result


def batch_consistency(session: ort.InferenceSession, inputs: np.ndarray, tol: Tolerance) -> dict:
    """Rows of one batch of PARITY_BATCH equal the same inputs run one at a time (dynamic N)."""
    batch = inputs[:PARITY_BATCH]
    together = _run(session, batch)
    alone = np.concatenate([_run(session, batch[i : i + 1]) for i in range(len(batch))])
    return compare("batch", together, alone, tol)


def parity_check(bundle_dir: Path, clip: LoadedClip, context: PromptContext, opts: ExportOptions) -> dict:
    tol = TOLERANCE_FP16 if opts.fp16 else TOLERANCE_FP32
    model = clip.model
    pixels = load_pixels(parity_images(opts.parity_images, PARITY_BATCH), clip.preprocess)
    ids_zs = clip.tokenizer([ZERO_SHOT_TEMPLATE.format(c) for c in PARITY_CLASSES])
    ids_ft = clip.tokenizer([context.template.format(c) for c in PARITY_CLASSES])
    with torch.no_grad():
        references = {
            IMAGE_FILE: (pixels, model.encode_image(pixels)),
            TEXT_ZS_FILE: (ids_zs, model.encode_text(ids_zs)),
        }
        if isinstance(context, DeepPrompts):
            text_ft, image_ft = deep_reference(model, context, ids_ft, pixels)
            references[TEXT_FT_FILE] = (ids_ft, text_ft)
            references[IMAGE_FT_FILE] = (pixels, image_ft)
        else:
            references[TEXT_FT_FILE] = (ids_ft, coop_text_features(model, context.ctx, ids_ft))
    report = {"tolerance": dataclasses.asdict(tol), "wrapper_vs_encode_text": _wrapper_self_check(clip, context)}
    for file_name, (inputs, expected) in references.items():
        session = _session(bundle_dir / file_name)
        graph = file_name.removesuffix(".onnx")
        report[graph] = compare(graph, _run(session, inputs.numpy()), expected.numpy(), tol)
        report[graph]["batch_1_vs_7"] = batch_consistency(session, inputs.numpy(), TOLERANCE_FP32)
    return report


def deep_reference(model: nn.Module, context: DeepPrompts, ids: torch.Tensor, pixels: torch.Tensor):
    """Text and image features of the official MaPLe/PromptSRC forward (onnx/fixtures/
    deep_prompt_reference.py, written from the official code, independent of the graph wrappers),
    from the checkpoint's own tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
    import deep_prompt_reference as ref

    raw = context.raw
    if context.method == "maple":
        shared_ctx, compound_text, visual_deep = ref.maple_prompt_learner(
            raw["ctx"], raw["proj_weight"], raw["proj_bias"], raw["compound_prompts_text"], raw["compound_projections"])
        return (ref.maple_text_features(model, raw["ctx"], compound_text, ids),
                ref.maple_image_features(model, pixels, shared_ctx, visual_deep))
    return (ref.ivlp_text_features(model, raw["ctx"], raw["text_vpt_shallow"], ids),
            ref.ivlp_image_features(model, pixels, raw["vpt"], raw["vision_vpt_shallow"]))


def _wrapper_self_check(clip: LoadedClip, context: PromptContext | DeepPrompts) -> dict:
    """With the placeholder tokens' own embeddings as context the prompted wrapper must give
    exactly encode_text: checks that it follows open_clip's code path after the substitution
    (for MaPLe/PromptSRC: the block-by-block text wrapper without its deep prompts)."""
    ids = clip.tokenizer([context.template.format(c) for c in PARITY_CLASSES[:4]])
    with torch.no_grad():
        own = clip.model.token_embedding(ids[0, 1 : 1 + context.n_ctx])
        if isinstance(context, DeepPrompts):
            ours = deep_prompts.DeepPromptedTextEncoder(clip.model, own, {})(ids)
        else:
            ours = PromptedTextEncoder(clip.model, own)(ids)
        theirs = clip.model.encode_text(ids)
    diff = float((ours - theirs).abs().max())
    if diff > 1e-6 * max(1.0, float(theirs.abs().max())):
        raise ExportError(f"internal: prompted text wrapper differs from encode_text by {diff:.2e}; "
                          f"open_clip {open_clip.__version__} changed encode_text (export.py follows 3.3.0)")
    return {"max_abs_diff": diff}


def print_parity(report: dict) -> None:
    tol = report["tolerance"]
    print(f"parity vs PyTorch (tolerance: |diff| <= {tol['atol']:g} + {tol['rtol']:g}*max|ref|, "
          f"cosine >= {tol['min_cosine']})")
    print(f"  wrapper vs encode_text (PyTorch): max |diff| {report['wrapper_vs_encode_text']['max_abs_diff']:.2e}")
    for graph in _report_graphs(report):
        r = report[graph.removesuffix(".onnx")]
        b = r["batch_1_vs_7"]
        print(f"  {graph:14s} max |diff| {r['max_abs_diff']:.2e} (limit {r['limit']:.1e})  "
              f"min cosine {r['min_cosine']:.9f}  batch 1 vs {PARITY_BATCH}: max |diff| {b['max_abs_diff']:.2e}  "
              f"{'ok' if r['ok'] and b['ok'] else 'FAIL'}")


def _report_graphs(report: dict) -> list[str]:
    return [g for g in (IMAGE_FILE, TEXT_ZS_FILE, TEXT_FT_FILE, IMAGE_FT_FILE) if g.removesuffix(".onnx") in report]


def parity_failures(report: dict) -> list[str]:
    failures = []
    for graph in _report_graphs(report):
        r = report[graph.removesuffix(".onnx")]
        if not r["ok"]:
            failures.append(f"{graph}: ONNX Runtime differs from PyTorch beyond the tolerance")
        if not r["batch_1_vs_7"]["ok"]:
            failures.append(f"{graph}: batch {PARITY_BATCH} rows differ from batch-1 runs (dynamic batch axis broken)")
    return failures


# ---------------------------------------------------------------------------------------------
# The whole export


def export_bundle(opts: ExportOptions) -> ExportResult:
    out = opts.out
    if out.exists() and not opts.force:
        raise ExportError(f"{out} exists; choose another --out or pass --force to replace it")
    if opts.method is not None and not opts.method.strip():
        raise ExportError("--method must not be empty")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    clip = load_clip(opts)
    context = load_prompt_learner(opts, clip)
    if opts.quantize and isinstance(context, DeepPrompts):
        raise ExportError(f"--quantize covers the zero-shot image encoder only, and a {context.method} bundle's "
                          "--precision int8 would need image_ft.onnx quantised too; export without --quantize")
    if opts.prompt_learner is None:
        print(f"warning: no --prompt-learner: text_ft.onnx uses the untrained context \"{PLACEHOLDER_CONTEXT_INIT}\", "
              "so the fine-tuned model equals the zero-shot one (a valid bundle for testing only)", file=sys.stderr)
    seconds["load"] = time.perf_counter() - clock

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = _write_bundle(tmp, opts, clip, context, seconds)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.bundle_dir = out
    return result


def _write_bundle(tmp: Path, opts: ExportOptions, clip: LoadedClip, context: PromptContext, seconds: dict) -> ExportResult:
    clock = time.perf_counter()
    pixels, ids = example_inputs(clip)
    if isinstance(context, DeepPrompts):
        text_ft = deep_prompts.DeepPromptedTextEncoder(clip.model, context.ctx, context.text_layers)
    else:
        text_ft = PromptedTextEncoder(clip.model, context.ctx)
    graphs = [
        (ImageEncoder(clip.model), pixels, ("pixel_values", "image_embeds"), IMAGE_FILE, None),
        (TextEncoder(clip.model), ids, ("input_ids", "text_embeds"), TEXT_ZS_FILE, None),
        (text_ft, ids, ("input_ids", "text_embeds"), TEXT_FT_FILE, context),
    ]
    if isinstance(context, DeepPrompts):
        image_ft = deep_prompts.DeepPromptedImageEncoder(clip.model, context.vision_prompt, context.vision_layers)
        graphs.append((image_ft, pixels, ("pixel_values", "image_embeds"), IMAGE_FT_FILE, context))
    fusion, fusion_ft = {}, {}
    for module, example, names, file_name, ctx in graphs:
        if file_name in (IMAGE_FILE, IMAGE_FT_FILE) and opts.fuse_attention:
            with fusable_image_attention(clip.model) as blocks:
                export_graph(module, example, names, tmp / file_name, opts.opset)
            if blocks:
                if file_name == IMAGE_FT_FILE:
                    print(f"{IMAGE_FT_FILE}:")
                    fusion_ft = fuse_image_graph(tmp / file_name, clip.model, blocks)
                else:
                    fusion = fuse_image_graph(tmp / file_name, clip.model, blocks)
        else:
            export_graph(module, example, names, tmp / file_name, opts.opset)
        finalize_graph(tmp / file_name, _graph_metadata(clip, ctx, file_name.removesuffix(".onnx")), opts.fp16)
    build_tokenizer_json(str(tmp / TOKENIZER_FILE))
    seconds["export"] = time.perf_counter() - clock

    manifest = build_manifest(opts, clip, context, tmp)
    (tmp / MANIFEST_FILE).write_text(render_manifest(manifest), encoding="utf-8")
    result = ExportResult(tmp, clip, context, {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}, seconds)
    result.fusion = fusion
    result.fusion_ft = fusion_ft

    if opts.parity:
        clock = time.perf_counter()
        result.parity = parity_check(tmp, clip, context, opts)
        seconds["parity"] = time.perf_counter() - clock
        print_parity(result.parity)
        failures = parity_failures(result.parity)
        if failures:
            raise ExportError("parity check failed, bundle not written:\n  " + "\n  ".join(failures))
    if opts.quantize:
        clock = time.perf_counter()
        manifest, result.variant = _int8_variant(tmp, manifest, opts, clip)
        (tmp / MANIFEST_FILE).write_text(render_manifest(manifest), encoding="utf-8")
        result.sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        seconds["int8"] = time.perf_counter() - clock
    return result


def result_fusion_blocks(clip: LoadedClip) -> int:
    """Vision-transformer blocks whose attention export.py fuses (0 for ResNet image towers)."""
    with fusable_image_attention(clip.model) as blocks:
        return blocks


def _int8_variant(tmp: Path, manifest: dict, opts: ExportOptions, clip: LoadedClip) -> tuple[dict, dict]:
    """--quantize: the int8 image encoder, its parity to fp32 (cosine on the parity images and the
    demo images, label agreement on the demo images with --parity-classes), and the manifest v2."""
    import quantize
    from bundle_io import image_files

    calibration, label = None, None
    if opts.quantize == "int8-static":
        folder = opts.calibration_images or opts.parity_images
        calibration = image_files(folder, recursive=True)
        if not calibration:
            raise ExportError(f"{folder}: no .jpg/.png calibration images for int8-static; pass --calibration-images DIR")
        label = quantize.calibration_label(folder, len(calibration), tmp)
    images = image_files(opts.parity_images) + image_files(quantize.DEFAULT_LABEL_IMAGES, recursive=True)
    classes = quantize.read_classes(opts.parity_classes or quantize.DEFAULT_CLASSES)
    source = None
    if opts.quantize == "int8-static" and opts.fuse_attention and result_fusion_blocks(clip):
        # Static int8 has no form of the fused Attention op: quantise an unfused export of the same
        # image encoder (same weights; not part of the bundle).
        source = tmp / f".{IMAGE_FILE}.unfused"
        pixels, _ = example_inputs(clip)
        export_graph(ImageEncoder(clip.model), pixels, ("pixel_values", "image_embeds"), source, opts.opset)
        finalize_graph(source, _graph_metadata(clip, None, IMAGE_FILE.removesuffix(".onnx")), opts.fp16)
    try:
        return quantize.build_variant(tmp, manifest, "zero_shot", opts.quantize, calibration, label, images, classes,
                                      opts.force_parity_fail, source)
    except ExportError as error:
        raise ExportError(f"{error}; bundle not written") from error
    finally:
        if source is not None:
            source.unlink(missing_ok=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle over `out`; an old bundle is moved aside first (--force)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> ExportOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See onnx/README.md and docs/FORMATS.md.")
    model = p.add_argument_group("CLIP model")
    model.add_argument("--arch", help="open_clip architecture name, e.g. ViT-B-32 (ViT-B-32-quickgelu for OpenAI weights)")
    model.add_argument("--model-config", type=Path, help="open_clip model-config JSON instead of --arch (e.g. tiny test models)")
    weights = model.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="open_clip state dict (.bin/.pth/.pt/.safetensors)")
    weights.add_argument("--random-weights", action="store_true", help="random initialisation (testing only)")
    model.add_argument("--trust-pickle", action="store_true",
                       help="let torch.load unpickle arbitrary objects in --checkpoint (only for files you trust)")
    model.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0)")
    ft = p.add_argument_group("fine-tuned model")
    ft.add_argument("--prompt-learner", type=Path,
                    help="CoOp/KgCoOp/ProGrad Dassl checkpoint (prompt_learner/model.pth.tar-N), MaPLe/PromptSRC Dassl checkpoint "
                         "(MultiModalPromptLearner/ or VLPromptLearner/model.pth.tar-N), or project "
                         ".safetensors (docs/FORMATS.md section 2); without it the context is the untrained "
                         f'"{PLACEHOLDER_CONTEXT_INIT}" and the fine-tuned model equals the zero-shot one')
    ft.add_argument("--method", help=f"method name for the manifest ({', '.join(PROMPT_LEARNER_METHODS)}, ...), or "
                                     f"{'|'.join(DEEP_METHODS)} for a MaPLe/PromptSRC Dassl checkpoint (also "
                                     "recognised from its keys); default: the file's metadata, else coop")
    ft.add_argument("--ctx-init", default=deep_prompts.DEFAULT_CTX_INIT,
                    help="MaPLe/PromptSRC: the training config's TRAINER CTX_INIT (default "
                         f'"{deep_prompts.DEFAULT_CTX_INIT}", the official configs\' value; "" when it was empty); '
                         "checked against the checkpoint's token_suffix")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    out.add_argument("--name", help="bundle name in the manifest (default: the --out directory name)")
    out.add_argument("--description", help="manifest description (default: generated provenance)")
    out.add_argument("--force", action="store_true", help="replace an existing --out")
    out.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    out.add_argument("--fp16", action="store_true", help="store weights in fp16 (half the size; compute and I/O stay fp32)")
    out.add_argument("--no-fuse-attention", dest="fuse_attention", action="store_false",
                     help="export the image transformer's attention as open_clip traces it (unfused, slower)")
    quant = p.add_argument_group("int8 image encoder (onnx/quantize.py)")
    quant.add_argument("--quantize", choices=["int8-dynamic", "int8-static"],
                       help=f"also write {IMAGE_INT8_FILE}, an int8 variant of the image encoder (bundle format 2)")
    quant.add_argument("--calibration-images", type=Path,
                       help="int8-static: folder of calibration images, searched recursively (default: --parity-images)")
    check = p.add_argument_group("parity check")
    check.add_argument("--no-parity", dest="parity", action="store_false", help="skip the ONNX Runtime vs PyTorch check")
    check.add_argument("--parity-images", type=Path, default=DEFAULT_PARITY_IMAGES,
                       help="directory of .jpg/.png images for the check (default: the repository's test photos)")
    check.add_argument("--parity-classes", type=Path,
                       help="class names, one a line, for the int8 label agreement (default: onnx/demo/classes.txt)")
    check.add_argument("--force-parity-fail", action="store_true",
                       help="write the int8 variant even when its parity to fp32 is below the bounds (reported, not refused)")
    args = p.parse_args(argv)
    if args.quantize and not args.parity:
        p.error("--quantize needs the parity check (the variant's parity is measured there); drop --no-parity")
    if args.arch and args.model_config:
        p.error("give --arch or --model-config, not both")
    return ExportOptions(**vars(args))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        result = export_bundle(opts)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    total = sum(result.sizes.values())
    print(f"wrote {result.bundle_dir} ({total / 1e6:.1f} MB: "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in result.sizes.items()) + f"); {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
