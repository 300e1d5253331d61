"""Static resource gate: compile every kernel variant for real GPU targets and read the cubins.

    python -m promptcore.kernels.resources [--arch sm_90 sm_80] [--kernel NAME ...] [--json | --markdown] [--jobs N]

No GPU is needed. The host launchers of the three ops are run on small CPU tensors (one case per
dtype and per flag combination they can take) with ``JITFunction.run`` replaced by a recorder, so
the captured launches carry exactly the block sizes, warps, stages and constexprs the launchers
pick (launches through ``triton.autotune`` are recorded once per config the tuner may pick, after its
``early_config_prune``; the ``config`` key of a row says "autotune i/n", or "fixed" for a plain launch),
and the JIT's own binder gives the signature and the ``tt.divisibility`` specialisations it
applies to 16-byte-aligned pointers and integers divisible by 16. Each captured variant is compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` twice per arch: with those
specialisations ("aligned") and with none ("unaligned": a view at an odd offset, odd strides).
``cuobjdump --dump-resource-usage`` (shipped with Triton) on each cubin gives registers per thread
and stack (spilled) bytes; shared memory is the larger of the cubin's static and Triton's dynamic
allocation. Occupancy is computed from the arch's register file, shared memory and CTA limits.

The exit status is 1 on a compile error, any spill, shared memory over the arch's per-block limit,
or fewer than one CTA per SM; 2 on an unknown arch or kernel name. Each run compiles into a fresh
temporary cache, so nothing cached can hide a change. Kernels are compiled for real targets even
when ``TRITON_INTERPRET=1`` is set: the command then re-runs itself in a subprocess without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Callable, Optional

import torch

KERNEL_MODULES = ("prompt_assembly", "prefix_attention", "cosine_logits")


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of a CUDA architecture (CUDA programming guide, compute capability tables)."""

    capability: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 0  # bytes usable by CTAs
    smem_per_block: int = 0  # opt-in maximum per CTA
    smem_reserved_per_block: int = 1024  # taken by the system per resident CTA


ARCHS = {
    "sm_80": ArchLimits(80, smem_per_sm=167936, smem_per_block=166912),
    "sm_90": ArchLimits(90, smem_per_sm=233472, smem_per_block=232448),
}


def ctas_per_sm(arch: str, regs: int, num_warps: int, smem_bytes: int) -> int:
    """Resident CTAs per SM allowed by registers (256-register warp granules), warps and shared memory."""
    lim = ARCHS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    warps_by_regs = (lim.regs_per_sm // regs_per_warp) // 4 * 4  # warps are allocated 4 at a time
    by_regs = warps_by_regs // num_warps
    by_warps = lim.max_warps_per_sm // num_warps
    by_smem = lim.smem_per_sm // (smem_bytes + lim.smem_reserved_per_block)
    return max(0, min(by_regs, by_warps, by_smem, lim.max_ctas_per_sm))


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher issued it (captured, not run)."""

    kernel: object  # JITFunction
    args: tuple
    kwargs: dict
    dtype: str
    case: str
    aligned: bool
    config: str = ""  # "i/n": the autotune config it is, of the n its tuner may pick for this launch


_LAUNCHES: list[Launch] = []
_CASE = {"dtype": "?", "case": "", "aligned": True}
_CONFIG = [""]


@contextlib.contextmanager
def _recording():
    """Replace ``JITFunction.run`` (and autotuners') by a recorder for the duration."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup, **kwargs):
        _LAUNCHES.append(Launch(self, args, kwargs, _CASE["dtype"], _CASE["case"], _CASE["aligned"], _CONFIG[0]))

    def record_tuned(self, *args, **kwargs):  # every config the tuner may pick (after its pruning) is a variant
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        self.nargs = None
        try:
            for i, config in enumerate(configs):
                _CONFIG[0] = f"{i + 1}/{len(configs)}"
                self.fn.run(*args, grid=None, warmup=False, **{**kwargs, **config.all_kwargs()})
        finally:
            _CONFIG[0] = ""

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = record, record_tuned
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


@contextlib.contextmanager
def _case(dtype: torch.dtype, case: str, aligned: bool = True):
    _CASE.update(dtype=_DTYPE_NAMES[dtype], case=case, aligned=aligned)
    yield


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _module(name):
    return importlib.import_module(f"promptcore.kernels.{name}")


def _unaligned(*shape, dtype):
    """A tensor viewed one element past a fresh allocation: the JIT gives its pointer no divisibility."""
    n = math.prod(shape)
    return torch.randn(n + 1).to(dtype)[1:].view(shape)


def _assembly_cases():
    asm = _module("prompt_assembly")
    C, S, K, G = 10, 7, 4, 3
    slots = torch.full((C, S), -1, dtype=torch.long)
    slots[:, 1:1 + K] = torch.arange(K)
    for dtype in DTYPES:
        for aligned, D in ((True, 512), (False, 509)):
            make = (lambda *s, dt=dtype: torch.randn(*s, dtype=dt)) if aligned else partial(_unaligned, dtype=dtype)
            for ctx_dtype in sorted({dtype, torch.float32}, key=str):  # low-precision CLIP, fp32 learned ctx
                tok, pos = make(C, S, D), make(S, D)
                ctx = torch.randn(G, K, D, dtype=ctx_dtype)
                bias = torch.randn(G, D, dtype=ctx_dtype)
                with _case(dtype, f"D={D} ctx {_DTYPE_NAMES[ctx_dtype]}", aligned):
                    asm._assemble_prompts_fwd(tok, slots, pos, ctx, bias, "group")
                    asm._assemble_prompts_fwd(tok, slots, pos, ctx[0], None, "shared")
                    asm._assemble_prompts_fwd(tok, slots, pos, None, None, "shared")
            with _case(dtype, f"D={D} bwd", aligned):
                dout = make(G, C, S, D)
                for layout, ctx in (("shared", torch.randn(K, D)), ("group", torch.randn(G, K, D))):
                    asm._assemble_prompts_bwd(dout, slots, ctx, torch.randn(G, D), layout)
                    asm._assemble_prompts_bwd(dout, slots, ctx, None, layout)


def _attention_cases():
    pa = _module("prefix_attention")
    G, C, S, H, P = 1, 41, 7, 8, 17  # sizes not divisible by 16: only pointers and strides are specialised
    for dtype in DTYPES:
        for d in pa.SUPPORTED_HEAD_DIMS:
            for aligned in (True, False):
                make = (lambda *s: torch.randn(*s, dtype=dtype)) if aligned else partial(_unaligned, dtype=dtype)
                q, k, v = make(G, C, S, 3, H, d).unbind(3)
                kp, vp = make(1, P, H, d), make(1, P, H, d)
                lens = torch.full((C,), S, dtype=torch.int32)
                with _case(dtype, f"d={d}", aligned):
                    out, lse = pa._prefix_attention_fwd(q, k, v, kp, vp, lens, d ** -0.5)
                    dout = make(*out.shape)
                    pa._prefix_attention_bwd(dout, q, k, v, kp, vp, out, lse, lens, d ** -0.5)


def _cosine_cases():
    cl = _module("cosine_logits")
    B, N = 64, 1008  # N divisible by 16: aligned (B, N) dlogits, so the aligned backward classes are compiled too
    for dtype in DTYPES:
        for aligned, E in ((True, 512), (False, 509)):
            make = (lambda *s: torch.randn(*s, dtype=dtype)) if aligned else partial(_unaligned, dtype=dtype)
            img, txt = make(B, E), make(N, E)
            scale = torch.tensor(4.6)
            with _case(dtype, f"E={E}", aligned):
                for stats in (False, True):
                    cl._cosine_logits_fwd(img, txt, scale, stats)
                dlogits = make(B, N)
                cl._normalised_grad(dlogits, img, txt, torch.ones(N), scale, dlogits.stride(0), dlogits.stride(1))
                cl._normalised_grad(dlogits, txt, img, torch.ones(B), scale, dlogits.stride(1), dlogits.stride(0))
                cl._l2_normalize_bwd(torch.randn(B, E), img, torch.ones(B))


CASES: dict[str, Callable[[], None]] = {
    "prompt_assembly": _assembly_cases,
    "prefix_attention": _attention_cases,
    "cosine_logits": _cosine_cases,
}


def kernel_names() -> list[str]:
    """Names of every ``@triton.jit`` kernel of the three ops (``_*_kernel``), compiled or interpreted."""
    from triton.runtime.jit import KernelInterface

    names = []
    for mod in KERNEL_MODULES:
        for name, obj in vars(_module(mod)).items():
            if name.startswith("_") and name.endswith("_kernel") and isinstance(obj, KernelInterface):
                names.append(name)
    return names


@dataclasses.dataclass
class Variant:
    """A compile job: one specialisation of one kernel, for one arch, aligned or not."""

    kernel: object
    dtype: str
    case: str
    arch: str
    aligned: bool
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str = ""

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def describe(self) -> str:
        names = self.kernel.arg_names
        flags = " ".join(f"{names[k[0]]}={int(v) if isinstance(v, bool) else v}"
                         for k, v in sorted(self.constexprs.items()) if names[k[0]].isupper())
        parts = [self.case, flags, f"w{self.options['num_warps']} s{self.options['num_stages']}",
                 "aligned" if self.aligned else "unaligned"]
        return " ".join(p for p in parts if p)


def _variants(launches: list[Launch], archs: list[str]) -> list[Variant]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    seen, out = set(), []
    for arch in archs:
        target = GPUTarget("cuda", ARCHS[arch].capability, 32)
        backend = make_backend(target)
        for launch in launches:
            fn = launch.kernel
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, options = binder(*launch.args, **launch.kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, options)
            opts = {"num_warps": options.num_warps, "num_stages": options.num_stages}
            # an unaligned launch is compiled with no divisibility at all, its worst case
            aligned = launch.aligned
            key = (arch, fn.__name__, aligned, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(opts.items())))
            if key in seen:
                continue
            seen.add(key)
            out.append(Variant(fn, launch.dtype, launch.case, arch, aligned, signature, constexprs,
                               attrs if aligned else {}, opts, launch.config))
    return out


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict:
    """Registers, stack, static shared and local bytes from ``cuobjdump --dump-resource-usage`` output."""
    match = _USAGE.search(text)
    if match is None:
        raise ValueError(f"no resource usage line in cuobjdump output: {text.strip()[:200]!r}")
    regs, stack, shared, local = map(int, match.groups())
    return {"regs": regs, "stack": stack, "shared": shared, "local": local}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile_one(variant: Variant) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": variant.name, "arch": variant.arch, "dtype": variant.dtype, "variant": variant.describe(),
           "num_warps": variant.options["num_warps"], "aligned": variant.aligned,
           "config": f"autotune {variant.config}" if variant.config else "fixed"}
    try:
        target = GPUTarget("cuda", ARCHS[variant.arch].capability, 32)
        src = ASTSource(variant.kernel, variant.signature, variant.constexprs, variant.attrs)
        compiled = triton.compile(src, target=target, options=dict(variant.options))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            proc = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                  check=True)
        usage = parse_resource_usage(proc.stdout)
    except Exception as exc:  # reported as a failing row, never silently dropped
        row.update(regs=None, spill_bytes=None, smem_bytes=None, ctas_per_sm=0,
                   error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
        return row
    smem = max(usage["shared"], int(compiled.metadata.shared))
    row.update(regs=usage["regs"], spill_bytes=usage["stack"] + usage["local"], smem_bytes=smem,
               ctas_per_sm=ctas_per_sm(variant.arch, usage["regs"], variant.options["num_warps"], smem))
    return row


def failures(rows: list[dict]) -> list[str]:
    """Why each failing row fails: compile error, spill, shared memory over the limit, no CTA fits."""
    out = []
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} [{r['variant']}]"
        if r.get("error"):
            out.append(f"{where}: compile error: {r['error']}")
            continue
        if r["spill_bytes"]:
            out.append(f"{where}: spills {r['spill_bytes']} bytes per thread ({r['regs']} registers)")
        if r["smem_bytes"] > ARCHS[r["arch"]].smem_per_block:
            out.append(f"{where}: {r['smem_bytes']} bytes of shared memory > {ARCHS[r['arch']].smem_per_block}")
        if r["ctas_per_sm"] < 1:
            out.append(f"{where}: no CTA fits on an SM")
    return out


def collect(archs: Optional[list[str]] = None, kernels: Optional[list[str]] = None, jobs: int = 1,
            dtypes: Optional[list[str]] = None) -> list[dict]:
    """Compile every captured variant of the selected kernels (and dtypes) for ``archs``; one row per compile."""
    archs = archs or list(ARCHS)
    _LAUNCHES.clear()
    with _recording():
        for mod in KERNEL_MODULES:
            CASES[mod]()
    launches = [x for x in _LAUNCHES if (kernels is None or x.kernel.__name__ in kernels)
                and (dtypes is None or x.dtype in dtypes)]
    variants = _variants(launches, archs)
    if jobs > 1:
        import multiprocessing

        _PENDING[:] = variants  # forked workers inherit the jit functions; only indices cross the pipe
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_pending, range(len(variants))))
    return [_compile_one(v) for v in variants]


_PENDING: list[Variant] = []


def _compile_pending(index: int) -> dict:
    return _compile_one(_PENDING[index])


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "arch", "dtype", "regs", "spill", "smem", "ctas/SM", "config", "variant")
    body = [(r["kernel"], r["arch"], r["dtype"], str(r["regs"]), str(r["spill_bytes"]), str(r["smem_bytes"]),
             str(r["ctas_per_sm"]), r["config"], r["variant"] + (f"  ERROR {r['error']}" if r.get("error") else ""))
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def _worst(rows: list[dict]) -> str:
    """max registers / max spilled bytes / min CTAs per SM over ``rows`` ("-" if none)."""
    if not rows:
        return "-"
    return (f"{max(r['regs'] or 0 for r in rows)} / {max(r['spill_bytes'] or 0 for r in rows)} / "
            f"{min(r['ctas_per_sm'] for r in rows)}")


def _tiles(variant: str) -> str:
    """The tile part of a variant description: head dim case, key kind, BLOCK_* sizes, warps and stages."""
    keep = ("d=", "PREFIX_KEYS=", "BLOCK_")
    return " ".join(t for t in variant.split() if t.startswith(keep) or re.fullmatch(r"[ws]\d+", t))


def format_markdown(rows: list[dict]) -> str:
    """The README's two tables: worst case per kernel, dtype, arch and alignment; then each config of the
    classes that autotune between several (worst over fp16/bf16 and flags): regs / spilled bytes / CTAs per SM."""
    archs = sorted({r["arch"] for r in rows}, reverse=True)
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    cols = [(a, al) for al in (True, False) for a in archs]
    out = ["| kernel | dtype | " + " | ".join(f"{a} {'aligned' if al else 'unaligned'}" for a, al in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for k in kernels:
        for dt in ("fp16", "bf16", "fp32"):
            sel = [r for r in rows if r["kernel"] == k and r["dtype"] == dt]
            if sel:
                out.append(f"| `{k}` | {dt} | " + " | ".join(
                    _worst([r for r in sel if r["arch"] == a and r["aligned"] == al]) for a, al in cols) + " |")
    tuned = [r for r in rows if re.fullmatch(r"autotune \d+/([2-9]|\d\d+)", r.get("config", ""))]
    out += ["", "| kernel | config | " + " | ".join(archs) + " |", "|---|---|" + "---|" * len(archs)]
    for k in kernels:
        for tiles in dict.fromkeys(_tiles(r["variant"]) for r in tuned if r["kernel"] == k):
            sel = [r for r in tuned if r["kernel"] == k and _tiles(r["variant"]) == tiles]
            out.append(f"| `{k}` | {tiles} | " + " | ".join(_worst([r for r in sel if r["arch"] == a])
                                                            for a in archs) + " |")
    return "\n".join(out)


def _compiled_kernels_loaded() -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(_module("prefix_attention")._prefix_attention_fwd_kernel, JITFunction)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m promptcore.kernels.resources", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), metavar="ARCH", help="sm_90 and/or sm_80")
    parser.add_argument("--kernel", nargs="+", default=None, metavar="NAME", help="only these jit kernels")
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(_DTYPE_NAMES.values()),
                        help="only these dtypes")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README's worst-case and autotune-config tables instead of every row")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    bad = [a for a in args.arch if a not in ARCHS]
    if bad:
        print(f"error: unknown arch {bad[0]!r} (known: {', '.join(ARCHS)})", file=sys.stderr)
        return 2
    from ._utils import HAS_TRITON

    if not HAS_TRITON:
        print("error: triton is not installed", file=sys.stderr)
        return 2
    if not _compiled_kernels_loaded():  # imported under TRITON_INTERPRET=1: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "promptcore.kernels.resources", *argv], env=env).returncode
    known = kernel_names()
    unknown = [k for k in (args.kernel or []) if k not in known]
    if unknown:
        print(f"error: unknown kernel {unknown[0]!r} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="promptcore-resources-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh every run: nothing cached can hide a change
        rows = collect(args.arch, args.kernel, max(1, args.jobs), args.dtype)
    print(json.dumps(rows, indent=1) if args.json else format_markdown(rows) if args.markdown else format_table(rows))
    problems = failures(rows)
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
