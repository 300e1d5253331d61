"""The engine's capture option: the fast path under torch.compile holds the promptcore custom ops and
equals eager, forward and backward; bad values and CUDA graphs on CPU tensors are refused.

The compile runs use the ``aot_eager`` backend (AOTAutograd's forward/backward graphs run by eager
PyTorch: no C++ compiler or inductor codegen on the 2-core CI machine) with ``fullgraph=True``, and the
Triton backend (the interpreter on CPU), so the graphs must contain the kernels as ``promptcore::`` ops.
"""

import pytest
import torch
from helpers import GraphRecorder, assert_close_scaled, make_model

import promptcore
from promptcore import PromptSet, TextEngine
from promptcore.capture import CAPTURE_MODES, CapturedPath, check_capture
from promptcore.kernels import triton_available

NAMES = ["dog", "great white shark", "x"]  # two suffix-length buckets, few interpreted programs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled code is cached per function: each test traces its own
    yield
    torch._dynamo.reset()



def _prompts(engine, layout="shared"):
    tok = promptcore.prompts.default_tokenizer()
    built = promptcore.prompts.context_prompts(tok, NAMES, 4, "X X X X", 77)
    return PromptSet(engine.tower, built.ids, built.slots, layout)


def _features_and_grads(engine, prompts, ctx, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (ctx, bias)]
    feats = engine.encode(prompts, *leaves, path="fast")
    grads = torch.autograd.grad(feats.double().pow(2).sum(), leaves)
    return feats.detach(), grads


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")
def test_compiled_fast_path_holds_the_kernels_and_equals_eager(monkeypatch):
    """CoCoOp/TPT-like: a context and a bias per group (CoOp's shared context is the keyword test below)."""
    monkeypatch.setenv("PROMPTCORE_BACKEND", "triton")
    model = make_model("quickgelu")
    recorder = GraphRecorder()
    compiled = TextEngine(model, capture="compile", compile_options={"backend": recorder.backend, "fullgraph": True})
    eager = TextEngine(model)
    prompts = _prompts(eager, "group")
    gen = torch.Generator().manual_seed(0)
    G = 2
    ctx = 0.02 * torch.randn(G, 4, 64, generator=gen)
    bias = 0.05 * torch.randn(G, 64, generator=gen)
    got, got_grads = _features_and_grads(compiled, prompts, ctx, bias)
    want, want_grads = _features_and_grads(eager, prompts, ctx, bias)
    ops = recorder.ops()
    for op in ("prefix_attention", "prefix_attention_backward", "assemble_prompts", "assemble_prompts_backward"):
        assert f"promptcore.{op}.default" in ops, f"{op} is not in the compiled graphs: {sorted(ops)}"
    assert len(recorder.graphs) == 2  # one forward, one backward graph: no graph break
    assert got.shape == (G, len(NAMES), 32)
    assert_close_scaled(got, want, name="compiled features")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert b.abs().max() > 0
        assert_close_scaled(a, b, reduction=len(NAMES) * 64, name=f"compiled gradient {i}")
    # a second call replays the compiled graph (no retrace for the same prompts and shapes)
    again = compiled.encode(prompts, *(t.clone().requires_grad_() for t in (ctx, bias)), path="fast")
    assert len(recorder.graphs) == 2
    assert torch.equal(again.detach(), got)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")
def test_coop_capture_keyword(monkeypatch):
    """One keyword turns capture on for CoOp; its text features equal the eager module's."""
    monkeypatch.setenv("PROMPTCORE_BACKEND", "triton")
    recorder = GraphRecorder()
    coop = promptcore.CoOp(make_model(), NAMES, n_ctx=4, seed=0, capture="compile")
    assert coop.engine.fast.mode == "compile"
    coop.engine.fast.compile_options["backend"] = recorder.backend  # test-only: no C++ compiler needed
    eager = promptcore.CoOp(make_model(), NAMES, n_ctx=4, seed=0)
    got = coop.encode_text("fast")
    want = eager.encode_text("fast")
    assert "promptcore.prefix_attention.default" in recorder.ops()
    assert_close_scaled(got, want, name="CoOp text features")


def test_bad_capture_values_are_refused():
    model = make_model()
    for bad in ("graphs", "", None, "Compile"):
        with pytest.raises(ValueError, match="unknown capture mode.*'none', 'compile', 'cudagraphs'"):
            TextEngine(model, capture=bad)
        with pytest.raises(ValueError, match="unknown capture mode"):
            promptcore.CoOp(model, NAMES, capture=bad)
    with pytest.raises(ValueError, match="compile_options need capture"):
        TextEngine(model, compile_options={"backend": "aot_eager"})
    with pytest.raises(ValueError, match="reduce-overhead"):
        TextEngine(model, capture="cudagraphs", compile_options={"mode": "default"})
    assert check_capture("cudagraphs") == "cudagraphs" and CAPTURE_MODES == ("none", "compile", "cudagraphs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CPU tensors")
def test_cudagraphs_refuses_cpu_tensors():
    engine = TextEngine(make_model(), capture="cudagraphs")
    prompts = _prompts(engine)
    with pytest.raises(ValueError, match="capture='cudagraphs'.*CUDA tensors.*cpu"):
        engine.encode(prompts, torch.zeros(4, 64), path="fast")
    assert engine.fast._compiled is None  # refused before anything was compiled


def test_a_copied_engine_compiles_its_own_path():
    import copy

    engine = TextEngine(make_model(), capture="compile", compile_options={"backend": "eager"})
    engine.fast.compiled  # built for the original engine
    twin = copy.deepcopy(engine)
    assert twin.fast._compiled is None and twin.fast.fn.__self__ is twin
    assert twin.fast.compile_options == {"backend": "eager"} and engine.fast._compiled is not None


def test_capture_steps_aside_under_an_outer_capture():
    """Inside an outer torch.compile (or an export) the path runs as is: no nested compile."""
    calls = []
    path = CapturedPath(lambda x: calls.append(1) or x * 2, "compile", {"backend": "eager"})
    out = torch.compile(lambda x: path(x) + 1, backend="eager", fullgraph=True)(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 3.0)) and path._compiled is None


@pytest.mark.skipif(not triton_available(), reason="triton is not installed on this platform")
def test_compiled_scoring_holds_the_cosine_op(monkeypatch):
    """A compiled scoring step (CoOp's logits, TPT's grouped form with entropy) keeps the fused cosine op."""
    monkeypatch.setenv("PROMPTCORE_BACKEND", "triton")
    from promptcore.kernels import cosine_logits

    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(3, 5, 32, generator=gen), torch.randn(3, 7, 32, generator=gen, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)

    def step(img, txt, scale):
        flat = cosine_logits(img[0], txt[0], scale)
        grouped = cosine_logits(img, txt, scale, with_entropy=True, out_dtype=torch.float32)
        return flat, grouped.logits, grouped.entropy

    recorder = GraphRecorder()
    got = torch.compile(step, backend=recorder.backend, fullgraph=True)(img, txt, scale)
    want = step(img, txt, scale)
    assert "promptcore.cosine_logits.default" in recorder.ops(), sorted(recorder.ops())
    for a, b in zip(got, want):
        assert_close_scaled(a, b, name="compiled scoring")
    loss = lambda out: out[0].sum() + out[1].pow(2).sum()  # noqa: E731
    g_got = torch.autograd.grad(loss(got), (txt, scale))
    g_want = torch.autograd.grad(loss(want), (txt, scale))
    assert "promptcore.cosine_logits_backward.default" in recorder.ops()
    for a, b in zip(g_got, g_want):
        assert_close_scaled(a, b, reduction=5 * 7, name="compiled scoring gradient")


@pytest.mark.parametrize("method", ["CoOp", "CoCoOp", "MaPLe", "TPT", "ZeroShot"])
def test_every_method_takes_the_capture_keyword(method):
    cls = getattr(promptcore, method)
    extra = {"depth": 1} if method == "MaPLe" else {}
    module = cls(make_model(), NAMES, capture="compile", **extra)
    assert module.engine.fast.mode == "compile"
    assert cls(make_model(), NAMES, **extra).engine.fast.mode == "none"
    model = make_model()
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="unknown capture mode"):
        cls(model, NAMES, capture="graphs", **extra)
    assert [p.requires_grad for p in model.parameters()] == before  # refused before freezing anything
