"""The tolerance rule of tests/helpers.py has teeth: realistic bugs in the fast path fail it.

Every fast-vs-naive check in the suite goes through ``assert_within_naive_error`` (the fast path's
scaled error against a float64 oracle at most 2x the naive path's, plus eps * sqrt(K)); here the
same check is run on deliberately broken fast paths and must fail.
"""

import pytest
import torch
from helpers import MIXED_NAMES, assert_close_scaled, assert_within_naive_error, float64_copy, make_model, scaled_error

import promptcore
from promptcore import engine as engine_mod
from promptcore.cocoop import CoCoOp


def _check(coop):
    fast, naive = coop.encode_text("fast"), coop.encode_text("naive")
    oracle = float64_copy(coop).encode_text("naive")
    assert_within_naive_error(fast, naive, oracle, name="text features")


def test_one_position_shift_fails(monkeypatch):
    coop = promptcore.CoOp(make_model("quickgelu"), MIXED_NAMES, n_ctx=4, seed=3)
    _check(coop)  # the real fast path passes
    real_assemble, real_fast = engine_mod.assemble_prompts, engine_mod.TextEngine.encode_fast

    def shifted_assemble(tokens, slots, pos, *args, **kwargs):  # positional embeddings one position late
        return real_assemble(tokens, slots, torch.roll(pos, 1, dims=0), *args, **kwargs)

    def buggy_fast(self, *args, **kwargs):
        monkeypatch.setattr(engine_mod, "assemble_prompts", shifted_assemble)
        try:
            return real_fast(self, *args, **kwargs)
        finally:
            monkeypatch.setattr(engine_mod, "assemble_prompts", real_assemble)

    monkeypatch.setattr(engine_mod.TextEngine, "encode_fast", buggy_fast)
    with pytest.raises(AssertionError, match="text features"):
        _check(coop)


def test_eot_read_one_position_early_fails(monkeypatch):
    coop = promptcore.CoOp(make_model("gelu_ls"), MIXED_NAMES, n_ctx=4, seed=3)
    prompts = coop.prompt_learner.prompts
    monkeypatch.setattr(prompts, "eot", prompts.eot - 1)  # both paths read the token before EOT ...
    fast = coop.encode_text("fast")
    monkeypatch.undo()  # ... but the naive path and the oracle read the EOT
    naive, oracle = coop.encode_text("naive"), float64_copy(coop).encode_text("naive")
    with pytest.raises(AssertionError):
        assert_within_naive_error(fast, naive, oracle)


def test_dropped_meta_net_bias_fails():
    model = make_model("quickgelu")
    cocoop = CoCoOp(model, MIXED_NAMES, seed=0)
    with torch.no_grad():
        feats = model.encode_image(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        cocoop.prompt_learner.meta_net.linear2.bias.add_(torch.linspace(-0.5, 0.5, 64))
        naive = cocoop.logits_from_image_features(feats, "naive")
        oracle = float64_copy(cocoop).logits_from_image_features(feats.double(), "naive")
        assert_within_naive_error(cocoop.logits_from_image_features(feats, "fast"), naive, oracle)
        bias = cocoop.prompt_learner.meta_net.linear2.bias
        saved = bias.clone()
        bias.zero_()  # the fast path loses the meta-net's output bias
        dropped = cocoop.logits_from_image_features(feats, "fast")
        bias.copy_(saved)
    with pytest.raises(AssertionError):
        assert_within_naive_error(dropped, naive, oracle)


def test_scaled_error_is_not_fooled_by_near_zero_elements():
    want = torch.tensor([1.0, 1e-9, -0.5])
    got = want + torch.tensor([0.0, 1e-7, 0.0])  # elementwise relative error 100 on the tiny entry
    assert scaled_error(got, want) == pytest.approx(1e-7, rel=1e-6)
    assert_close_scaled(got, want)
    with pytest.raises(AssertionError):
        assert_close_scaled(want + torch.tensor([0.0, 0.0, 1e-3]), want)
