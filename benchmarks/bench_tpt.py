"""TPT, official-style (one image at a time) vs promptcore (batched), images/s and predictions.

(1) ``views``: the same pre-made views for both. Official-style: per image, reset the context,
    fresh torch.optim.AdamW, every step re-encode all views and the full 77-token prompts of every
    class (as azshue/TPT does), select on the first step, predict view 0. promptcore: ``TPT.adapt``
    on ``--batch`` images at once (view features once, shared-prefix EOT-truncated text, one prompt
    prefix per image, batched AdamW).
(2) ``e2e``: from decoded images. Official-style: PIL views per image with torchvision transforms
    (Resize+CenterCrop, RandomResizedCrop+flip, ToTensor, Normalize), then (1)'s loop. promptcore:
    uint8 tensors on the device, ``TPT.predict`` (views made on the device, batched tuning). The
    views are random on both sides, so predictions agree only statistically here.

Random-weight models (no download), random images: the figures are about speed, and prediction
agreement in (1) is the equivalence check. Rows go to benchmarks/results/tpt.jsonl.

    python benchmarks/bench_tpt.py                     # CPU: ViT-B-16, 10 classes, 8 views, 4 images
    python benchmarks/bench_tpt.py --device cuda --classes 200 1000 --views 64 --images 64 --batch 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    append_rows,
    bench_model,
    case_args,
    comparison_fields,
    environment,
    image_flops,
    measure,
    peak_tflops_for,
    text_flops,
    text_tower_size,
)

from promptcore.models import builtin_classnames  # noqa: E402
from promptcore.tpt import TPT  # noqa: E402
from promptcore.views import CLIP_MEAN, CLIP_STD  # noqa: E402


def official_style_tpt(tpt: TPT, views: torch.Tensor) -> torch.Tensor:
    """One image at a time, as tpt_classification.py: returns view-0 logits (N, C)."""
    scale = tpt.model.logit_scale.detach().exp()
    prompts = tpt.prompt_learner.prompts
    k = int(views.shape[1] * tpt.selection)
    out = []
    for n in range(views.shape[0]):
        ctx = torch.nn.Parameter(tpt.prompt_learner.ctx.detach().clone().float())  # reset
        opt = torch.optim.AdamW([ctx], lr=tpt.lr, weight_decay=tpt.weight_decay)  # fresh state
        idx = None

        def logits_of(v):
            with tpt.autocast():
                with torch.no_grad():
                    img = tpt.model.encode_image(v.to(tpt.image_dtype))
                txt = tpt.engine.encode_naive(prompts, ctx.unsqueeze(0))[0]
            return scale * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).t()

        for _ in range(tpt.steps):
            logits = logits_of(views[n])
            if idx is None:
                ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
                idx = torch.argsort(ent)[:k]
            kept = logits[idx]
            logp = kept - kept.logsumexp(dim=-1, keepdim=True)
            avg = logp.logsumexp(dim=0) - torch.log(torch.tensor(float(k)))
            loss = -(avg * avg.exp()).sum()
            opt.zero_grad()
            (loss * tpt.loss_scale).backward()
            if tpt.loss_scale != 1.0:
                ctx.grad.mul_(1.0 / tpt.loss_scale)
            opt.step()
        with torch.no_grad():
            out.append(logits_of(views[n, :1])[0])
    return torch.stack(out)


def official_style_views(pil_images, n_views: int, size: int) -> torch.Tensor:
    """PIL views per image with torchvision transforms, as the official AugMixAugmenter (no AugMix)."""
    from torchvision import transforms as T

    base = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    aug = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])
    post = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([torch.stack([post(base(im))] + [post(aug(im)) for _ in range(n_views - 1)])
                        for im in pil_images])


def run(args) -> list:
    device = torch.device(args.device)
    weights = "fp32" if args.precision == "amp" else args.precision
    model, tokenizer = bench_model(args.model, device, weights)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    names = builtin_classnames(args.dataset)
    env = environment(device)
    gen = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (3, size + 37 * (i % 3), size + 53 * (i % 2)), dtype=torch.uint8, generator=gen)
           for i in range(args.images)]
    rows = []
    for num_classes in args.classes:
        tpt = TPT(model, names[:num_classes], tokenizer=tokenizer, n_views=args.views, selection=args.selection,
                  steps=args.steps, precision="amp" if args.precision == "amp" else "native", batch_size=args.batch,
                  seed=0)
        # useful work per image: its views through the image tower once, and per step the shared-prefix text
        # forward and backward (about two forwards: frozen weights) plus the final forward for view 0
        width, layers = text_tower_size(model)
        text_fwd = text_flops(tpt.prompt_learner.prompts, width, layers, "fast")
        useful = args.images * (image_flops(model, args.views) + (2 * args.steps + 1) * text_fwd)
        peak = peak_tflops_for(args.peaks, args.precision) if args.peaks else None
        common = {"bench": "tpt", "model": args.model, "precision": args.precision, "classes": num_classes,
                  "views": args.views, "images": args.images, "batch": args.batch, "steps": args.steps, **env}
        if "views" in args.cases:
            views = tpt.make_views([r.to(device) for r in raw], torch.Generator().manual_seed(1))
            res = {}

            def official():
                res["official"] = official_style_tpt(tpt, views)

            def ours():
                res["promptcore"] = torch.cat([tpt.adapt(views[i:i + args.batch]).logits
                                               for i in range(0, args.images, args.batch)])

            t_off = measure(official, device, args.repeats, args.warmup)
            t_our = measure(ours, device, args.repeats, args.warmup)
            agree = (res["official"].argmax(-1) == res["promptcore"].argmax(-1)).float().mean().item()
            rel = ((res["official"] - res["promptcore"]).abs().max() / res["official"].abs().max()).item()
            rows.append(_row(common, "views", t_off, t_our, args.images, {"pred_agreement": agree,
                                                                          "logits_max_rel_diff": rel},
                             useful, peak))
        if "e2e" in args.cases:
            from PIL import Image

            pil = [Image.fromarray(r.permute(1, 2, 0).numpy()) for r in raw]
            on_device = [r.to(device) for r in raw]
            res = {}

            def official_e2e():
                torch.manual_seed(2)
                res["official"] = official_style_tpt(tpt, official_style_views(pil, args.views, size).to(device))

            def ours_e2e():
                res["promptcore"] = tpt.predict(on_device, generator=torch.Generator().manual_seed(2))

            t_off = measure(official_e2e, device, args.repeats, args.warmup)
            t_our = measure(ours_e2e, device, args.repeats, args.warmup)
            agree = (res["official"].argmax(-1) == res["promptcore"]).float().mean().item()
            rows.append(_row(common, "e2e", t_off, t_our, args.images, {"pred_agreement_random_views": agree},
                             useful, peak))
    return rows


def _row(common, case, t_off, t_our, images, extra, useful_flops=None, peak_tflops=None):
    row = {**common, "case": case, "official": t_off, "promptcore": t_our,
           "official_images_per_s": images / t_off["median_s"], "promptcore_images_per_s": images / t_our["median_s"],
           "speedup": t_off["median_s"] / t_our["median_s"], **extra,
           **comparison_fields({"official": t_off, "promptcore": t_our}, "official", useful_flops, peak_tflops)}
    print(f"{row['model']} {row['precision']} classes={row['classes']:5d} views={row['views']:3d} {case:5s} "
          f"official {row['official_images_per_s']:8.3f} img/s  promptcore {row['promptcore_images_per_s']:8.3f} img/s"
          f"  speed-up {row['speedup']:.2f}x  " + "  ".join(f"{k}={v:.3g}" for k, v in extra.items()), flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights) or 'tiny'")
    parser.add_argument("--dataset", default="imagenet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["amp", "fp32", "fp16", "bf16"],
                        help="default amp on CUDA (official), fp32 on CPU")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="default 200 1000 (GPU), 10 (CPU)")
    parser.add_argument("--views", type=int, default=None, help="default 64 (GPU), 8 (CPU)")
    parser.add_argument("--selection", type=float, default=None, help="default 0.1 (GPU), 0.25 (CPU)")
    parser.add_argument("--images", type=int, default=None, help="default 64 (GPU), 4 (CPU)")
    parser.add_argument("--batch", type=int, default=None, help="images tuned together; default 16 (GPU), 4 (CPU)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=["views", "e2e"], choices=["views", "e2e"])
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (GPU), 1 (CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="default 1 (GPU), 0 (CPU)")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    return parser


def resolve(args):
    gpu = str(args.device).startswith("cuda")
    args.precision = args.precision or ("amp" if gpu else "fp32")
    args.classes = args.classes or ([200, 1000] if gpu else [10])
    args.views = args.views or (64 if gpu else 8)
    args.selection = args.selection or (0.1 if gpu else 0.25)
    args.images = args.images or (64 if gpu else 4)
    args.batch = args.batch or (16 if gpu else 4)
    args.repeats = args.repeats or (5 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (1 if gpu else 0)
    return args


def case(**options) -> list:
    """Run this benchmark from Python (options named like the flags); returns the rows without saving them."""
    return run(case_args(build_parser(), resolve, options))


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    args.peaks = None
    rows = run(args)
    if not args.no_save:
        print(f"rows appended to {append_rows('tpt.jsonl', rows)}")


if __name__ == "__main__":
    main()
