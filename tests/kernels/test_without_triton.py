"""`import promptcore.kernels` must work where Triton is absent (macOS, Windows): the ops take the reference."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys

    import torch  # torch itself copes with a missing triton; import it first, then hide triton

    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")] + ["triton", "triton.language"]:
        sys.modules[name] = None  # `import triton` now raises ImportError, as on a machine without it
    from promptcore import kernels as K
    assert not K.triton_available() and not K.use_triton(torch.zeros(1))
    q = torch.randn(1, 2, 3, 1, 8)
    kp = torch.randn(1, 2, 1, 8)
    torch.testing.assert_close(K.prefix_attention(q, q, q, kp, kp), K.prefix_attention_ref(q, q, q, kp, kp))
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    torch.testing.assert_close(K.cosine_logits(a, b, 1.0), K.cosine_logits_ref(a, b, 1.0))
    tok, slots, pos = torch.randn(2, 3, 4), torch.full((2, 3), -1), torch.randn(3, 4)
    torch.testing.assert_close(K.assemble_prompts(tok, slots, pos), K.assemble_prompts_ref(tok, slots, pos))
    print("reference path ok")
""")


def test_import_and_ops_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "PROMPTCORE_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference path ok" in proc.stdout
