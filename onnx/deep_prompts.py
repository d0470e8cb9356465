"""MaPLe and PromptSRC (deep prompts in both towers) for onnx/export.py.

Reads the prompt tensors of an official Dassl checkpoint (already unpickled by export.py's
tensors-only loader), checks them against the open_clip model, and provides the two graph
wrappers of a deep-prompt bundle:

    text_ft.onnx   input_ids -> text_embeds: the shallow context at positions 1..=n_ctx and, before
                   each prompted text block i >= 1, that block's deep text prompt at the same
                   positions (constants in the graph)
    image_ft.onnx  pixel_values -> image_embeds: the vision prompt tokens appended after the
                   positional embedding (before ln_pre) and, before each prompted vision block
                   i >= 1, that block's deep vision prompt in place of the last n_ctx tokens

MaPLe (trainers/maple.py, MultiModalPromptLearner): `prompt_learner.ctx` [n, w_text] is the shallow
text context; the vision prompts are learned linear maps of the text ones:
`prompt_learner.proj` (w_text -> w_vision) of ctx, `compound_prompt_projections.i` of
`compound_prompts_text.i`, which feeds block i+1 of both towers (PROMPT_DEPTH - 1 of them).
PromptSRC (trainers/promptsrc.py, VLPromptLearner + the IVLP blocks of clip/model.py): independent
prompts: `prompt_learner.ctx`, `image_encoder.VPT` [n_v, w_vision], and one `VPT_shallow` per
prompted block i >= 1 in `image_encoder.transformer.resblocks.i` / `text_encoder.transformer.resblocks.i`.

fp16 rounding: the official blocks insert every vision prompt and every deep text prompt with
`.half()` (see onnx/fixtures/deep_prompt_reference.py), so the constants here are rounded to fp16
exactly there; the shallow text context is inserted uncast, as officially.

The substitution is written as `where` over a constant mask (text), a Pad + Add for the appended
vision tokens and a constant 0/1 mask times x plus constant rows (vision deep prompts), not as the
official concatenations, so that the parity check against the reference (which follows the
official code) tests it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer, text_global_pool
from torch import nn

from bundle_io import ExportError

DEEP_METHODS = ("maple", "promptsrc")
# The official configs' CTX_INIT (configs/trainers/MaPLe/*.yaml, configs/trainers/PromptSRC/*.yaml).
DEFAULT_CTX_INIT = "a photo of a"
PLACEHOLDER_TOKEN = "X"
SOT_TOKEN = 49406
EOT_TOKEN = 49407
# Frozen CLIP weights in a whole-model save may be fp16 (PREC fp16 converts them): 2^-11 relative
# rounding, plus fp16's subnormal spacing (6e-8) for values near zero.
FP16_RTOL, FP16_ATOL = 1e-3, 1e-6

# Frozen CLIP tensors compared when a checkpoint carries them: official name -> open_clip name.
FROZEN_CHECKS = (
    ("image_encoder.conv1.weight", "visual.conv1.weight"),
    ("image_encoder.class_embedding", "visual.class_embedding"),
    ("image_encoder.positional_embedding", "visual.positional_embedding"),
    ("image_encoder.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.in_proj_weight"),
    ("image_encoder.proj", "visual.proj"),
    ("prompt_learner.ZS_image_encoder.conv1.weight", "visual.conv1.weight"),
    ("prompt_learner.ZS_image_encoder.proj", "visual.proj"),
    ("text_encoder.positional_embedding", "positional_embedding"),
    ("text_encoder.transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_weight"),
    ("text_encoder.ln_final.weight", "ln_final.weight"),
    ("text_encoder.text_projection", "text_projection"),
)


@dataclass
class DeepPrompts:
    """The prompts of a MaPLe/PromptSRC checkpoint, in the shape the graphs need.

    Duck-types export.PromptContext (ctx, method, source, n_ctx, template). `text_layers` and
    `vision_layers` map a block index (>= 1) to its deep prompt, already rounded to fp16 as the
    official code inserts it; `vision_prompt` is the appended vision tokens (rounded). `raw` holds
    the checkpoint's own tensors (fp32) for the reference forward."""

    method: str
    source: str
    ctx: torch.Tensor
    prompt_template: str
    vision_prompt: torch.Tensor
    text_layers: dict[int, torch.Tensor]
    vision_layers: dict[int, torch.Tensor]
    raw: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    @property
    def template(self) -> str:
        return self.prompt_template

    def summary(self) -> str:
        text_depth = 1 + len(self.text_layers)
        vision_depth = 1 + len(self.vision_layers)
        return (f"{self.n_ctx} text context tokens (text prompt depth {text_depth}), "
                f"{self.vision_prompt.shape[0]} vision prompt tokens (vision prompt depth {vision_depth})")


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """The official `.half()` applied to an inserted prompt (graphs compute in fp32)."""
    return t.detach().to(torch.float16).to(torch.float32)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# Which method a Dassl state dict belongs to


def strip_module_prefix(state: dict) -> dict:
    """DataParallel saves prefix every key with `module.` (Dassl normally removes it)."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def detect_method(state: dict, path: Path) -> str:
    """'maple', 'promptsrc' or 'coop' (the CoOp family) from the key names; refuses CoCoOp."""
    keys = [k for k in state if isinstance(k, str)]
    if any(k.startswith("meta_net.") or k.startswith("prompt_learner.meta_net.") for k in keys):
        raise ExportError(
            f"{path}: holds meta_net.* (CoCoOp's meta-network). CoCoOp conditions the text prompts on "
            "each image, so its class text features change with every image and cannot be computed once "
            "into the class cache that cac-edge runs on; it cannot be exported. Export a CoOp/KgCoOp/"
            "ProGrad, MaPLe or PromptSRC checkpoint instead."
        )
    if any(k.startswith("prompt_learner.compound_prompt") or k.startswith("prompt_learner.proj.") for k in keys):
        return "maple"
    if any(k == "image_encoder.VPT" or k.endswith(".VPT_shallow") for k in keys):
        return "promptsrc"
    return "coop"


# ---------------------------------------------------------------------------------------------
# Reading and checking the prompts


def load_deep_prompts(state: dict, method: str, path: Path, source: str, model: nn.Module, model_name: str,
                      tokenizer, ctx_init: str) -> DeepPrompts:
    check_deep_supported(model, model_name)
    text_width = model.token_embedding.weight.shape[1]
    vision_width = model.visual.transformer.width
    text_layers = len(model.transformer.resblocks)
    vision_layers = len(model.visual.transformer.resblocks)
    ctx = _tensor(state, "prompt_learner.ctx", path, method)
    if ctx.ndim == 3:
        raise ExportError(
            f"{path}: prompt_learner.ctx has shape {list(ctx.shape)}, a class-specific context for "
            f"{ctx.shape[0]} fixed classes; it cannot serve new classes. Train with a generic context to export."
        )
    _shape(ctx, [None, text_width], "prompt_learner.ctx", path, model_name, "the text width")
    n_ctx = ctx.shape[0]

    if method == "maple":
        prompts = _maple(state, path, model_name, ctx, text_width, vision_width, min(text_layers, vision_layers))
    else:
        prompts = _promptsrc(state, path, model_name, ctx, text_width, vision_width, text_layers, vision_layers)
    prompts.source = source
    prompts.prompt_template, note = prompt_template(n_ctx, ctx_init, tokenizer, path)
    prompts.notes.append(note)
    prompts.notes.append(check_token_buffers(state, model, tokenizer, ctx_init, n_ctx, path))
    prompts.notes.append(check_frozen_clip(state, model, model_name, path))
    for name, t in [("ctx", prompts.ctx), ("vision prompt", prompts.vision_prompt),
                    *[(f"text layer {i}", t) for i, t in prompts.text_layers.items()],
                    *[(f"vision layer {i}", t) for i, t in prompts.vision_layers.items()]]:
        if not torch.isfinite(t).all():
            raise ExportError(f"{path}: the {name} prompt holds NaN or infinite values (or exceeds fp16's range)")
    return prompts


def _tensor(state: dict, key: str, path: Path, method: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ExportError(
            f"{path}: no tensor '{key}' in state_dict (keys: {sorted(k for k in state if 'prompt' in k or 'VPT' in k)[:12]}); "
            f"the file is incomplete or not a {method_label(method)} checkpoint (pass the Dassl file "
            f"{official_file(method)})"
        )
    if not value.is_floating_point():
        raise ExportError(f"{path}: '{key}' must be floating point, got {value.dtype}")
    return value


def method_label(method: str) -> str:
    return {"maple": "MaPLe", "promptsrc": "PromptSRC"}.get(method, method)


def official_file(method: str) -> str:
    return {"maple": "MultiModalPromptLearner/model.pth.tar-<epoch>",
            "promptsrc": "VLPromptLearner/model.pth.tar-<epoch>"}.get(method, "prompt_learner/model.pth.tar-<epoch>")


def _shape(t: torch.Tensor, expected: list, key: str, path: Path, model_name: str, what: str) -> None:
    ok = t.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        shown = ["n" if e is None else e for e in expected]
        raise ExportError(
            f"{path}: '{key}' has shape {list(t.shape)}, expected {shown} ({what} of '{model_name}'); "
            "the prompt learner was trained on another CLIP architecture"
        )


def _indexed(state: dict, pattern: str) -> dict[int, str]:
    regex = re.compile(pattern)
    found = {}
    for key in state:
        match = regex.fullmatch(key) if isinstance(key, str) else None
        if match:
            found[int(match.group(1))] = key
    return found


def _maple(state, path, model_name, ctx, text_width, vision_width, layers) -> DeepPrompts:
    """MultiModalPromptLearner: proj(ctx) feeds the image tower's input; compound_prompts_text.i
    feeds text block i+1 and, through compound_prompt_projections.i, vision block i+1."""
    n_ctx = ctx.shape[0]
    proj_w = _tensor(state, "prompt_learner.proj.weight", path, "maple")
    proj_b = _tensor(state, "prompt_learner.proj.bias", path, "maple")
    # Officially nn.Linear(ctx_dim, 768) (ViT-B's vision width, hard-coded): here text -> vision width.
    _shape(proj_w, [vision_width, text_width], "prompt_learner.proj.weight", path, model_name,
           "a linear map from the text width to the vision width")
    _shape(proj_b, [vision_width], "prompt_learner.proj.bias", path, model_name, "the vision width")
    texts = _indexed(state, r"prompt_learner\.compound_prompts_text\.(\d+)")
    weights = _indexed(state, r"prompt_learner\.compound_prompt_projections\.(\d+)\.weight")
    biases = _indexed(state, r"prompt_learner\.compound_prompt_projections\.(\d+)\.bias")
    depth = len(texts) + 1
    if set(texts) != set(range(len(texts))):
        raise ExportError(f"{path}: compound_prompts_text indices {sorted(texts)} are not 0..{len(texts) - 1}; "
                          "the file is incomplete or not a MaPLe checkpoint")
    for name, found in (("weight", weights), ("bias", biases)):
        if set(found) != set(texts):
            missing = sorted(set(texts) - set(found))
            extra = sorted(set(found) - set(texts))
            raise ExportError(
                f"{path}: MaPLe needs one compound_prompt_projections.i per compound_prompts_text.i "
                f"(i = 0..{len(texts) - 1}, PROMPT_DEPTH {depth}); "
                + (f"missing prompt_learner.compound_prompt_projections.{missing[0]}.{name}" if missing else
                   f"unexpected prompt_learner.compound_prompt_projections.{extra[0]}.{name}")
                + ". The file is incomplete (or was edited); export the checkpoint as training saved it"
            )
    if depth > layers:
        raise ExportError(
            f"{path}: PROMPT_DEPTH {depth} (from {len(texts)} compound prompts) exceeds the {layers} transformer "
            f"blocks of '{model_name}'; the prompt learner was trained on another CLIP architecture"
        )
    compound, projections = [], []
    for i in range(len(texts)):
        prompt = _tensor(state, texts[i], path, "maple")
        w, b = _tensor(state, weights[i], path, "maple"), _tensor(state, biases[i], path, "maple")
        _shape(prompt, [n_ctx, text_width], texts[i], path, model_name, "n_ctx x the text width")
        _shape(w, [vision_width, text_width], weights[i], path, model_name,
               "a linear map from the text width to the vision width")
        _shape(b, [vision_width], biases[i], path, model_name, "the vision width")
        compound.append(_f32(prompt))
        projections.append((_f32(w), _f32(b)))
    with torch.no_grad():
        shared_ctx = nn.functional.linear(_f32(ctx), _f32(proj_w), _f32(proj_b))
        visual_deep = [nn.functional.linear(p, w, b) for p, (w, b) in zip(compound, projections)]
    return DeepPrompts(
        method="maple", source="", ctx=_f32(ctx), prompt_template="",
        vision_prompt=_fp16(shared_ctx),
        text_layers={i + 1: _fp16(p) for i, p in enumerate(compound)},
        vision_layers={i + 1: _fp16(p) for i, p in enumerate(visual_deep)},
        raw={"ctx": _f32(ctx), "proj_weight": _f32(proj_w), "proj_bias": _f32(proj_b),
             "compound_prompts_text": compound, "compound_projections": projections},
    )


def _promptsrc(state, path, model_name, ctx, text_width, vision_width, text_layers, vision_layers) -> DeepPrompts:
    """VLPromptLearner.ctx plus the IVLP blocks' own prompts (`VPT_shallow` of block i >= 1)."""
    n_ctx = ctx.shape[0]
    if "image_encoder.VPT" not in state:
        raise ExportError(
            f"{path}: no 'image_encoder.VPT' (the vision prompt of PromptSRC/IVLP, PROMPT_DEPTH_VISION >= 1); "
            "a model without vision prompts is not supported. Pass the whole VLPromptLearner/model.pth.tar-<epoch> "
            "that training saved"
        )
    vpt = _tensor(state, "image_encoder.VPT", path, "promptsrc")
    _shape(vpt, [None, vision_width], "image_encoder.VPT", path, model_name, "n_ctx_vision x the vision width")
    tower_prompts = {}
    for tower, prefix, layers, width, n in (("text", "text_encoder", text_layers, text_width, n_ctx),
                                           ("vision", "image_encoder", vision_layers, vision_width, vpt.shape[0])):
        found = _indexed(state, re.escape(prefix) + r"\.transformer\.resblocks\.(\d+)\.VPT_shallow")
        depth = len(found) + 1
        if set(found) != set(range(1, depth)):
            raise ExportError(
                f"{path}: {tower} prompts in blocks {sorted(found)}; IVLP prompts blocks 1..PROMPT_DEPTH-1 "
                "without gaps. The file is incomplete or not a PromptSRC checkpoint"
            )
        if depth > layers:
            raise ExportError(f"{path}: {tower} prompt depth {depth} exceeds the {layers} blocks of '{model_name}'; "
                              "the prompt learner was trained on another CLIP architecture")
        tensors = {}
        for i, key in sorted(found.items()):
            t = _tensor(state, key, path, "promptsrc")
            # Text blocks replace positions 1..1+N_CTX_TEXT, the same positions as ctx.
            _shape(t, [n, width], key, path, model_name, f"n_ctx x the {tower} width")
            tensors[i] = _f32(t)
        tower_prompts[tower] = tensors
    return DeepPrompts(
        method="promptsrc", source="", ctx=_f32(ctx), prompt_template="",
        vision_prompt=_fp16(vpt),
        text_layers={i: _fp16(t) for i, t in tower_prompts["text"].items()},
        vision_layers={i: _fp16(t) for i, t in tower_prompts["vision"].items()},
        raw={"ctx": _f32(ctx), "vpt": _f32(vpt), "text_vpt_shallow": tower_prompts["text"],
             "vision_vpt_shallow": tower_prompts["vision"]},
    )


def _ctx_init_tokens(ctx_init: str, tokenizer) -> list[int]:
    ids = tokenizer([ctx_init.replace("_", " ")])[0]
    return [int(t) for t in ids[1 : int(ids.argmax())]]


def prompt_template(n_ctx: int, ctx_init: str, tokenizer, path: Path) -> tuple[str, str]:
    """The official prompt: `CTX_INIT + " " + name + "."` when CTX_INIT is set and n_ctx <= 4 (its
    tokens 1..n_ctx are then replaced; the rest stay in every prompt), else "X X ... X name."."""
    if ctx_init and n_ctx <= 4:
        tokens = _ctx_init_tokens(ctx_init, tokenizer)
        if len(tokens) < n_ctx:
            raise ExportError(
                f"{path}: --ctx-init \"{ctx_init}\" has {len(tokens)} tokens but the context has {n_ctx}: the "
                "official prompt learner would overwrite the class name with context; pass the CTX_INIT of "
                "the training config (or --ctx-init \"\" for a random-initialised context)"
            )
        return ctx_init.replace("_", " ") + " {}.", f'prompt "{ctx_init} {{}}." (its first {n_ctx} tokens learned)'
    template = " ".join([PLACEHOLDER_TOKEN] * n_ctx) + " {}."
    why = "no --ctx-init" if not ctx_init else f"n_ctx {n_ctx} > 4: the official code ignores CTX_INIT"
    return template, f'prompt "{template}" ({why})'


def _nearest_tokens(rows: torch.Tensor, embedding: torch.Tensor) -> list[int]:
    """Token ids whose embedding is nearest (L2) to each row: the buffers hold exact (or fp16)
    copies of token embeddings."""
    distances = torch.cdist(rows.float(), embedding.float())
    return [int(i) for i in distances.argmin(dim=1)]


def _decode(tokenizer, ids: list[int]) -> str:
    words = []
    for t in ids:
        if t == EOT_TOKEN:
            words.append("<end of text>")
            break
        words.append(tokenizer.decoder[t].replace("</w>", ""))
    return " ".join(words)


def check_token_buffers(state: dict, model: nn.Module, tokenizer, ctx_init: str, n_ctx: int, path: Path) -> str:
    """Checks `prompt_learner.token_prefix`/`token_suffix` (token embeddings of the training
    prompts, saved but unused at load) against the CLIP and --ctx-init: the prefix must be the
    start-of-text embedding, and the suffix of class 0 must begin with the CTX_INIT tokens after the
    first n_ctx (e.g. "of a" for "a photo of a" with N_CTX 2)."""
    prefix, suffix = state.get("prompt_learner.token_prefix"), state.get("prompt_learner.token_suffix")
    embedding = model.token_embedding.weight.detach()
    notes = []
    if isinstance(prefix, torch.Tensor):
        if prefix.ndim != 3 or prefix.shape[2] != embedding.shape[1] or not _close(prefix[0, 0], embedding[SOT_TOKEN]):
            raise ExportError(
                f"{path}: prompt_learner.token_prefix is not this CLIP's start-of-text embedding; "
                "the prompt learner was trained on another CLIP (give the --checkpoint it was trained with)"
            )
        notes.append("token_prefix matches")
    if not isinstance(suffix, torch.Tensor):
        return "; ".join(notes + ["no token_suffix: --ctx-init not checked"])
    length = model.context_length
    if suffix.ndim != 3 or suffix.shape[1] != length - 1 - n_ctx or suffix.shape[2] != embedding.shape[1]:
        raise ExportError(
            f"{path}: prompt_learner.token_suffix has shape {list(suffix.shape)}, expected [n_cls, "
            f"{length - 1 - n_ctx}, {embedding.shape[1]}] for {n_ctx} context tokens; the checkpoint is "
            "inconsistent or belongs to another CLIP"
        )
    use_init = bool(ctx_init) and n_ctx <= 4
    expected = _ctx_init_tokens(ctx_init, tokenizer)[n_ctx:] if use_init else []
    default_rest = _ctx_init_tokens(DEFAULT_CTX_INIT, tokenizer)[n_ctx:] if n_ctx <= 4 else []
    shown = max(len(expected), len(default_rest)) + 3
    decoded = _nearest_tokens(suffix[0, :shown], embedding)
    words = _decode(tokenizer, decoded)
    if decoded[: len(expected)] != expected:
        raise ExportError(
            f"{path}: the training prompts continue after the {n_ctx} context tokens with \"{words} ...\" "
            f"(class 0, decoded from prompt_learner.token_suffix), but --ctx-init \"{ctx_init}\" implies "
            f"\"{_decode(tokenizer, expected)}\" there. Pass the TRAINER CTX_INIT of the training config "
            "(--ctx-init \"\" when it was empty or N_CTX > 4), so that the bundle's prompts match the trained ones"
        )
    if not use_init and default_rest and decoded[: len(default_rest)] == default_rest:
        raise ExportError(
            f"{path}: the training prompts continue after the {n_ctx} context tokens with \"{words} ...\", "
            f"as CTX_INIT \"{DEFAULT_CTX_INIT}\" gives, but no --ctx-init was given; pass --ctx-init "
            f"\"{DEFAULT_CTX_INIT}\" (the CTX_INIT of the training config)"
        )
    notes.append(f"token_suffix agrees with the prompt (class 0 continues \"{words} ...\")")
    return "; ".join(notes)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().float(), b.detach().float()
    return a.shape == b.shape and bool(((a - b).abs() <= FP16_ATOL + FP16_RTOL * b.abs()).all())


def check_frozen_clip(state: dict, model: nn.Module, model_name: str, path: Path) -> str:
    """A whole-model save carries the frozen CLIP (`image_encoder.*`, `text_encoder.*`,
    `logit_scale`): a few of its tensors must equal --checkpoint's (up to fp16 rounding)."""
    own = model.state_dict()
    checked = []
    for theirs, ours in FROZEN_CHECKS:
        if theirs in state and isinstance(state[theirs], torch.Tensor):
            if ours not in own or not _close(state[theirs], own[ours]):
                raise ExportError(
                    f"{path}: '{theirs}' differs from '{ours}' of the --checkpoint CLIP ('{model_name}'): the prompt "
                    "learner was trained on another CLIP. Give the --checkpoint (and --arch) it was trained with"
                )
            checked.append(theirs)
    if "logit_scale" in state and isinstance(state["logit_scale"], torch.Tensor):
        theirs, ours = float(state["logit_scale"].float()), float(model.logit_scale.detach())
        if abs(theirs - ours) > 1e-3 * max(1.0, abs(ours)):
            raise ExportError(
                f"{path}: logit_scale {theirs:.4f} != the --checkpoint CLIP's {ours:.4f} (MaPLe and PromptSRC keep "
                "CLIP's): the prompt learner was trained on another CLIP"
            )
        checked.append("logit_scale")
    if not checked:
        return "no frozen CLIP weights in the file: not compared with --checkpoint"
    return f"frozen CLIP weights match --checkpoint ({len(checked)} tensors compared)"


def check_deep_supported(model: nn.Module, model_name: str) -> None:
    """The graphs re-run open_clip's ViT and text transformer block by block."""
    v = getattr(model, "visual", None)
    if not isinstance(v, VisionTransformer):
        raise ExportError(f"'{model_name}' has a {type(v).__name__} image tower; MaPLe/PromptSRC prompt a vision "
                          "transformer (ViT) only")
    if v.attn_pool is not None or v.pool_type != "tok" or v.final_ln_after_pool or not isinstance(v.patch_dropout, nn.Identity):
        raise ExportError(f"'{model_name}': the image tower pools differently from CLIP's ViT (class token after ln_post)")
    blocks = list(v.transformer.resblocks) + list(model.transformer.resblocks)
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise ExportError(f"'{model_name}' uses custom transformer blocks; MaPLe/PromptSRC need CLIP's")
    if not (v.transformer.batch_first and model.transformer.batch_first):
        raise ExportError(f"open_clip {open_clip.__version__} builds sequence-first transformers; export.py follows "
                          "3.3.0 (batch first)")


# ---------------------------------------------------------------------------------------------
# Graph wrappers


class DeepPromptedTextEncoder(nn.Module):
    """open_clip 3.3.0 `CLIP.encode_text`, run block by block, with the shallow context at positions
    1..=n_ctx of the token embedding and each prompted block's deep text prompt written over the
    same positions of its input (`where` over a constant row mask)."""

    def __init__(self, model: nn.Module, ctx: torch.Tensor, layers: dict[int, torch.Tensor]):
        super().__init__()
        self.model = model
        length, width, n_ctx = model.context_length, ctx.shape[1], ctx.shape[0]
        mask = torch.zeros(length, 1, dtype=torch.bool)
        mask[1 : 1 + n_ctx] = True
        self.register_buffer("ctx_mask", mask)
        self.register_buffer("ctx_rows", self._rows(length, width, ctx))
        self.layers = sorted(layers)
        for i in self.layers:
            if layers[i].shape[0] != n_ctx:
                raise ExportError(f"internal: text layer {i} prompt has {layers[i].shape[0]} tokens, context {n_ctx}")
            self.register_buffer(f"layer{i}_rows", self._rows(length, width, layers[i]))

    @staticmethod
    def _rows(length: int, width: int, prompt: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(length, width)
        rows[1 : 1 + prompt.shape[0]] = prompt
        return rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(input_ids).to(cast_dtype)
        x = torch.where(self.ctx_mask, self.ctx_rows.to(cast_dtype), x)
        x = x + m.positional_embedding.to(cast_dtype)
        for i, block in enumerate(m.transformer.resblocks):
            if i in self.layers:
                x = torch.where(self.ctx_mask, getattr(self, f"layer{i}_rows").to(cast_dtype), x)
            x = block(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = text_global_pool(x, input_ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(m.text_projection, nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection


class DeepPromptedImageEncoder(nn.Module):
    """open_clip 3.3.0 `VisionTransformer.forward` with n prompt tokens appended after the positional
    embedding (a zero Pad then + constant rows) and, before each prompted block, the last n tokens
    replaced by that block's deep prompt: `x * keep + rows` with a constant 0/1 token mask `keep`
    and constant rows that are zero except the last n (exact: x * 1 + 0 and x * 0 + p). Unlike a
    `where`, this ends in the Add that ONNX Runtime's CLIP attention fusion expects in front of a
    block, so the prompted blocks are fused too."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, layers: dict[int, torch.Tensor]):
        super().__init__()
        self.model = model
        v = model.visual
        n, width = prompt.shape
        tokens = v.positional_embedding.shape[0]  # class token + patches
        self.n_prompt = n
        keep = torch.ones(tokens + n, 1)
        keep[tokens:] = 0.0
        self.register_buffer("prompt_keep", keep)
        self.register_buffer("prompt_rows", self._rows(tokens, width, prompt))
        self.layers = sorted(layers)
        for i in self.layers:
            if layers[i].shape[0] != n:
                raise ExportError(f"internal: vision layer {i} prompt has {layers[i].shape[0]} tokens, expected {n}")
            self.register_buffer(f"layer{i}_rows", self._rows(tokens, width, layers[i]))

    @staticmethod
    def _rows(tokens: int, width: int, prompt: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(tokens + prompt.shape[0], width)
        rows[tokens:] = prompt
        return rows

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.conv1(pixel_values)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = nn.functional.pad(x, (0, 0, 0, self.n_prompt)) + self.prompt_rows.to(x.dtype)
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            if i in self.layers:
                x = x * self.prompt_keep.to(x.dtype) + getattr(self, f"layer{i}_rows").to(x.dtype)
            x = block(x)
        x = v.ln_post(x[:, 0])
        return x @ v.proj
