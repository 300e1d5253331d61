"""Every promptcore benchmark in one process, one run: the device's peaks, the kernels, the methods.

    python benchmarks/run_all.py                  # CUDA if present, else CPU; into benchmarks/results/<device>
    python benchmarks/run_all.py --device cpu --out /tmp/bench
    python benchmarks/run_all.py --smoke                 # every case at tiny sizes on CPU, a few minutes at most
    python benchmarks/run_all.py --cases kernels text_encoding --resume
    python benchmarks/run_all.py --device cpu --threads 1 --no-compile    # how the committed CPU figures were made

In order, in the same process:

1. ``peaks``: the device's measured copy bandwidth (GB/s, bytes read + written) and matmul
   throughput (TFLOP/s; fp16 and bf16 on CUDA, fp32 on CPU). Every fraction of peak refers to them.
2. ``kernels``: each fused op (cosine scoring, prefix attention, prompt assembly) fwd / bwd /
   fwd+bwd against its eager PyTorch reference, ``torch.compile`` of the reference, SDPA on the
   prefix K/V expanded over classes and FlexAttention with the equivalent block mask
   (benchmarks/kernels/bench_kernels.py). The Triton provider runs on CUDA only (CPU: interpreter).
3. the methods next to their official-style paths: text encoding fwd and fwd+bwd
   (bench_text_encoding.py; with it, the fast path eager vs ``capture="compile"`` vs
   ``"cudagraphs"`` at 10 and 100 classes, rows ``bench="capture"``), CoOp and MaPLe eval vs the
   bare image encoder (bench_eval.py), CoCoOp vs the per-image loop (bench_cocoop.py), TPT with
   views given and end to end vs sequential official-style (bench_tpt.py), ZeroShot vs open_clip's
   builder when ``promptcore.ZeroShot`` exists (bench_zeroshot.py), onnxruntime vs PyTorch
   (bench_export.py); 10/100/1000 classes in fp16 and bf16 on CUDA, smaller on CPU.

Writes to ``--out DIR``: ``results.jsonl`` (one JSON row per measurement, each with device name,
driver, torch/triton versions, git sha and date; appended case by case, so ``--resume`` continues
a run that stopped), ``summary.md`` (every comparison: speed-up over the baseline and fraction of
the measured peak) and one PNG plot per benchmark (when matplotlib is installed). The README's
table is generated from a committed results file by benchmarks/make_table.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "kernels"))

import torch  # noqa: E402

CASES = ("kernels", "text_encoding", "coop_eval", "maple_eval", "cocoop", "tpt", "zeroshot", "export")


@dataclass
class Plan:
    """Sizes of one run: the full GPU run, a CPU run (ratios only) or the smoke run (tiny, seconds)."""

    device: str
    smoke: bool
    compile: bool
    model: str = "ViT-B-16"
    export_model: str = "ViT-B-16"
    precisions: List[str] = field(default_factory=lambda: ["fp16", "bf16"])
    classes: List[int] = field(default_factory=lambda: [10, 100, 1000])
    text_classes: Optional[List[int]] = None  # text encoding's class counts when they differ
    kernel_size: str = "gpu"
    eval_batch: int = 128
    cocoop_batch: int = 100
    tpt: Dict = field(default_factory=lambda: dict(classes=[10, 100, 1000], views=64, images=64, batch=16,
                                                   selection=0.1))
    export: Dict = field(default_factory=lambda: dict(classes=1000, batch=64))
    depth: int = 9
    repeats: int = 20
    zeroshot_templates: int = 80

    @property
    def label(self) -> str:
        return "smoke" if self.smoke else self.device


def make_plan(device: str, smoke: bool, compile_: bool) -> Plan:
    """The sizes for a device: real sizes on CUDA, smaller ones on CPU, tiny ones for ``--smoke``."""
    if smoke:
        return Plan(device=device, smoke=True, compile=compile_, model="tiny", export_model="tiny",
                    precisions=["fp32"] if device == "cpu" else ["fp16"], classes=[5], kernel_size="smoke",
                    eval_batch=2, cocoop_batch=2, tpt=dict(classes=[5], views=4, images=2, batch=2, selection=0.5),
                    export=dict(classes=5, batch=2, methods=["coop"]), depth=2, repeats=2, zeroshot_templates=2)
    if device == "cpu":
        # a shared 2-core CPU runs ViT-B-16's naive text path at a few GFLOP/s: 10 classes (text encoding: 50 too)
        return Plan(device=device, smoke=False, compile=compile_, export_model="ViT-B-32", precisions=["fp32"],
                    classes=[10], text_classes=[10, 50], kernel_size="cpu", eval_batch=2, cocoop_batch=2,
                    tpt=dict(classes=[10], views=8, images=2, batch=2, selection=0.25),
                    export=dict(classes=10, batch=4, methods=["coop", "cocoop"]), repeats=2, zeroshot_templates=8)
    return Plan(device=device, smoke=False, compile=compile_)


# ----------------------------------------------------------------------------------------------
# cases: each returns rows; the scripts do the measuring


def case_kernels(plan: Plan, peaks: dict) -> list:
    import bench_kernels

    rows = []
    for precision in plan.precisions:
        rows += bench_kernels.case(dtype=precision, size=plan.kernel_size, device=plan.device,
                                   repeats=5 if plan.smoke else None, peaks=peaks, compile=plan.compile)
    return rows


def case_text_encoding(plan: Plan, peaks: dict) -> list:
    import bench_text_encoding

    return [row for precision in plan.precisions for row in bench_text_encoding.case(
        model=plan.model, device=plan.device, precision=precision, classes=plan.text_classes or plan.classes,
        n_ctx=[4] if plan.smoke else [16], repeats=plan.repeats, peaks=peaks,
        # compiling the whole naive 12-layer encoder takes minutes per shape on a CPU: GPU runs only
        compile=plan.compile and plan.device == "cuda")] + capture_rows(plan, peaks)


def capture_rows(plan: Plan, peaks: dict) -> list:
    """Rows ``bench="capture"``: CoOp's fast text path eager vs ``capture="compile"`` vs ``"cudagraphs"``
    (promptcore.capture), fwd and fwd+bwd, at 10 and 100 classes, where launch overhead dominates.

    "cudagraphs" runs on CUDA only (a skipped row on CPU). The smoke run compiles with the ``aot_eager``
    backend (no C++ toolchain, seconds); other runs with inductor, and on CPU only with ``--compile``.
    """
    from common import bench_model, comparison_fields, environment, measure

    from promptcore import CoOp
    from promptcore.models import builtin_classnames

    device = torch.device(plan.device)
    rows = []
    if device.type != "cuda":
        rows.append({"bench": "capture", "provider": "cudagraphs", "skipped": "capture='cudagraphs' records CUDA "
                     "graphs: CUDA only"})
        if not (plan.smoke or plan.compile):
            rows.append({"bench": "capture", "provider": "compile", "skipped": "torch.compile on CPU runs with "
                         "--compile only (inductor builds C++ kernels: minutes per shape)"})
            return rows
    captures = {"eager": ("none", None)}
    captures["compile"] = ("compile", {"backend": "aot_eager"} if plan.smoke else None)
    if device.type == "cuda":
        captures["cudagraphs"] = ("cudagraphs", None)
    names = builtin_classnames("imagenet")
    env = environment(device)
    for precision in plan.precisions:
        model, tokenizer = bench_model(plan.model, device, precision)
        for classes in plan.classes if plan.smoke else [10, 100]:
            for mode in ("fwd+bwd",) if plan.smoke else ("fwd", "fwd+bwd"):  # smoke: both graphs, one compile
                timings, compile_s = {}, {}
                for provider, (capture, options) in captures.items():
                    torch._dynamo.reset()  # a fresh compile per configuration (dynamo caps entries per function)
                    coop = CoOp(model, names[:classes], tokenizer=tokenizer, n_ctx=4 if plan.smoke else 16, seed=0,
                                capture=capture)
                    if options:
                        coop.engine.fast.compile_options.update(options)
                    ctx = coop.prompt_learner.ctx

                    def step(coop=coop, ctx=ctx):
                        if mode == "fwd":
                            with torch.no_grad():
                                return coop.encode_text("fast")
                        return torch.autograd.grad(coop.encode_text("fast").float().pow(2).sum(), ctx)[0]

                    t0 = time.perf_counter()
                    step()  # compiles (and, for CUDA graphs, warms up) outside the timed calls
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    compile_s[provider] = time.perf_counter() - t0
                    timings[provider] = measure(step, device, plan.repeats, warmup=3)
                row = {"bench": "capture", "model": plan.model, "precision": precision, "classes": classes,
                       "n_ctx": 4 if plan.smoke else 16, "mode": mode, "timings": timings,
                       "first_call_s": compile_s, **env, **comparison_fields(timings, "eager")}
                if plan.smoke:
                    row["compile_backend"] = "aot_eager"
                rows.append(row)
                print(f"capture {plan.model} {precision} classes={classes:4d} {mode:7s} eager "
                      f"{timings['eager']['median_s'] * 1e3:.2f} ms  " + "  ".join(
                          f"{p} {r:.2f}x" for p, r in row["ratio_vs_baseline"].items() if p != "eager"), flush=True)
    torch._dynamo.reset()
    return rows


def _eval(method: str):
    def case(plan: Plan, peaks: dict) -> list:
        import bench_eval

        return [row for precision in plan.precisions for row in bench_eval.case(
            method=method, model=plan.model, device=plan.device, precision=precision, classes=plan.classes,
            batch=plan.eval_batch, depth=plan.depth, repeats=plan.repeats, peaks=peaks)]
    return case


def case_cocoop(plan: Plan, peaks: dict) -> list:
    import bench_cocoop

    return [row for precision in plan.precisions for row in bench_cocoop.case(
        model=plan.model, device=plan.device, precision=precision, classes=plan.classes, batch=plan.cocoop_batch,
        modes=["fwd", "fwd+bwd"], repeats=plan.repeats, peaks=peaks)]


def case_tpt(plan: Plan, peaks: dict) -> list:
    import bench_tpt

    # the official TPT runs fp32 weights under fp16 autocast ("amp"); bf16 weights as the second GPU setting
    precisions = ["amp", "bf16"] if plan.device == "cuda" else plan.precisions
    return [row for precision in precisions for row in bench_tpt.case(
        model=plan.model, device=plan.device, precision=precision, repeats=1 if plan.smoke else None, peaks=peaks,
        **plan.tpt)]


def case_zeroshot(plan: Plan, peaks: dict) -> list:
    """ZeroShot vs open_clip's builder through benchmarks/bench_zeroshot.py, which comes with
    ``promptcore.ZeroShot`` (from its own branch): a skipped row until both are in the tree."""
    import importlib.util

    from common import TINY_MODEL, comparison_fields, register_tiny_model

    import promptcore

    if not hasattr(promptcore, "ZeroShot") or importlib.util.find_spec("bench_zeroshot") is None:
        return [{"bench": "zeroshot", "skipped": "promptcore.ZeroShot or benchmarks/bench_zeroshot.py is not in "
                                                 "this tree"}]
    import bench_zeroshot

    model = register_tiny_model() if plan.model in ("tiny", TINY_MODEL) else plan.model
    options = dict(model=model, dataset="imagenet", templates="simple" if plan.smoke else "openai",
                   device=plan.device, classes=plan.classes, max_prompts=8192, builder_batch=10,
                   repeats=plan.repeats, warmup=1, threads=None, no_save=True)
    rows = []
    for precision in plan.precisions:
        if hasattr(bench_zeroshot, "case"):
            got = bench_zeroshot.case(**{**options, "precision": precision})
        else:  # the script as written on its branch: run(args) with the namespace its main builds
            got = bench_zeroshot.run(argparse.Namespace(**options, precision=precision))
        for row in got:
            row.update(comparison_fields({"open_clip": row["open_clip"], "promptcore": row["promptcore"]},
                                         "open_clip"))
        rows += got
    return rows


def case_export(plan: Plan, peaks: dict) -> list:
    import bench_export

    dtype = "fp16" if plan.device == "cuda" else "fp32"  # onnxruntime has no bf16 export path here
    options = dict(plan.export)
    return bench_export.case(model=plan.export_model, device=plan.device, dtype=dtype,
                             depth=plan.depth if plan.smoke else None, repeats=plan.repeats if plan.smoke else 10,
                             peaks=peaks, **options)


RUNNERS: Dict[str, Callable[[Plan, dict], list]] = {
    "kernels": case_kernels, "text_encoding": case_text_encoding, "coop_eval": _eval("coop"),
    "maple_eval": _eval("maple"), "cocoop": case_cocoop, "tpt": case_tpt, "zeroshot": case_zeroshot,
    "export": case_export,
}


# ----------------------------------------------------------------------------------------------
# results file: appended case by case, so a stopped run can resume


def _read_rows(path: Path) -> list:
    """Rows of a results file; a torn last line (a run killed mid-write) is dropped and reported."""
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"{path}: ignoring a truncated last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def _append(path: Path, rows: list) -> None:
    text = "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in rows)
    with path.open("a") as f:  # one write per case, flushed to disk before the next case starts
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, rows: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in rows))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# command line


def _describe(row: dict) -> str:
    return " ".join(str(row[k]) for k in ("bench", "kernel", "shape", "mode", "provider", "dtype") if k in row)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, not the usage block
        self.exit(2, f"run_all.py: error: {message}\n")


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="every case at tiny sizes (CPU: a few minutes at most)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<cuda|cpu|smoke>)")
    p.add_argument("--cases", nargs="+", default=list(CASES), metavar="CASE",
                   help=f"subset of: {', '.join(CASES)}")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile baselines and compiled FlexAttention (default on; off for --smoke)")
    p.add_argument("--resume", action="store_true", help="continue the results file in --out, skipping done cases")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 under --smoke). On a shared machine one thread "
                        "avoids OpenMP oversubscription, which slows many small ops far more than a few big ones")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cuda", "cpu"):
        p.error(f"unknown device {args.device!r}; choose cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this process")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    args.compile = (not args.smoke) if args.compile is None else args.compile
    if args.out is None:
        args.out = HERE / "results" / ("smoke" if args.smoke else args.device)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    results = args.out / "results.jsonl"
    if results.exists() and not args.resume:
        p.error(f"{results} already exists; pass --resume to continue that run or choose another --out")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import make_table
    from common import environment, measure_peaks

    plan = make_plan(args.device, args.smoke, args.compile)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: OpenMP workers only add noise on a shared CPU
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    previous = _read_rows(results) if results.exists() else []
    done = {row["case"] for row in previous if row.get("bench") == "case_done"}
    if previous:
        _rewrite(results, previous)  # drop a torn last line before appending
    t_start = time.time()
    peaks = measure_peaks(device, plan.smoke, plan.precisions if device.type == "cuda" else ["fp32"])
    run_row = {"bench": "peaks", "plan": plan.label, "compile": plan.compile, **environment(device), **peaks}
    _append(results, [run_row])
    print(f"{run_row.get('gpu') or run_row.get('cpu')}: copy {peaks['peak_gbps']:.1f} GB/s, matmul "
          + ", ".join(f"{k.removeprefix('peak_tflops_')} {v:.2f} TFLOP/s" for k, v in peaks.items()
                      if k.startswith("peak_tflops_")), flush=True)
    failed = []
    for name in args.cases:
        if name in done:
            print(f"== {name}: done in an earlier run, skipped (--resume)", flush=True)
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        try:
            rows = RUNNERS[name](plan, peaks)
        except Exception as exc:  # one failing case must not lose the others; named and reported at the end
            traceback.print_exc()
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            _append(results, [{"bench": "case_failed", "case": name, "error": f"{type(exc).__name__}: {exc}"}])
            continue
        for row in rows:
            row["run_case"] = name
            row["plan"] = plan.label
        _append(results, rows + [{"bench": "case_done", "case": name, "rows": len(rows),
                                  "seconds": time.time() - t0}])
        failed += [f"{name}: {_describe(row)}: {row['error']}" for row in rows if "error" in row]
        print(f"== {name}: {len(rows)} rows in {time.time() - t0:.1f} s", flush=True)
    all_rows = _read_rows(results)
    (args.out / "summary.md").write_text(make_table.summary_markdown(all_rows))
    plots = make_table.plot_all(all_rows, args.out)
    print(f"wrote {results}, {args.out / 'summary.md'}" + (f" and {len(plots)} plots" if plots else "")
          + f" in {time.time() - t_start:.0f} s", flush=True)
    if failed:
        print("failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
