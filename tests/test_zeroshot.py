"""ZeroShot against open_clip's build_zero_shot_classifier: templates, dtypes, paths, files, export, bad input."""

import json
import re
import warnings

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import MIXED_NAMES, assert_within_naive_error, float64_copy, make_model, scaled_error

import promptcore
from promptcore import PromptTooLongError, ZeroShot
from promptcore.checkpoints import CheckpointError
from promptcore.cli import main
from promptcore.export import read_metadata, to_onnx

TOKENIZER = open_clip.get_tokenizer("ViT-B-16")
# the slot at the start, in the middle and at the end; escaped braces; no final period
FORMATS = ["{} on a table", "a {} in a video game.", "itap of a {}.", "a photo of {{braces}} and a {}"]
CALLABLES = [lambda c: f"a bad photo of the {c}.", lambda c: f"art of the {c}."]
NAMES = MIXED_NAMES[:5]


def builder(model, names, templates):
    """open_clip's classifier as (n_cls, E)."""
    return open_clip.build_zero_shot_classifier(model, TOKENIZER, names, templates).T


@pytest.mark.parametrize("kind", ["quickgelu", "custom_text"])
@pytest.mark.parametrize("templates", ["formats", "callables", "mixed"])
def test_equals_open_clip_builder_fp32(kind, templates):
    chosen = {"formats": FORMATS, "callables": CALLABLES, "mixed": FORMATS[:2] + CALLABLES[:1]}[templates]
    model = make_model(kind)
    with torch.no_grad():
        # open_clip's builder takes one kind of template: mixed lists go to it as format strings
        as_builder = chosen if templates != "mixed" else [t if isinstance(t, str) else t("{}") for t in chosen]
        ref = builder(model, MIXED_NAMES, as_builder)
        oracle = builder(float64_copy(model), MIXED_NAMES, as_builder)
    zs = ZeroShot(model, MIXED_NAMES, templates=chosen, tokenizer=TOKENIZER, progress=False).eval()
    fast = zs.encode_text("fast")
    assert fast.shape == ref.shape == (len(MIXED_NAMES), 32)
    assert_within_naive_error(fast, ref, oracle, name="fast")
    assert_within_naive_error(zs.encode_text("naive"), ref, oracle, name="naive")
    # the fast path really shares prefixes: far fewer live tokens than the full prompts
    fast_tokens, naive_tokens = zs.live_tokens
    assert naive_tokens == len(chosen) * len(MIXED_NAMES) * 77 and fast_tokens < naive_tokens / 3


def test_builtin_template_sets_and_one_class():
    model = make_model()
    zs = ZeroShot(model, ["goldfish"], templates="simple", progress=False)
    assert len(zs.templates) == 7 and zs.options() == {"templates": "simple"}
    with torch.no_grad():
        ref = builder(model, ["goldfish"], open_clip.SIMPLE_IMAGENET_TEMPLATES)
        oracle = builder(float64_copy(model), ["goldfish"], open_clip.SIMPLE_IMAGENET_TEMPLATES)
    assert zs.text_features().shape == (1, 32)
    assert_within_naive_error(zs.text_features(), ref, oracle, name="one class")
    assert len(ZeroShot(model, ["goldfish"], progress=False).templates) == 80  # "openai" is the default


def test_a_deliberate_bug_fails_the_bound():
    """The bound is tight enough to see an unnormalised template average or a dropped template."""
    model = make_model()
    zs = ZeroShot(model, MIXED_NAMES, templates=FORMATS, progress=False)
    with torch.no_grad():
        ref = builder(model, MIXED_NAMES, FORMATS)
        dropped = builder(model, MIXED_NAMES, FORMATS[:-1])
    assert scaled_error(zs.text_features(), ref) < 1e-5
    assert scaled_error(dropped, ref) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_open_clips_own_error(dtype):
    names = NAMES
    with torch.no_grad():
        ref = builder(make_model(), names, FORMATS)
        lp_model = make_model(dtype=dtype)
        own = scaled_error(builder(lp_model, names, FORMATS), ref)
    zs = ZeroShot(lp_model, names, templates=FORMATS, progress=False)
    feats = zs.text_features()
    assert feats.dtype == dtype
    # open_clip's own error here: ~9e-4 (fp16), ~7e-3 (bf16)
    assert scaled_error(feats, ref) <= 2 * own + 1e-4
    assert scaled_error(zs.encode_text("naive"), ref) <= 2 * own + 1e-4


def test_triton_kernels_give_the_same_classifier(monkeypatch):
    model = make_model()
    zs = ZeroShot(model, NAMES[:3], templates=FORMATS[:2], progress=False)
    expected = zs.encode_text("fast")
    monkeypatch.setenv("PROMPTCORE_BACKEND", "triton")  # the Triton interpreter on CPU
    assert scaled_error(zs.encode_text("fast"), expected) < 1e-5


def test_logits_cache_and_class_swap():
    model = make_model()
    zs = ZeroShot(model, NAMES, templates=FORMATS, progress=False).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = builder(model, NAMES, FORMATS)
        img = F.normalize(model.encode_image(images), dim=-1)
        expected = model.logit_scale.exp() * img @ ref.T
        logits = zs(images)
    assert logits.shape == (3, len(NAMES)) and scaled_error(logits, expected) < 1e-5
    first = zs.text_features()
    assert zs.text_features() is first  # cached
    with torch.no_grad():  # the text tower's weights change: the classifier is rebuilt
        model.ln_final.weight.mul_(1.5)
        ref2 = builder(model, NAMES, FORMATS)
    second = zs.text_features()
    assert second is not first and scaled_error(second, ref2) < 1e-5
    zs.set_classnames(["cat", "dog"])
    with torch.no_grad():
        ref3 = builder(model, ["cat", "dog"], FORMATS)
    assert zs.classnames == ["cat", "dog"] and scaled_error(zs.text_features(), ref3) < 1e-5


def test_bounded_passes_give_the_same_classifier():
    model = make_model()
    templates = FORMATS[2:3] + ["a bad photo of a {}.", "a good photo of a {}."]  # prefix lengths 4, 5, 5
    whole = ZeroShot(model, MIXED_NAMES, templates=templates, progress=False)
    small = ZeroShot(model, MIXED_NAMES, templates=templates, progress=False, max_prompts=4)
    sizes = [len(t) * len(range(*c.indices(len(MIXED_NAMES)))) for t, c in small._plan]
    assert max(sizes) <= 4 and sum(sizes) == len(templates) * len(MIXED_NAMES)
    assert len(whole._plan) == 2  # one pass per distinct prefix length
    assert scaled_error(small.text_features(), whole.text_features()) < 1e-6


def test_non_causal_tower_falls_back_with_one_warning():
    from promptcore import engine

    engine._reported_fallbacks.clear()
    model = make_model("bidirectional")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zs = ZeroShot(model, NAMES, templates=FORMATS[:2], progress=False)
        feats = zs.text_features()
        zs.set_classnames(NAMES[:2])
        zs.text_features()
    messages = [str(w.message) for w in caught if "full-prompt" in str(w.message)]
    assert len(messages) == 1 and "bidirectional" in messages[0]
    with torch.no_grad():
        ref = builder(model, NAMES, FORMATS[:2])
    assert scaled_error(feats, ref) < 1e-5
    with pytest.raises(ValueError, match="not exact"):
        ZeroShot(model, NAMES, templates=FORMATS[:2], text_path="fast")


def _raises(c):
    raise KeyError("no such class")


@pytest.mark.parametrize("templates, error, message", [
    (["a photo of a dog."], ValueError, r"template 0 'a photo of a dog\.' must hold exactly one '\{\}' class slot"),
    (["ok {}", "two {} and {}"], ValueError, r"template 1 'two \{\} and \{\}' .* holds 2"),
    (["a {0} photo"], ValueError, r"template 0 .* plain '\{\}'"),
    (["a {name} photo"], ValueError, r"template 0 .* plain '\{\}'"),
    (["broken { brace {}"], ValueError, r"template 0 'broken \{ brace \{\}' is not a valid format string"),
    (["ok {}", _raises], ValueError, r"template 1 \(callable _raises\) raised KeyError for class 'dog'"),
    ([lambda c: 3], TypeError, r"template 0 \(callable .*lambda.*\) returned int for class 'dog', not a string"),
    ([], ValueError, "the template list is empty"),
    ("imagenet-80", ValueError, r"unknown template set 'imagenet-80'; choose one of openai, simple"),
    ([None], TypeError, "template 0 .* neither a format string nor a callable"),
    (["{}" + " word" * 80], PromptTooLongError, r"class 'dog' with template 0 \('\{\} word"),
])
def test_bad_templates_are_named_and_nothing_is_built(templates, error, message):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        ZeroShot(model, ["dog", "cat"], templates=templates, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # not frozen either


def test_bad_class_lists_change_nothing():
    zs = ZeroShot(make_model(), NAMES, templates=FORMATS[:2], progress=False).eval()
    feats = zs.text_features()
    long_name = "word " * 80
    with pytest.raises(PromptTooLongError, match=r"class 'word word .* template 0 \('\{\} on a table'\)"):
        zs.set_classnames(["cat", long_name])
    with pytest.raises(ValueError, match="empty"):
        zs.set_classnames([])
    with pytest.raises(ValueError, match="class 1 has an empty"):
        zs.set_classnames(["cat", " "])
    with pytest.raises(ValueError, match="max_prompts"):
        ZeroShot(make_model(), NAMES, templates=FORMATS, max_prompts=0)
    assert zs.classnames == NAMES and zs.text_features() is feats


def test_save_load_and_from_file(tmp_path, monkeypatch):
    model = make_model()
    templates = FORMATS[:2] + [lambda c: f"a bad photo of the {c}."]
    zs = ZeroShot(model, NAMES, templates=templates, progress=False)
    path = zs.save(tmp_path / "zs.safetensors", model_name="tiny")
    feats = zs.text_features()
    # the file holds the classifier; loading it builds nothing
    monkeypatch.setattr(ZeroShot, "encode_text", lambda *a, **k: pytest.fail("rebuilt a saved classifier"))
    loaded = ZeroShot.from_file(path, make_model())
    assert loaded.options() == {"templates": FORMATS[:2] + ["a bad photo of the {}."]}
    assert loaded.classnames == NAMES and loaded.model_name == "tiny"
    assert torch.equal(loaded.text_features(), feats)
    monkeypatch.undo()
    rebuilt = ZeroShot.from_file(path, make_model(), use_saved=False)
    assert scaled_error(rebuilt.text_features(), feats) < 1e-6
    other = ZeroShot(make_model(), NAMES[:2], templates=FORMATS[:2], progress=False)
    with pytest.raises(CheckpointError, match="other class names"):
        other.load(path)
    with pytest.raises(CheckpointError, match="not zeroshot"):
        coop = promptcore.CoOp(make_model(), NAMES, n_ctx=2)
        ZeroShot.from_file(coop.save(tmp_path / "coop.safetensors"), make_model())
    # a callable that changes the name has no format string: refused before anything is written
    upper = ZeroShot(make_model(), NAMES, templates=[lambda c: f"a {c.upper()}."], progress=False)
    with pytest.raises(CheckpointError, match=r"template 0 \(callable .*\) cannot be written as a format string"):
        upper.save(tmp_path / "upper.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coop.safetensors", "zs.safetensors"]


def test_onnx_export_matches_pytorch(tmp_path):
    model = make_model()
    zs = ZeroShot(model, NAMES, templates=FORMATS, progress=False).eval()
    zs.model_name = "tiny"
    report = to_onnx(zs, tmp_path / "zs.onnx", with_features=True)
    assert report.method == "zeroshot" and report.top1_agreement == 1.0
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(tmp_path / "zs.onnx"), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = zs(images)
    assert logits.shape == (4, len(NAMES)) and scaled_error(torch.from_numpy(logits), expected) < 1e-4
    meta = read_metadata(tmp_path / "zs.onnx")
    assert meta["method"] == "zeroshot" and meta["classnames"] == NAMES and meta["options"] == {"templates": FORMATS}


TINY_CONFIG = {"embed_dim": 32, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


def test_cli_export_verify_serving_and_failures(tmp_path, capsys):
    config = tmp_path / "promptcore-tiny-zs.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("promptcore-tiny-zs")
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(FORMATS) + "\n")
    base = ["export", "--method", "zeroshot", "--model", "promptcore-tiny-zs", "--model-config", str(config),
            "--pretrained", str(weights), "--quiet"]
    out = tmp_path / "out"
    assert main(base + ["--classnames", str(classes), "--templates", str(templates), "--out", str(out),
                        "--serving", "triton-server"]) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model.onnx", "prompts.safetensors",
                                                     "triton-server"]
    labels = (out / "triton-server" / "promptcore_zeroshot" / "labels.txt").read_text().splitlines()
    assert labels == NAMES
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = builder(model, NAMES, FORMATS)
        expected = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ ref.T
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4 * expected.abs().max().item())
    assert main(["verify", str(out / "model.onnx")]) == 0
    assert capsys.readouterr().out.startswith("ok:")

    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo with no slot\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["--classnames", str(classes), "--templates", str(bad)], "template 1 'a photo with no slot'"),
        (["--classnames", str(classes), "--templates", "nothing-here"], "neither a template set"),
        ([], "needs class names"),
        (["--classnames", str(classes), "--dataset", "imagenet"], "not both"),
        (["--classnames", str(classes), "--n-ctx", "4"], "option 'n_ctx' does not apply to ZeroShot"),
    ]
    for extra, message in cases:
        assert main(base + extra + ["--out", str(tmp_path / "new")]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("promptcore export: error:") and re.search(message, err), (extra, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    coop_args = ["export", "--method", "coop", "--model", "promptcore-tiny-zs", "--out", str(tmp_path / "new")]
    assert main(coop_args) == 2 and "--checkpoint is required" in capsys.readouterr().err
