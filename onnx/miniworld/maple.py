"""Stage 3 (MaPLe): multi-modal prompt learning on base classes, CLIP frozen, logit scale fixed.

The official MaPLe (muzairkhattak/multimodal-prompt-learning, trainers/maple.py) scaled to the
mini-world CLIP: MultiModalPromptLearner with N_CTX 2, CTX_INIT "a photo of a" (its first two
token embeddings initialise `ctx`; the words "of a" stay in every prompt), PROMPT_DEPTH
min(9, text blocks, vision blocks) = min(9, 2, 3) = 2 here, `proj` and the compound prompt
projections Linear(text width 64 -> vision width 128) (officially Linear(512, 768), ViT-B/16's
widths), the compound text prompts N(0, 0.02^2) and the compound projections clones of one
initial layer (`_get_clones`), as officially.

The forward is the one the export's parity check uses as its reference,
onnx/fixtures/deep_prompt_reference.py (MultiModalPromptLearner.forward, TextEncoder.forward with
compound_prompts_deeper_text, VisionTransformer_MaPLe.forward), called through `__wrapped__` so
that gradients flow (its public functions run under torch.no_grad): training and the exported
graphs' reference are the same computation. The image tower's prompts are learned, so image
features are recomputed from pixels at every step (CoOp can precompute them).

The optimisation is CoOp's in coop.py (same shots, seeds, shuffling, SGD momentum 0.9, cosine
per step, 100 epochs, batch 32, no weight decay, no warm-up). The learned tensors are saved as an
official-layout Dassl checkpoint (torch.save of {"state_dict", "epoch", "optimizer", "scheduler",
"val_result"}, official key names), which onnx/export.py --method maple reads.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"))
import deep_prompt_reference as ref  # noqa: E402  (the official forward; the export's parity reference)

N_CTX = 2
CTX_INIT = "a photo of a"
MAX_PROMPT_DEPTH = 9  # the official configs' PROMPT_DEPTH (vit_b16_c2_ep5_batch4_2ctx)
TEMPLATE = CTX_INIT + " {}."  # the official prompt: CTX_INIT + " " + name + "."

# the reference functions without their torch.no_grad decorator (same code, gradients kept)
_prompt_learner_forward = ref.maple_prompt_learner.__wrapped__
_text_forward = ref.maple_text_features.__wrapped__
_image_forward = ref.maple_image_features.__wrapped__


def prompt_depth(clip) -> int:
    """PROMPT_DEPTH: the official 9, capped by the blocks of the shorter tower (MaPLe prompts block
    i of both towers with the same compound prompt)."""
    return min(MAX_PROMPT_DEPTH, len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))


class MultiModalPromptLearner(nn.Module):
    """trainers/maple.py MultiModalPromptLearner (its parameters and buffers, official names)."""

    def __init__(self, clip, classnames: list[str], depth: int | None = None):
        super().__init__()
        depth = prompt_depth(clip) if depth is None else depth
        assert depth >= 1
        text_width = clip.token_embedding.weight.shape[1]
        vision_width = clip.visual.transformer.width
        with torch.no_grad():
            init = clip.token_embedding(common.tokenize([CTX_INIT]))[0, 1:1 + N_CTX].clone()
        self.ctx = nn.Parameter(init)
        self.proj = nn.Linear(text_width, vision_width)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(N_CTX, text_width)) for _ in range(depth - 1)])
        for p in self.compound_prompts_text:
            nn.init.normal_(p, std=0.02)
        single_layer = nn.Linear(text_width, vision_width)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single_layer) for _ in range(depth - 1)])
        self.tokenized_prompts = common.tokenize([TEMPLATE.format(c) for c in classnames])
        with torch.no_grad():
            embedding = clip.token_embedding(self.tokenized_prompts)
        self.register_buffer("token_prefix", embedding[:, :1, :].clone())  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + N_CTX:, :].clone())  # "of a" CLS . EOS

    def prompts(self):
        """MultiModalPromptLearner.forward's prompt outputs: (shared_ctx, compound text prompts,
        visual deep prompts)."""
        return _prompt_learner_forward(
            self.ctx, self.proj.weight, self.proj.bias, list(self.compound_prompts_text),
            [(layer.weight, layer.bias) for layer in self.compound_prompt_projections])


class MaPLe(nn.Module):
    """CustomCLIP of trainers/maple.py on a frozen open_clip CLIP (prompt_learner + both encoders)."""

    def __init__(self, clip, classnames: list[str], depth: int | None = None):
        super().__init__()
        self.clip = clip
        for p in clip.parameters():
            p.requires_grad_(False)
        self.prompt_learner = MultiModalPromptLearner(clip, classnames, depth)

    def text_features(self, input_ids: torch.Tensor, prompts=None) -> torch.Tensor:
        shared_ctx, compound, visual_deep = self.prompt_learner.prompts() if prompts is None else prompts
        return _text_forward(self.clip, self.prompt_learner.ctx, compound, input_ids)

    def image_features(self, pixels: torch.Tensor, prompts=None) -> torch.Tensor:
        shared_ctx, compound, visual_deep = self.prompt_learner.prompts() if prompts is None else prompts
        return _image_forward(self.clip, pixels, shared_ctx, visual_deep)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The prompt learner's tensors under the official CustomCLIP names (`prompt_learner.*`),
        plus CLIP's logit_scale (in the official whole-model save; export.py compares it)."""
        state = {f"prompt_learner.{k}": v.detach().clone().contiguous()
                 for k, v in self.prompt_learner.state_dict().items()}
        state["logit_scale"] = self.clip.logit_scale.detach().clone()
        return state


def ids_for(classes: list[str]) -> torch.Tensor:
    return common.tokenize([TEMPLATE.format(c) for c in classes])


def train(clip, pixels: torch.Tensor, labels: torch.Tensor, classes: list[str], seed: int,
          epochs: int = 100, batch: int = 32, lr: float = 0.0035):
    """pixels: preprocessed [N, 3, S, S] shots; labels index `classes` (the base classes).
    Returns (model, info) with the final epoch's mean loss and whether training stayed finite."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = MaPLe(clip, classes)
    clip.eval()
    ids = model.prompt_learner.tokenized_prompts
    scale = clip.logit_scale.exp().item()
    params = [p for p in model.prompt_learner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    step = 0
    finite = True
    losses = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            prompts = model.prompt_learner.prompts()
            text = F.normalize(model.text_features(ids, prompts), dim=-1)
            image = F.normalize(model.image_features(pixels[idx], prompts), dim=-1)
            loss = F.cross_entropy(scale * image @ text.T, labels[idx])
            if not torch.isfinite(loss):
                finite = False
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        if not finite:
            break
    model.eval()
    model.optimizer_state = opt.state_dict()
    return model, {"lr": lr, "steps": step, "finite": finite,
                   "final_epoch_loss": float(np.mean(losses)) if losses else float("nan")}


@torch.no_grad()
def features(model: MaPLe, pixels: torch.Tensor, classes: list[str], batch: int = 512):
    """Normalised (image features [N, D], text features [C, D]) of the trained model."""
    prompts = model.prompt_learner.prompts()
    image = torch.cat([model.image_features(pixels[i:i + batch], prompts) for i in range(0, len(pixels), batch)])
    text = model.text_features(ids_for(classes), prompts)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def save_dassl_checkpoint(model: MaPLe, path: str, epoch: int) -> None:
    """Dassl's save_checkpoint layout, as MultiModalPromptLearner/model.pth.tar-<epoch>."""
    torch.save({"state_dict": model.official_state_dict(), "epoch": epoch,
                "optimizer": getattr(model, "optimizer_state", None),
                "scheduler": {"kind": "cosine per step (closed form)", "last_epoch": epoch},
                "val_result": None}, path)
