"""The static resource gate (promptcore.kernels.resources): real sm_80/sm_90 compiles, no GPU needed.

The full gate compiles every variant the launchers produce for both archs, every autotune config of
each, aligned and unaligned; it runs here once, in a subprocess (TRITON_INTERPRET is set for the test
session and the command must cope with that). Any spill, compile error or CTA that does not fit fails.
"""

import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import defaultdict

import pytest

from promptcore.kernels import triton_available

res = importlib.import_module("promptcore.kernels.resources")
pa = importlib.import_module("promptcore.kernels.prefix_attention")

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")


def _run(*args, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="1")  # as under the test session: the command must re-exec itself
    return subprocess.run([sys.executable, "-m", "promptcore.kernels.resources", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@needs_triton
def test_gate_both_archs_all_variants():
    proc = _run("--json", "--arch", "sm_90", "sm_80")
    rows = json.loads(proc.stdout)
    keys = {"kernel", "arch", "dtype", "variant", "regs", "spill_bytes", "smem_bytes", "ctas_per_sm"}
    assert rows and all(keys <= set(r) for r in rows)
    assert {r["kernel"] for r in rows} == set(res.kernel_names()), "every jit kernel is compiled"
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert {r["aligned"] for r in rows if r["kernel"].startswith("_prefix")} == {True, False}
    problems = [f"{r['kernel']} {r['arch']} {r['dtype']} [{r['variant']}]: {r.get('error') or ''} "
                f"{r['spill_bytes']} B spilled, {r['ctas_per_sm']} CTAs/SM"
                for r in rows if r.get("error") or r["spill_bytes"] or r["ctas_per_sm"] < 1
                or r["smem_bytes"] > res.ARCHS[r["arch"]].smem_per_block]
    assert not problems, "\n".join(problems)
    # memory-bound assembly kernels keep >= 2 CTAs per SM with every config
    assert all(r["ctas_per_sm"] >= 2 for r in rows if r["kernel"].startswith("_assemble"))
    # every config of every tuner is compiled: "autotune i/n" rows for each i, per kernel, arch, dtype, alignment
    configs = defaultdict(set)
    for r in rows:
        match = re.fullmatch(r"autotune (\d+)/(\d+)", r["config"])
        if match:
            configs[(r["kernel"], r["arch"], r["dtype"], r["aligned"], int(match[2]))].add(int(match[1]))
    tuned = {k[0] for k in configs}
    assert {"_prefix_attention_fwd_kernel", "_prefix_attention_bwd_dq_kernel", "_prefix_attention_bwd_dkdv_kernel",
            "_assemble_prompts_fwd_kernel", "_assemble_prompts_bwd_kernel"} <= tuned
    for (kernel, arch, dtype, aligned, n), seen in configs.items():
        assert seen == set(range(1, n + 1)), f"{kernel} {arch} {dtype} aligned={aligned}: configs {seen} of {n}"
    assert any(n > 1 for (*_, n) in configs), "some class tunes between several configs"
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_triton
@pytest.mark.parametrize("args,word", [(["--arch", "sm_75"], "arch"), (["--kernel", "_no_such_kernel"], "kernel")])
def test_bad_arguments_exit_2_with_one_line(args, word):
    proc = _run(*args, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "unknown" in lines[0]
    assert proc.stdout == ""


@needs_triton
def test_kernel_names_under_the_interpreter():
    assert {"_prefix_attention_fwd_kernel", "_assemble_prompts_bwd_kernel", "_cosine_logits_fwd_kernel"} <= set(
        res.kernel_names())


def test_occupancy_model():
    # 65536 registers: 128 regs x 128 threads -> 4 CTAs; 255 regs (256 per thread allocated) -> 2
    assert res.ctas_per_sm("sm_90", 128, 4, 0) == 4
    assert res.ctas_per_sm("sm_90", 255, 4, 0) == 2
    assert res.ctas_per_sm("sm_80", 32, 4, 0) == 16
    assert res.ctas_per_sm("sm_80", 64, 4, 100_000) == 1  # shared memory bound
    assert res.ctas_per_sm("sm_80", 64, 4, 200_000) == 0  # does not fit at all


def test_failures_name_every_problem():
    ok = dict(kernel="k", arch="sm_80", dtype="fp16", variant="v", regs=64, spill_bytes=0, smem_bytes=0,
              ctas_per_sm=4)
    assert res.failures([ok]) == []
    bad = [dict(ok, spill_bytes=8), dict(ok, smem_bytes=10**6, ctas_per_sm=0), dict(ok, error="boom")]
    out = res.failures(bad)
    assert any("spills 8 bytes" in x for x in out)
    assert any("shared memory" in x for x in out) and any("no CTA" in x for x in out)
    assert any("compile error: boom" in x for x in out)


def test_parse_resource_usage():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _k:\n  REG:168 STACK:16 SHARED:1024 LOCAL:0 "
            "CONSTANT[0]:728 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert res.parse_resource_usage(text) == {"regs": 168, "stack": 16, "shared": 1024, "local": 0}
    with pytest.raises(ValueError):
        res.parse_resource_usage("nothing here")


def _source(fn):
    return textwrap.dedent(inspect.getsource(getattr(fn, "fn", fn)))


@needs_triton
def test_no_kernel_uses_atomics():
    """Shared-context and prefix grads are per-block partials plus a fixed-order sum: deterministic."""
    for mod in res.KERNEL_MODULES:
        module = importlib.import_module(f"promptcore.kernels.{mod}")
        for name, obj in vars(module).items():
            if name.startswith("_") and name.endswith("_kernel"):
                assert "tl.atomic_" not in _source(obj), f"{mod}.{name} uses atomics"


def test_attention_has_one_softmax_update():
    """The online-softmax step lives in one helper, called from the prefix and the suffix loop."""
    for name in ("_prefix_attention_fwd_kernel", "_prefix_attention_bwd_dq_kernel",
                 "_prefix_attention_bwd_dkdv_kernel"):
        assert "tl.exp2(s - m_use" not in _source(getattr(pa, name)), f"{name} repeats the online softmax update"
    calls = [n for n in ast.walk(ast.parse(_source(pa._prefix_attention_fwd_kernel)))
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_online_softmax_update"]
    assert len(calls) == 2  # the prefix loop and the suffix loop


def test_markdown_tables_take_the_worst_case():
    row = dict(kernel="_k", arch="sm_90", dtype="fp16", aligned=True, regs=100, spill_bytes=0, smem_bytes=0,
               ctas_per_sm=4, config="autotune 1/2", variant="d=64 BLOCK_M=64 BLOCK_N=32 w4 s2 aligned")
    rows = [row, dict(row, regs=120, ctas_per_sm=3, dtype="bf16"),
            dict(row, config="autotune 2/2", variant="d=64 BLOCK_M=128 BLOCK_N=32 w8 s2 aligned", regs=180,
                 ctas_per_sm=1),
            dict(row, arch="sm_80", aligned=False, config="fixed", regs=200, spill_bytes=8, ctas_per_sm=1)]
    text = res.format_markdown(rows)
    assert "| `_k` | fp16 | 180 / 0 / 1 | - | - | 200 / 8 / 1 |" in text
    assert "| `_k` | bf16 | 120 / 0 / 3 | - | - | - |" in text
    assert "| `_k` | d=64 BLOCK_M=64 BLOCK_N=32 w4 s2 | 120 / 0 / 3 | - |" in text
    assert "| `_k` | d=64 BLOCK_M=128 BLOCK_N=32 w8 s2 | 180 / 0 / 1 | - |" in text
