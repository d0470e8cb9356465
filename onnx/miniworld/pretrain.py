"""Stage 1: pretrain a tiny open_clip CLIP on captioned mini-world images (seen combinations only).

Contrastive loss is open_clip's `ClipLoss`; the tokenizer is open_clip's `tokenize` with the real
49 408-token vocabulary. The logit scale starts at log(100) (real CLIP ends at its clamp of 100; from log(10) it only
reached ~21 after 500 steps and was levelling off) with its own learning rate
(no weight decay), clamped at log(100) after every step as open_clip's trainer does, so it can
reach the regime real CLIP sits in (the clamp).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import numpy as np
import open_clip
import torch

import common
from common import world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(common.WORK, "pretrained.pt"))
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale-lr", type=float, default=1e-3)
    ap.add_argument("--init-scale", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: with other jobs on the 2 cores, 2 OpenMP threads ran 5-10x slower)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    seen = world.pretrain_seen()
    t0 = time.time()
    u8, labels, attrs = common.render_set(seen, args.per_class, args.seed, "pretrain")
    pixels = torch.from_numpy(common.to_pixel_values(u8))
    print(f"rendered {len(labels)} pretraining images of {len(seen)} seen classes in {time.time() - t0:.0f}s", flush=True)

    model = common.build_model(init_logit_scale=math.log(args.init_scale))
    model.train()
    scale_params = [model.logit_scale]
    other_decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n and "token_embedding" not in n
                   and "positional_embedding" not in n and "class_embedding" not in n]
    decay_ids = {id(p) for p in other_decay}
    no_decay = [p for n, p in model.named_parameters() if id(p) not in decay_ids and "logit_scale" not in n]
    opt = torch.optim.AdamW([
        {"params": other_decay, "weight_decay": 0.1, "lr": args.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": args.lr},
        {"params": scale_params, "weight_decay": 0.0, "lr": args.scale_lr},
    ], betas=(0.9, 0.98), eps=1e-6)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loss_fn = open_clip.ClipLoss()
    rng = random.Random(args.seed)
    n = len(labels)
    perm = []
    warmup = max(1, args.steps // 20)
    history = []
    t0 = time.time()
    for step in range(args.steps):
        frac = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * frac
        if len(perm) < args.batch:
            perm = list(range(n))
            rng.shuffle(perm)
        idx = [perm.pop() for _ in range(args.batch)]
        texts = [world.caption(seen[labels[i]], attrs[i], rng) for i in idx]
        tokens = common.tokenize(texts)
        image_f, text_f, scale = model(pixels[idx], tokens)[:3]
        loss = loss_fn(image_f, text_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.steps - 1:
            s = model.logit_scale.exp().item()
            history.append({"step": step, "loss": round(loss.item(), 4), "logit_scale": round(s, 2)})
            print(f"step {step} loss {loss.item():.3f} scale {s:.1f} {time.time() - t0:.0f}s", flush=True)

    model.eval()
    torch.save({"state_dict": model.state_dict(), "config": common.model_config()}, args.out)
    info = {"seconds": round(time.time() - t0), "final_logit_scale": model.logit_scale.exp().item(),
            "steps": args.steps, "batch": args.batch, "init_logit_scale": args.init_scale, "scale_lr": args.scale_lr, "lr": args.lr, "images": n, "seen_classes": len(seen), "history": history}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    print(f"saved {args.out}; final logit scale {info['final_logit_scale']:.2f}")


if __name__ == "__main__":
    main()
