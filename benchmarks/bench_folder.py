"""TPT over a folder of images: the official-style loop vs ``promptcore tpt`` (1 process, and N under torchrun).

* official-style: per image, PIL decode, PIL views with torchvision transforms on the CPU, then TPT tuned one
  image at a time with full 77-token prompts (``bench_tpt.official_style_tpt``), as azshue/TPT's loop does;
* promptcore: the folder runner (DataLoader workers decoding with torchvision.io, views made on the device from
  per-image seeds, ``--batch`` images tuned together, rows fsynced per batch), launched as ``python -m
  promptcore tpt`` and as ``torchrun --nproc-per-node N -m promptcore tpt``.

Images/s are over the image loop (model loading and process start excluded; for the runner, the summary's
``images_per_s``, the slowest rank's loop). Random-weight model saved to a temporary weights file, so every
process computes with the same weights; generated JPEGs. Rows go to benchmarks/results/folder.jsonl.

    python benchmarks/bench_folder.py                   # CPU: ViT-B-32, 10 classes, 8 views, 16 images, 1 vs 2
    python benchmarks/bench_folder.py --device cuda --model ViT-B-16 --views 64 --images 256 --batch 16 --procs 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tpt import official_style_tpt, official_style_views  # noqa: E402
from common import append_rows, environment  # noqa: E402

from promptcore.models import builtin_classnames, load_model  # noqa: E402
from promptcore.runner import scan_image_folder  # noqa: E402
from promptcore.tpt import TPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_images(root: Path, images: int, classes: int, size: int) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(images):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = size + 37 * (i % 3), size + 53 * (i % 2)
        arr = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen).numpy()
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)


def official_loop(tpt: TPT, root: Path, views: int, size: int, device: torch.device) -> float:
    """Images/s of the official-style loop over the folder."""
    from PIL import Image

    folder = scan_image_folder(root)
    torch.manual_seed(0)
    start = time.perf_counter()
    for path in folder.paths:
        with Image.open(root / path) as img:
            pil = img.convert("RGB")
        official_style_tpt(tpt, official_style_views([pil], views, size).to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(folder) / (time.perf_counter() - start)


def runner(args, root: Path, weights: Path, names: Path, out: Path, procs: int) -> dict:
    cmd = ["tpt", str(root), "--model", args.model, "--pretrained", str(weights), "--classnames", str(names),
           "--classnames-in-folder-order",  # folders class_000, ... hold the first --classes names in order
           "--views", str(args.views), "--selection", str(args.selection), "--batch", str(args.batch),
           "--precision", args.precision, "--device", args.device, "--workers", str(args.workers), "--quiet",
           "--out", str(out)]
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={procs}"]
    res = subprocess.run([*launcher, "-m", "promptcore", *cmd], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"promptcore tpt failed ({procs} process(es)):\n{res.stderr[-3000:]}")
    return json.loads(out.with_name(out.stem + ".summary.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--dataset", default="imagenet", help="class names; the first --classes are used")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["amp", "fp32", "fp16", "bf16"],
                        help="default amp on CUDA (official), fp32 on CPU")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--selection", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="runner process counts (torchrun)")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = parser.parse_args(argv)
    args.precision = args.precision or ("amp" if args.device.startswith("cuda") else "fp32")
    if args.classes > args.images:
        parser.error(f"--classes {args.classes} needs at least as many --images (one class folder each)")
    row = run(args)
    if not args.no_save:
        print(f"row appended to {append_rows('folder.jsonl', [row])}")


def run(args) -> dict:
    """One measurement row (official-style loop, then the runner at each of ``args.procs``)."""
    device = torch.device(args.device)
    weights_dtype = "fp32" if args.precision == "amp" else args.precision
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, None, device, weights_dtype)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    names = builtin_classnames(args.dataset)
    row = {"bench": "folder", "model": args.model, "precision": args.precision, "classes": args.classes,
           "views": args.views, "images": args.images, "batch": args.batch, "workers": args.workers,
           "load_average_1m_start": os.getloadavg()[0], **environment(device)}
    with tempfile.TemporaryDirectory(prefix="promptcore-bench-folder.") as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        write_images(root, args.images, args.classes, size)
        weights = tmp / "weights.pt"
        torch.save(model.state_dict(), weights)
        tpt = TPT(model, names[:args.classes], tokenizer=tokenizer, n_views=args.views, selection=args.selection,
                  precision="amp" if args.precision == "amp" else "native", batch_size=args.batch, seed=0)
        row["official_images_per_s"] = official_loop(tpt, root, args.views, size, device)
        print(f"official-style loop: {row['official_images_per_s']:.3f} images/s", flush=True)
        names_file = tmp / "names.txt"
        names_file.write_text("\n".join(names[:args.classes]) + "\n")
        for procs in args.procs:
            summary = runner(args, root, weights, names_file, tmp / f"preds-{procs}.jsonl", procs)
            rate = summary["images_per_s"]
            row[f"runner_{procs}proc_images_per_s"] = rate
            row[f"runner_{procs}proc_speedup"] = rate / row["official_images_per_s"]
            print(f"promptcore tpt, {procs} process(es): {rate:.3f} images/s, "
                  f"{rate / row['official_images_per_s']:.2f}x the official-style loop", flush=True)
        if len(args.procs) > 1:
            base = row[f"runner_{args.procs[0]}proc_images_per_s"]
            for procs in args.procs[1:]:
                row[f"scaling_{procs}_vs_{args.procs[0]}"] = row[f"runner_{procs}proc_images_per_s"] / base
                print(f"{procs} vs {args.procs[0]} process(es): {row[f'scaling_{procs}_vs_{args.procs[0]}']:.2f}x")
    row["load_average_1m_end"] = os.getloadavg()[0]  # other work on the machine skews CPU ratios
    return row


if __name__ == "__main__":
    main()
