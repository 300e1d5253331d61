"""Offsets past 2**31 elements: every kernel widens program ids before multiplying strides.

A tensor of 2**31 elements is too big to fill on a CPU runner, but a view with a row stride
of 2**30 + E over a lazily-allocated (untouched, hence not resident) buffer makes the third
row start past 2**31 while only a few pages are ever written. With int32 offsets the kernels
read or write the wrong address (under the interpreter: a crash), so each check runs in a
subprocess and the test asserts on its exit status and output.
"""

import ast
import inspect
import os
import subprocess
import sys
import textwrap

import pytest

import promptcore.kernels  # noqa: F401

SCRIPT = textwrap.dedent("""
    import torch
    from promptcore.kernels import (assemble_prompts, assemble_prompts_ref, cosine_logits, cosine_logits_ref,
                                    prefix_attention, prefix_attention_ref)

    E = 16
    STRIDE = 2**30 + E  # fits int32; row 2 starts at 2**31 + 2 E

    def far_rows(rows, dtype):
        store = torch.empty((rows - 1) * STRIDE + E, dtype=dtype)  # lazily mapped: untouched pages cost nothing
        view = store.as_strided((rows, E), (STRIDE, 1))
        view.copy_(torch.randn(rows, E))
        return view

    def check(name, got, want, atol):
        err = (got.float() - want.float()).abs().max().item()
        assert err <= atol, f"{name}: error {err}"
        print(name, "ok")

    img, txt = far_rows(3, torch.float16), torch.randn(4, E, dtype=torch.float16)
    check("cosine_logits", cosine_logits(img, txt, 1.0), cosine_logits_ref(img, txt, 1.0), 1e-2)

    tok = far_rows(3, torch.float16).view(3, 1, E)  # (C=3, S=1, D) with a huge class stride
    slots = torch.full((3, 1), -1)
    pos = torch.randn(1, E, dtype=torch.float16)
    check("assemble_prompts", assemble_prompts(tok, slots, pos), assemble_prompts_ref(tok, slots, pos), 0)

    q = far_rows(3, torch.float32).view(1, 3, 1, 1, E).requires_grad_()  # (G, C=3, S, H, d)
    k, v = torch.randn(1, 3, 1, 1, E), torch.randn(1, 3, 1, 1, E)
    kp, vp = torch.randn(1, 2, 1, E), torch.randn(1, 2, 1, E)
    out = prefix_attention(q, k, v, kp, vp)
    check("prefix_attention", out, prefix_attention_ref(q, k, v, kp, vp), 1e-5)
    (dq,) = torch.autograd.grad(out.sum(), q)
    (dq_ref,) = torch.autograd.grad(prefix_attention_ref(q, k, v, kp, vp).sum(), q)
    check("prefix_attention backward", dq, dq_ref, 1e-5)
""")


@pytest.mark.skipif(sys.maxsize < 2**40, reason="needs a 64-bit address space")
def test_rows_past_2_pow_31(device):
    if device != "cpu":
        pytest.skip("the lazily mapped buffer trick is for CPU memory; CUDA would allocate 4 GiB per view")
    env = dict(os.environ, TRITON_INTERPRET="1", PROMPTCORE_BACKEND="triton")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    for name in ("cosine_logits", "assemble_prompts", "prefix_attention", "prefix_attention backward"):
        assert f"{name} ok" in proc.stdout


def _kernels():
    import importlib

    for mod in ("prompt_assembly", "prefix_attention", "cosine_logits"):
        module = importlib.import_module(f"promptcore.kernels.{mod}")
        for name, obj in vars(module).items():
            if name.startswith("_") and name.endswith("_kernel"):
                yield f"{mod}.{name}", obj


@pytest.mark.parametrize("name,kernel", list(_kernels()), ids=lambda x: x if isinstance(x, str) else "")
def test_program_ids_are_widened_before_use(name, kernel):
    """Every tl.program_id(...) in a kernel is immediately cast: tl.program_id(i).to(tl.int64)."""
    fn = getattr(kernel, "fn", kernel)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "program_id"]
    widened = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "to" and n.func.value in calls
        and ast.unparse(n.args[0]) == "tl.int64"
    ]
    assert calls, f"{name}: no program_id found"
    assert len(widened) == len(calls), f"{name}: a program id is used without .to(tl.int64)"


def test_there_are_kernels_to_check():
    assert len(list(_kernels())) >= 8
