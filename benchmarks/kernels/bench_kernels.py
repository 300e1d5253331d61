"""Microbenchmarks of the three fused ops against eager PyTorch and torch.compile.

Kernels: ``cosine`` (image (B, E) x classes (N, E)), ``grouped_cosine`` (the same op per group: TPT's
views of each image against its own tuned classes, with entropy/argmax; CoCoOp's one image per group
against its own classes), ``attention`` (prefix-shared attention), ``assembly`` (prompt assembly).

Providers, side by side in one run:
  triton   promptcore's fused Triton kernel (the public op with PROMPTCORE_BACKEND=triton)
  torch    the PyTorch reference ``*_ref`` in eager mode
  compile  ``torch.compile`` of the same reference
  sdpa     (attention only) ``F.scaled_dot_product_attention`` on materialised K/V: the prefix
           expanded over classes and concatenated before each class's suffix, causal mask built
           accordingly (the cost of not sharing the prefix)
  flex     (attention only) FlexAttention (``torch.nn.attention.flex_attention``, compiled unless
           ``--no-compile``) over keys [prefix ; all suffixes] with the block mask "key in the
           prefix, or same class and key position <= query position" (the prefix not expanded)

For each (kernel, shape, mode in fwd / bwd / fwd+bwd, provider): median, p20, p80 time (CUDA
events), GB/s and TFLOP/s from explicit byte / FLOP counts, their fraction of the peak measured
in the same run (a large device-to-device copy; a large fp16 matmul), and peak memory. Rows are
appended to benchmarks/results/kernels.jsonl (GPU name, torch/triton versions, git sha);
``--plot`` draws benchmarks/results/kernels_<kernel>.png when matplotlib is installed.

    python benchmarks/kernels/bench_kernels.py                    # GPU: all kernels, full shapes
    python benchmarks/kernels/bench_kernels.py --kernel attention --modes fwd --plot
    python benchmarks/kernels/bench_kernels.py --smoke            # CPU or GPU: tiny shapes, seconds

``case(...)`` runs the same from Python (benchmarks/run_all.py calls it).

Times on CPU mean nothing for the Triton kernels (they run in the interpreter): on CPU the script
refuses to run unless ``--smoke`` (tiny shapes, torch providers only, printed, not appended) or
``--allow-cpu`` (everything, rows marked ``interpreter``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, environment, measure, measure_peaks, peak_tflops_for  # noqa: E402

KERNELS = ("cosine", "grouped_cosine", "attention", "assembly")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# shapes


SIZES = ("smoke", "cpu", "gpu")  # tiny (seconds, any device); small enough for a CPU run; the real sizes


def cosine_shapes(size: str):
    if size == "smoke":
        return [dict(B=8, N=50, E=32)]
    if size == "cpu":
        return [dict(B=64, N=N, E=512) for N in (100, 1000)]
    return [dict(B=B, N=N, E=E) for E in (512, 768) for N in (1000, 21000) for B in (256, 1024, 4096)]


def grouped_cosine_shapes(size: str):
    """Per-group scoring: TPT (G images x V views against each image's own C classes, fp32 logits with the
    views' entropy and argmax, text gradient only) and CoCoOp (G images x 1 against their own C classes)."""
    def tpt(G, V, C, E):
        return dict(G=G, B=V, N=C, E=E, method="tpt")

    def cocoop(G, C, E):
        return dict(G=G, B=1, N=C, E=E, method="cocoop")

    if size == "smoke":
        return [tpt(2, 8, 50, 32), cocoop(4, 50, 32)]
    if size == "cpu":
        return [tpt(4, 64, 1000, 512), cocoop(32, 100, 512)]
    return [tpt(G, 64, 1000, E) for E in (512, 768) for G in (8, 64)] + [cocoop(G, 1000, 512) for G in (32, 256)]


def attention_shapes(size: str):
    if size == "smoke":
        return [dict(G=1, C=6, S=5, H=2, d=16, P=3), dict(G=2, C=3, S=5, H=2, d=16, P=3)]
    if size == "cpu":
        return [dict(G=1, C=C, S=8, H=8, d=64, P=17) for C in (10, 100)]
    return [dict(G=1, C=C, S=8, H=8, d=64, P=17) for C in (10, 100, 1000)] + [  # CoOp: one shared prefix
        dict(G=100, C=1000, S=8, H=8, d=64, P=17)]  # CoCoOp-like: a prefix per image


def assembly_shapes(size: str):
    if size == "smoke":
        return [dict(C=10, S=12, D=32, K=4, G=1), dict(C=10, S=12, D=32, K=4, G=3)]
    if size == "cpu":
        return [dict(C=C, S=20, D=512, K=16, G=1) for C in (100, 1000)]
    return [dict(C=C, S=S, D=512, K=16, G=G) for C, S, G in ((1000, 77, 1), (21000, 20, 1), (1000, 20, 32))]


# ----------------------------------------------------------------------------------------------
# problems: inputs, the op per provider, byte and FLOP counts


def _leaf(t, grad):
    return t.detach().requires_grad_(grad)


def cosine_problem(shape, dtype, device, grad):
    from promptcore.kernels import cosine_logits, cosine_logits_ref

    B, N, E = shape["B"], shape["N"], shape["E"]
    img = _leaf(torch.randn(B, E, device=device, dtype=dtype), grad)
    txt = _leaf(torch.randn(N, E, device=device, dtype=dtype), grad)
    scale = torch.tensor(math.log(100.0), device=device)
    elt = img.element_size()
    fwd_bytes = (B * E + N * E) * elt + B * N * elt
    fwd_flops = 2 * B * N * E
    # backward: two products with the (B, N) logit grad, read twice, plus features in and out
    bwd_bytes = 2 * B * N * elt + 2 * (B * E + N * E) * elt
    ops = {
        "triton": lambda: cosine_logits(img, txt, scale),
        "torch": lambda: cosine_logits_ref(img, txt, scale),
        "compile": ("compile", lambda a, b, s: cosine_logits_ref(a, b, s), (img, txt, scale)),
    }
    return ops, [img, txt], dict(fwd_bytes=fwd_bytes, fwd_flops=fwd_flops, bwd_bytes=bwd_bytes,
                                 bwd_flops=2 * fwd_flops)


def grouped_cosine_problem(shape, dtype, device, grad):
    from promptcore.kernels import cosine_logits, cosine_logits_ref

    G, B, N, E = shape["G"], shape["B"], shape["N"], shape["E"]
    tpt = shape["method"] == "tpt"  # TPT: frozen view features, fp32 logits with entropy/argmax (its first step)
    img = _leaf(torch.randn(G, B, E, device=device, dtype=dtype), grad and not tpt)
    txt = _leaf(torch.randn(G, N, E, device=device, dtype=dtype), grad)
    scale = torch.tensor(math.log(100.0), device=device)
    options = dict(with_entropy=True, out_dtype=torch.float32) if tpt else {}
    elt = img.element_size()
    out_elt = 4 if tpt else elt
    fwd_bytes = G * (B * E + N * E) * elt + G * B * N * out_elt + (G * B * 12 if tpt else 0)
    fwd_flops = 2 * G * B * N * E
    # backward: the (G, B, N) logit grad read once per gradient, features read and written
    n_grads = 1 if tpt else 2
    bwd_bytes = n_grads * G * B * N * out_elt + (n_grads + 1) * G * (B * E + N * E) * elt
    ops = {
        "triton": lambda: cosine_logits(img, txt, scale, **options),
        "torch": lambda: cosine_logits_ref(img, txt, scale, **options),
        "compile": ("compile", lambda a, b, s: cosine_logits_ref(a, b, s, **options), (img, txt, scale)),
    }
    leaves = [txt] if tpt else [img, txt]
    return ops, leaves, dict(fwd_bytes=fwd_bytes, fwd_flops=fwd_flops, bwd_bytes=bwd_bytes,
                             bwd_flops=n_grads * fwd_flops)


def _materialised_sdpa(q, k, v, k_prefix, v_prefix, lens):
    """Prefix expanded over classes and concatenated before each suffix; causal mask over the suffix."""
    G, C, S, H, d = q.shape
    P = k_prefix.shape[1]

    def full(prefix, suffix):
        return torch.cat([prefix[:, None].expand(G, C, P, H, d), suffix], dim=2).reshape(G * C, P + S, H, d)

    kf = full(k_prefix, k).transpose(1, 2)
    vf = full(v_prefix, v).transpose(1, 2)
    qf = q.reshape(G * C, S, H, d).transpose(1, 2)
    allowed = torch.ones(S, P + S, dtype=torch.bool, device=q.device)
    allowed[:, P:] = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=allowed).transpose(1, 2).reshape(G, C, S, H, d)
    live = torch.arange(S, device=q.device)[None, :] < lens[:, None]
    return out * live[None, :, :, None, None]


@functools.lru_cache(maxsize=None)
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def prefix_block_mask(C: int, S: int, P: int, device):
    """FlexAttention block mask over queries = every class's S suffix rows (flattened c * S + i) and
    keys = [P prefix keys ; every class's S suffix keys]: a query sees the whole prefix and, in its own
    class, the suffix keys at or before its own position."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        s = kv_idx - P
        return (kv_idx < P) | ((s >= 0) & (s // S == q_idx // S) & (s % S <= q_idx % S))

    return create_block_mask(mask_mod, None, None, C * S, P + C * S, device=device)


def flex_prefix_attention(q, k, v, k_prefix, v_prefix, suffix_lens=None, scale=None, block_mask=None,
                          compiled: bool = False):
    """:func:`promptcore.kernels.prefix_attention` computed by FlexAttention with the equivalent block mask.

    The groups become FlexAttention's batch; the prefix K/V are concatenated once per group before the
    flattened suffix K/V (never expanded over classes); rows past ``suffix_lens`` are zeroed as in the op.
    """
    G, C, S, H, d = q.shape
    P = k_prefix.shape[1]
    if block_mask is None:
        block_mask = prefix_block_mask(C, S, P, q.device)

    def keys(prefix, suffix):
        return torch.cat([prefix.expand(G, P, H, d), suffix.reshape(G, C * S, H, d)], dim=1).transpose(1, 2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns on every call that it is not compiled
        out = _flex_attention(compiled)(q.reshape(G, C * S, H, d).transpose(1, 2), keys(k_prefix, k),
                                        keys(v_prefix, v), block_mask=block_mask, scale=scale)
    out = out.transpose(1, 2).reshape(G, C, S, H, d)
    if suffix_lens is not None:
        live = torch.arange(S, device=q.device)[None, :] < suffix_lens.to(q.device)[:, None]
        out = out * live[None, :, :, None, None]
    return out


def attention_problem(shape, dtype, device, grad, compiled_flex=True):
    from promptcore.kernels import prefix_attention, prefix_attention_ref

    G, C, S, H, d, P = (shape[k] for k in ("G", "C", "S", "H", "d", "P"))
    qkv = torch.randn(G, C, S, 3, H, d, device=device, dtype=dtype)
    q, k, v = (_leaf(t, grad) for t in qkv.unbind(3))  # strided views, as a fused projection makes them
    kp = _leaf(torch.randn(G, P, H, d, device=device, dtype=dtype), grad)
    vp = _leaf(torch.randn(G, P, H, d, device=device, dtype=dtype), grad)
    lens = torch.randint(max(1, S - 3), S + 1, (C,), device=device)
    elt = q.element_size()
    suffix = G * C * S * H * d * elt
    prefix = G * P * H * d * elt
    keys_per_row = P + (S + 1) / 2  # causal: the useful scores only
    fwd_flops = 4 * G * C * S * H * d * keys_per_row
    args = (q, k, v, kp, vp, lens)
    ops = {
        "triton": lambda: prefix_attention(*args),
        "torch": lambda: prefix_attention_ref(*args),
        "compile": ("compile", lambda *a: prefix_attention_ref(*a), args),
        "sdpa": lambda: _materialised_sdpa(*args),
    }
    if _has_flex() and (not grad or torch.device(device).type == "cuda"):  # no FlexAttention backward on CPU
        mask = prefix_block_mask(C, S, P, device)
        ops["flex"] = lambda: flex_prefix_attention(*args, block_mask=mask, compiled=compiled_flex)
    return ops, [q, k, v, kp, vp], dict(fwd_bytes=4 * suffix + 2 * prefix, fwd_flops=fwd_flops,
                                        bwd_bytes=8 * suffix + 4 * prefix, bwd_flops=2.5 * fwd_flops)


def assembly_problem(shape, dtype, device, grad):
    from promptcore.kernels import assemble_prompts, assemble_prompts_ref

    C, S, D, K, G = (shape[k] for k in ("C", "S", "D", "K", "G"))
    tok = torch.randn(C, S, D, device=device, dtype=dtype)
    pos = torch.randn(S, D, device=device, dtype=dtype)
    ctx = _leaf(torch.randn(K, D, device=device), grad)  # fp32 learned context, shared (CoOp)
    bias = _leaf(torch.randn(G, D, device=device), grad) if G > 1 else None  # CoCoOp's meta-net bias
    slots = torch.full((C, S), -1, dtype=torch.long, device=device)
    slots[:, 1:1 + K] = torch.arange(K, device=device)
    elt = tok.element_size()
    ctx_rows = C * K
    fwd_bytes = (C * S - ctx_rows) * D * elt + S * D * elt + ctx_rows * D * 4 + G * C * S * D * elt
    args = (tok, slots, pos, ctx, bias, "shared")
    ops = {
        "triton": lambda: assemble_prompts(*args),
        "torch": lambda: assemble_prompts_ref(*args),
        "compile": ("compile", lambda *a: assemble_prompts_ref(*a), args),
    }
    bwd_bytes = G * ctx_rows * D * elt + ctx_rows * D * 4  # reads the grad of context rows only
    return ops, [ctx] + ([bias] if bias is not None else []), dict(fwd_bytes=fwd_bytes, fwd_flops=G * C * S * D,
                                                                   bwd_bytes=bwd_bytes, bwd_flops=G * ctx_rows * D)


def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


PROBLEMS = {"cosine": (cosine_problem, cosine_shapes),
            "grouped_cosine": (grouped_cosine_problem, grouped_cosine_shapes),
            "attention": (attention_problem, attention_shapes),
            "assembly": (assembly_problem, assembly_shapes)}


# ----------------------------------------------------------------------------------------------
# peaks measured in this run


# ----------------------------------------------------------------------------------------------
# running


def _call(op, compiled_cache, key):
    if isinstance(op, tuple):  # ("compile", fn, args): compile once per problem
        _, fn, args = op
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(fn)
        return compiled_cache[key](*args)
    return op()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def bench_one(kernel, shape, dtype, mode, provider, device, repeats, peaks, compiled_flex=True):
    """One (kernel, shape, dtype, mode, provider) measurement as a row; None if the provider does not apply."""
    make, _ = PROBLEMS[kernel]
    grad = mode != "fwd"
    options = {"compiled_flex": compiled_flex} if kernel == "attention" else {}
    ops, leaves, counts = make(shape, dtype, device, grad, **options)
    if provider not in ops:
        return None
    op = ops[provider]
    previous = os.environ.get("PROMPTCORE_BACKEND")
    os.environ["PROMPTCORE_BACKEND"] = "triton" if provider == "triton" else "torch"
    try:
        # "bwd" replays one graph (retain_graph=True), which compiled backwards with donated buffers refuse
        import torch._functorch.config as functorch_config

        with functorch_config.patch(donated_buffer=False):
            stats, n_bytes, n_flops = _time_op(op, provider, mode, leaves, counts, device, repeats)
    finally:
        if previous is None:
            os.environ.pop("PROMPTCORE_BACKEND", None)
        else:
            os.environ["PROMPTCORE_BACKEND"] = previous
    gbps = n_bytes / stats["median_s"] / 1e9
    tflops = n_flops / stats["median_s"] / 1e12
    dtype_name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return {
        "bench": "kernels", "kernel": kernel, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "mode": mode, "provider": provider, "median_ms": stats["median_s"] * 1e3, "p20_ms": stats["p20_s"] * 1e3,
        "p80_ms": stats["p80_s"] * 1e3, "bytes": n_bytes, "flops": n_flops, "gbps": gbps, "tflops": tflops,
        "frac_peak_bw": gbps / peaks["peak_gbps"], "frac_peak_flops": tflops / peak_tflops_for(peaks, dtype_name),
        "peak_mem_bytes": stats.get("peak_mem_bytes"),
        "flex_compiled": compiled_flex if provider == "flex" else None,
    }


def _time_op(op, provider, mode, leaves, counts, device, repeats):
    cache = {}
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return _call(op, cache, provider)
        n_bytes, n_flops = counts["fwd_bytes"], counts["fwd_flops"]
    else:
        out = _first(_call(op, cache, provider))
        dout = torch.randn_like(out)
        if mode == "bwd":
            def fn():
                for t in leaves:
                    t.grad = None
                out.backward(dout, retain_graph=True)
            n_bytes, n_flops = counts["bwd_bytes"], counts["bwd_flops"]
        else:
            def fn():
                for t in leaves:
                    t.grad = None
                _first(_call(op, cache, provider)).backward(dout)
            n_bytes = counts["fwd_bytes"] + counts["bwd_bytes"]
            n_flops = counts["fwd_flops"] + counts["bwd_flops"]
    stats = measure(fn, device, repeats=repeats, warmup=3 if device.type == "cuda" else 1)
    return stats, n_bytes, n_flops


def case(kernels=KERNELS, modes=MODES, providers=None, dtype="fp16", size=None, device=None, repeats=None,
         peaks=None, compile=True, log=print) -> list:
    """Benchmark ``kernels`` x their shapes (``size``: smoke, cpu or gpu; default by device) x ``modes`` x
    ``providers`` (default: all that apply; triton only on CUDA or under the Triton interpreter, compile
    and a compiled FlexAttention only with ``compile``). Returns the rows (peaks and environment added)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = size or ("gpu" if device.type == "cuda" else "cpu")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if providers is None:
        providers = ["triton", "torch", "compile", "sdpa", "flex"]
        if device.type == "cpu" and not interpreted:
            providers.remove("triton")  # no kernel to run: the op would be the reference again
        if not compile:
            providers.remove("compile")
    dtype_t = DTYPES[dtype] if isinstance(dtype, str) else dtype
    repeats = max(5, repeats or (50 if device.type == "cuda" else 5))  # p20/p80 need a few samples
    env = environment(device)
    peaks = peaks or measure_peaks(device, size == "smoke")
    rows = []
    for kernel in kernels:
        _, shapes = PROBLEMS[kernel]
        for shape in shapes(size):
            for mode in modes:
                for provider in providers:
                    try:
                        row = bench_one(kernel, shape, dtype_t, mode, provider, device, repeats, peaks,
                                        compiled_flex=compile)
                    except Exception as exc:  # one failing provider is reported in its row; the rest still run
                        if isinstance(exc, torch.cuda.OutOfMemoryError):
                            torch.cuda.empty_cache()
                        error = "OOM" if isinstance(exc, torch.cuda.OutOfMemoryError) else \
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        row = {"bench": "kernels", "kernel": kernel, "shape": shape, "mode": mode,
                               "provider": provider, "dtype": str(dtype_t).replace("torch.", ""), "error": error}
                        log(f"{kernel:9s} {mode:7s} {provider:8s} {shape}: {error}")
                    if row is None:
                        continue
                    row.update(env, **peaks, smoke=size == "smoke",
                               interpreter=interpreted and provider == "triton")
                    rows.append(row)
                    if "error" not in row:
                        log(f"{kernel:9s} {row['dtype']:8s} {mode:7s} {provider:8s} {row['median_ms']:9.3f} ms "
                            f"[{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]  {row['gbps']:8.1f} GB/s "
                            f"({100 * row['frac_peak_bw']:5.1f}%)  {row['tflops']:7.2f} TFLOP/s "
                            f"({100 * row['frac_peak_flops']:5.1f}%)  {shape}")
    return rows


def plot(rows, out_dir: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed, skipping the plots")
        return
    for kernel in sorted({r["kernel"] for r in rows}):
        sel = [r for r in rows if r["kernel"] == kernel]
        modes = sorted({r["mode"] for r in sel}, key=MODES.index)
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            shapes = [s for s in dict.fromkeys(str(r["shape"]) for r in sel if r["mode"] == mode)]
            for provider in dict.fromkeys(r["provider"] for r in sel):
                pts = {str(r["shape"]): r for r in sel if r["mode"] == mode and r["provider"] == provider}
                xs = [i for i, s in enumerate(shapes) if s in pts]
                ax.errorbar(xs, [pts[shapes[i]]["median_ms"] for i in xs],
                            yerr=[[pts[shapes[i]]["median_ms"] - pts[shapes[i]]["p20_ms"] for i in xs],
                                  [pts[shapes[i]]["p80_ms"] - pts[shapes[i]]["median_ms"] for i in xs]],
                            marker="o", capsize=3, label=provider)
            ax.set_xticks(range(len(shapes)), [s.replace("'", "") for s in shapes], rotation=30, ha="right",
                          fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel("ms (median, p20-p80)")
            ax.set_title(f"{kernel} {mode}")
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"kernels_{kernel}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print("wrote", path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset of triton, torch, compile, sdpa, flex (default: all that apply)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, torch providers on CPU, rows printed only")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU anyway (Triton in the interpreter)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile provider and compiled FlexAttention (default: on, off for --smoke on CPU)")
    p.add_argument("--out", type=Path, default=None, help="JSON lines file (default results/kernels.jsonl)")
    p.add_argument("--plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    providers = args.providers
    compile_ = True if args.compile is None else args.compile
    size = "smoke" if args.smoke else "gpu" if device.type == "cuda" else "cpu"
    if device.type == "cpu":
        if args.allow_cpu:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before promptcore.kernels is imported
            print("warning: CPU run; Triton kernels run in the interpreter, their times mean nothing")
        elif args.smoke:
            torch.set_num_threads(1)  # tiny ops: spinning OpenMP workers only add noise on a busy CPU
            compile_ = False if args.compile is None else compile_  # compiling takes far longer than the smoke
            if providers is None:
                providers = ["torch", "sdpa", "flex"] + (["compile"] if compile_ else [])
            providers = [p for p in providers if p != "triton"]
        else:
            print("no CUDA device: kernel timings need a GPU. Use --smoke for a quick CPU check of the "
                  "torch providers, or --allow-cpu to run everything (Triton interpreted, times meaningless).",
                  file=sys.stderr)
            return 2
    out_path = args.out if args.out is not None else (None if args.smoke else RESULTS / "kernels.jsonl")
    peaks = measure_peaks(device, args.smoke, [args.dtype])
    print(f"peaks measured in this run: {peaks['peak_gbps']:.1f} GB/s (copy), "
          f"{peaks['peak_tflops']:.2f} TFLOP/s ({peaks['peak_matmul_dtype']} matmul)")
    t0 = time.time()
    rows = case(args.kernel, args.modes, providers, args.dtype, size, device, args.repeats
                or (5 if args.smoke else None), peaks, compile_)
    print(f"{len(rows)} rows in {time.time() - t0:.1f} s")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        print("appended", len(rows), "rows to", out_path)
    if args.plot:
        plot([r for r in rows if "error" not in r], RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
