"""CoOp: prompt construction as the official code does it, training, the eval cache, bad input."""

import open_clip
import pytest
import torch
from helpers import MIXED_NAMES, assert_close_scaled, make_model

import promptcore
from promptcore.kernels import assemble_prompts


def _official_prompts(model, names, ctx, position, n_ctx, prefix_phrase):
    """The official CoOp PromptLearner.forward, written out (token_prefix/suffix + cat)."""
    names = [n.replace("_", " ") for n in names]
    tok = open_clip.tokenizer.SimpleTokenizer()
    name_lens = [len(tok.encode(n)) for n in names]
    ids = open_clip.tokenize([f"{prefix_phrase} {n}." for n in names])
    with torch.no_grad():
        emb = model.token_embedding(ids)
    prefix, suffix = emb[:, :1], emb[:, 1 + n_ctx:]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(len(names), -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    out = []
    for i, n in enumerate(name_lens):
        if position == "middle":
            h = n_ctx // 2
            parts = [prefix[i:i + 1], ctx[i:i + 1, :h], suffix[i:i + 1, :n], ctx[i:i + 1, h:], suffix[i:i + 1, n:]]
        else:
            parts = [prefix[i:i + 1], suffix[i:i + 1, :n], ctx[i:i + 1], suffix[i:i + 1, n:]]
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_prompts_match_official_construction(position, csc):
    model = make_model()
    coop = promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, csc=csc, class_token_position=position, seed=0)
    ctx = coop.prompt_learner.ctx.detach()
    prompts = coop.prompt_learner.prompts
    with torch.no_grad():
        tokens = model.token_embedding(prompts.ids)
    zero_pos = torch.zeros(77, 64)
    ours = assemble_prompts(tokens, prompts.slots, zero_pos, ctx, None, "class" if csc else "shared")[0]
    official = _official_prompts(model, MIXED_NAMES, ctx, position, 4, "X X X X")
    torch.testing.assert_close(ours, official, rtol=0, atol=0)
    assert torch.equal(coop.tokenized_prompts.argmax(-1), open_clip.tokenize(
        [f"X X X X {n.replace('_', ' ')}." for n in MIXED_NAMES]).argmax(-1))


def test_eval_cache_follows_ctx_and_classes():
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = coop.text_features()
        assert coop.text_features() is first  # served from the cache
        logits = coop(images)
    with torch.no_grad():
        coop.prompt_learner.ctx.add_(0.1)
        changed = coop.text_features()
    assert changed is not first and not torch.allclose(changed, first)
    assert_close_scaled(changed, coop.encode_text("naive"), name="features after a ctx change")
    coop.set_classnames(["cat", "dog"])
    with torch.no_grad():
        assert coop(images).shape == (2, 2)
    assert logits.shape == (2, len(MIXED_NAMES))
    # with grad enabled and a trainable ctx, eval mode still gives gradients
    coop.text_features().sum().backward()
    assert coop.prompt_learner.ctx.grad is not None


def test_training_mode_never_caches():
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4).train()
    with torch.no_grad():
        assert coop.text_features() is not coop.text_features()


def test_set_classnames_rejects_wrong_count_for_class_specific_context():
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, csc=True)
    before = coop.tokenized_prompts.clone()
    with pytest.raises(ValueError, match="class-specific context was learned for 7 classes"):
        coop.set_classnames(["a", "b"])
    assert torch.equal(coop.tokenized_prompts, before)


def test_bad_input_is_named_and_changes_nothing():
    model = make_model()
    flags = [p.requires_grad for p in model.parameters()]
    long_name = " ".join(["antidisestablishmentarianism"] * 20)
    with pytest.raises(promptcore.PromptTooLongError, match="antidisestablishmentarianism"):
        promptcore.CoOp(model, ["dog", long_name])
    with pytest.raises(ValueError, match="empty"):
        promptcore.CoOp(model, [])
    with pytest.raises(ValueError, match="unknown class token position 'top'"):
        promptcore.CoOp(model, ["dog"], class_token_position="top")
    with pytest.raises(ValueError, match="unknown text path"):
        promptcore.CoOp(model, ["dog"], text_path="quick")
    assert [p.requires_grad for p in model.parameters()] == flags  # nothing frozen by failed constructions
    # bad images: tests/test_bad_input.py, for every method


def test_unsupported_model_is_named():
    class NotClip(torch.nn.Module):
        logit_scale = torch.nn.Parameter(torch.zeros(()))

        def encode_image(self, x):
            return x

    with pytest.raises(promptcore.UnsupportedModelError, match="NotClip"):
        promptcore.CoOp(NotClip(), ["dog"])
