"""Stage 2: CoOp (and KgCoOp) prompt learning on base classes, CLIP frozen, logit scale fixed.

Class-agnostic context of n_ctx tokens: 4 (the demo) initialised from the embeddings of "a photo
of a" (as the CoOp/CoCoOp base-to-new setting does); any other n_ctx (16 is CoOp's default)
initialised as CoOp does without CTX_INIT, N(0, 0.02) (seeded). Prompt = [SOS] ctx_1..ctx_4 [class-name tokens] "." [EOS],
built exactly as the exported fine-tuned text graph builds it from the ids of "X X X X {}.".
KgCoOp adds lambda * mean_c ||w_c - w_c^zs||^2 over the (normalised) base-class text features.
The learned context is saved in the project's prompt-learner format (safetensors, tensor `ctx`
[n_ctx, width], metadata `method`).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import common

N_CTX = 4
CTX_INIT = "a photo of a"
ZS_TEMPLATE = "a photo of a {}."


class PromptLearner(torch.nn.Module):
    def __init__(self, clip, n_ctx: int = N_CTX):
        super().__init__()
        self.clip = clip
        self.n_ctx = n_ctx
        for p in clip.parameters():
            p.requires_grad_(False)
        if n_ctx == N_CTX:
            ids = common.tokenize([CTX_INIT])[0]
            with torch.no_grad():
                init = clip.token_embedding(ids[1:1 + N_CTX]).clone()
        else:  # CoOp's random initialisation (torch.manual_seed is set by train())
            init = torch.empty(n_ctx, clip.token_embedding.weight.shape[1]).normal_(std=0.02)
        self.ctx = torch.nn.Parameter(init)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        x = clip.token_embedding(ids)
        ctx = self.ctx.unsqueeze(0).expand(ids.shape[0], -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx:]], dim=1)
        x = x + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
        return x @ clip.text_projection


def ft_template(n_ctx: int = N_CTX) -> str:
    return " ".join(["X"] * n_ctx) + " {}."


def ft_ids(classes, n_ctx: int = N_CTX):
    return common.tokenize([ft_template(n_ctx).format(c) for c in classes])


def zs_ids(classes):
    return common.tokenize([ZS_TEMPLATE.format(c) for c in classes])


def train(clip, image_features: torch.Tensor, labels: torch.Tensor, classes: list[str], seed: int,
          method: str = "coop", epochs: int = 100, batch: int = 32, lr: float = 2e-3, kg_lambda: float = 8.0,
          n_ctx: int = N_CTX):
    """image_features: normalised [N, D] (frozen image encoder); labels index `classes`."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    learner = PromptLearner(clip, n_ctx)
    ids = ft_ids(classes, n_ctx)
    with torch.no_grad():
        zs = F.normalize(clip.encode_text(zs_ids(classes)), dim=-1)
    scale = clip.logit_scale.exp().item()
    opt = torch.optim.SGD([learner.ctx], lr=lr, momentum=0.9)
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            text = F.normalize(learner.encode(ids), dim=-1)
            logits = scale * image_features[idx] @ text.T
            loss = F.cross_entropy(logits, labels[idx])
            if method == "kgcoop":
                loss = loss + kg_lambda * ((text - zs) ** 2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return learner


def save_prompt_learner(learner: PromptLearner, path: str, method: str):
    save_file({"ctx": learner.ctx.detach().clone().contiguous()}, path, metadata={"method": method})
