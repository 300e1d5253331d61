"""The main job on a built-in default: train CoOp for a few steps on a random-weight CLIP, then
compare the naive (official, full 77-token) and fast (shared-prefix, EOT-truncated) text paths."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .coop import CoOp
from .models import builtin_classnames, load_model, square_image_size


def _timed(fn, repeats: int):
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return out, times[len(times) // 2]


def run_demo(model_name="ViT-B-16", pretrained=None, dataset="imagenet", num_classes=100, n_ctx=16, steps=5,
             batch=8, device="cpu", precision="fp32", seed=0, repeats=1, log=print) -> dict:
    """Run the demo and return its figures (also printed through ``log``)."""
    torch.manual_seed(seed)
    names = builtin_classnames(dataset)[:num_classes]  # validate cheap arguments before building the model
    model, tokenizer = load_model(model_name, pretrained, device, precision, seed=seed)
    coop = CoOp(model, names, tokenizer=tokenizer, n_ctx=n_ctx, seed=seed).to(device)
    prompts = coop.prompt_learner.prompts
    live_fast, live_naive = prompts.live_tokens
    log(f"model {model_name} ({'random weights' if pretrained is None else pretrained}), {precision}, {device}; "
        f"{len(names)} {dataset} classes, n_ctx={coop.n_ctx}")
    log(f"tokens per layer: naive {live_naive}, fast {live_fast} "
        f"(prefix {prompts.prefix_len} + {len(names)} suffixes of up to {prompts.suffix_len} tokens in "
        f"{len(prompts.buckets)} length buckets), "
        f"ratio {live_naive / live_fast:.1f}x")

    size = square_image_size(model)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, len(names), (batch,), generator=gen).to(device)
    with torch.no_grad():
        image_features = coop.encode_images(images)  # the image tower is frozen: encode once

    optimizer = torch.optim.SGD(coop.prompt_learner.parameters(), lr=0.002 * 100, momentum=0.9)
    coop.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = F.cross_entropy(coop.logits(image_features, coop.text_features()).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        log(f"step {step + 1}/{steps}: loss {loss.item():.4f}")
    train_time = time.perf_counter() - start

    coop.eval()
    with torch.no_grad():
        coop.encode_text("naive"), coop.encode_text("fast")  # warm-up
        naive, t_naive = _timed(lambda: coop.encode_text("naive"), repeats)
        fast, t_fast = _timed(lambda: coop.encode_text("fast"), repeats)
        logits_naive = coop.logits(image_features, naive)
        logits_fast = coop.logits(image_features, fast)
    rel = ((fast.double() - naive.double()).abs().max() / naive.double().abs().max()).item()
    agree = (logits_fast.argmax(-1) == logits_naive.argmax(-1)).float().mean().item()
    max_logit_diff = (logits_fast.double() - logits_naive.double()).abs().max().item()
    log(f"agreement: text features max rel diff {rel:.2e}, logits max abs diff {max_logit_diff:.2e}, "
        f"top-1 agreement {agree * 100:.1f}%")
    log(f"text encoding forward: naive {t_naive * 1e3:.1f} ms, fast {t_fast * 1e3:.1f} ms, "
        f"speed-up {t_naive / t_fast:.1f}x (training: {steps} steps in {train_time:.1f} s)")
    return {"losses": losses, "max_rel_diff": rel, "top1_agreement": agree, "max_logit_diff": max_logit_diff,
            "naive_s": t_naive, "fast_s": t_fast, "speedup": t_naive / t_fast,
            "token_ratio": live_naive / live_fast}
