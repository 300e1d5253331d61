"""ONNX export: onnxruntime parity, metadata, the command line, the serving layout, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import MIXED_NAMES, make_model
from test_checkpoints import write_dassl_checkpoint

import promptcore
from promptcore.cli import main
from promptcore.export import ExportError, read_metadata, to_onnx
from promptcore.export.serving import ServingConfigError, check_config, check_repository, parse_config

TINY_CONFIG = {"embed_dim": 32, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


def _ort_logits(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_coop_export_matches_pytorch(tmp_path, dtype):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, class_token_position="middle", seed=0).eval()
    coop.model_name = "tiny"
    report = to_onnx(coop, tmp_path / "coop.onnx", dtype=dtype, with_features=True)
    assert report.top1_agreement == 1.0 and report.max_abs_diff <= (1e-4 if dtype == "fp32" else 2e-2)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, feats = _ort_logits(tmp_path / "coop.onnx", images.half() if dtype == "fp16" else images)
    with torch.no_grad():
        expected = coop(images)
        expected_feats = torch.nn.functional.normalize(coop.encode_images(images), dim=-1)
    assert logits.shape == (5, len(MIXED_NAMES)) and logits.dtype == (np.float16 if dtype == "fp16" else np.float32)
    tol = 1e-4 if dtype == "fp32" else 3e-2
    np.testing.assert_allclose(logits.astype(np.float32), expected.numpy(), atol=tol * expected.abs().max().item())
    np.testing.assert_allclose(feats.astype(np.float32), expected_feats.numpy(), atol=tol)
    meta = read_metadata(tmp_path / "coop.onnx")
    assert meta["method"] == "coop" and meta["classnames"] == MIXED_NAMES and meta["model_name"] == "tiny"
    assert meta["options"]["class_token_position"] == "middle" and meta["dtype"] == dtype
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coop.onnx"]  # nothing else left behind


def test_export_refuses_bad_targets(tmp_path):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0)
    with pytest.raises(ExportError, match="does not exist"):
        to_onnx(coop, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match=r"\.onnx"):
        to_onnx(coop, tmp_path / "m.txt")
    with pytest.raises(ExportError, match="dtype"):
        to_onnx(coop, tmp_path / "m.onnx", dtype="int8")

    class FakeTPT(torch.nn.Module):
        method = "tpt"

    with pytest.raises(ExportError, match="TPT"):
        to_onnx(FakeTPT(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_release(tmp_path):
    """A registered tiny open_clip config, its weights as a local file, a Dassl CoOp checkpoint, a class file."""
    import open_clip

    config = tmp_path / "promptcore-tiny-test.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("promptcore-tiny-test")
    weights = tmp_path / "tiny-weights.pt"
    torch.save(model.state_dict(), weights)
    coop = promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, seed=0)
    with torch.no_grad():
        emb = model.token_embedding(coop.tokenized_prompts)
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    ckpt = write_dassl_checkpoint(tmp_path / "output", {"ctx": ctx, "token_prefix": emb[:, :1],
                                                        "token_suffix": emb[:, 5:]})
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(MIXED_NAMES) + "\n")
    return {"config": config, "weights": weights, "ckpt": ckpt, "classes": classes, "ctx": ctx, "root": tmp_path}


def _export_args(r, out, *extra):
    return ["export", "--method", "coop", "--model", "promptcore-tiny-test", "--model-config", str(r["config"]),
            "--pretrained", str(r["weights"]), "--checkpoint", str(r["ckpt"]), "--classnames", str(r["classes"]),
            "--out", str(out), "--quiet", *extra]


def test_cli_export_verify_and_serving(tiny_release, capsys):
    r = tiny_release
    out = r["root"] / "out"
    assert main(_export_args(r, out, "--serving", "triton-server")) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["export_report.json", "model.onnx", "prompts.safetensors", "triton-server"]
    # the exported logits are those of CoOp with the checkpoint's context on the same weights
    import open_clip

    model = open_clip.create_model("promptcore-tiny-test", pretrained=str(r["weights"]))
    coop = promptcore.CoOp(model, MIXED_NAMES, n_ctx=4)
    with torch.no_grad():
        coop.prompt_learner.ctx.copy_(r["ctx"])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    (logits,) = _ort_logits(out / "model.onnx", images)
    with torch.no_grad():
        np.testing.assert_allclose(logits, coop.eval()(images).numpy(), atol=1e-4)
    config = parse_config((out / "triton-server" / "promptcore_coop" / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 64
    assert config.input[0].name == "images" and list(config.input[0].dims) == [3, 32, 32]
    assert list(config.output[0].dims) == [len(MIXED_NAMES)] and config.output[0].data_type == 11  # TYPE_FP32
    assert config.output[0].label_filename == "labels.txt"
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    check_repository(out / "triton-server" / "promptcore_coop")
    assert (out / "triton-server" / "promptcore_coop" / "1" / "model.onnx").is_file()
    labels = (out / "triton-server" / "promptcore_coop" / "labels.txt").read_text().splitlines()
    assert labels == MIXED_NAMES
    assert main(["verify", str(out / "model.onnx")]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_cli_failures_leave_nothing(tiny_release, capsys):
    r = tiny_release
    before = sorted(p.name for p in r["root"].iterdir())
    wrong = r["root"] / "wrong.txt"
    wrong.write_text("\n".join(MIXED_NAMES[:-1] + ["zebra"]) + "\n")
    before.append("wrong.txt")
    cases = [
        (["--classnames", str(wrong)], "class 6 .* is not the class the checkpoint was trained with"),
        (["--method", "tpt"], "TPT cannot be exported|not available"),
        (["--method", "resnet"], "unknown method 'resnet'"),
        (["--method", "cocoop"], "CoOp prompts, not CoCoOp|not available"),
        (["--n-ctx", "8"], "n_ctx=8 disagrees with .* n_ctx=4"),
    ]
    for extra, message in cases:
        args = _export_args(r, r["root"] / "out", *extra)
        for flag in ("--classnames", "--method"):
            if flag in extra:  # replace the default value of that flag
                i = args.index(flag)
                del args[i:i + 2]
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("promptcore export: error:") and len(err.strip().splitlines()) == 1
        assert re.search(message, err), (extra, err)
        assert sorted(p.name for p in r["root"].iterdir()) == sorted(before)
    args = _export_args(r, "/proc/promptcore-cannot-write-here")
    assert main(args) == 2
    assert "promptcore export: error" in capsys.readouterr().err
    assert not Path("/proc/promptcore-cannot-write-here").exists()
    assert main(["verify", str(r["root"] / "nothing.onnx")]) == 2


def test_new_classes_are_allowed_on_request(tiny_release):
    r = tiny_release
    other = r["root"] / "new.txt"
    other.write_text("cat\ndog\n")
    out = r["root"] / "new-out"
    args = _export_args(r, out, "--allow-new-classes")
    args[args.index("--classnames") + 1] = str(other)
    assert main(args) == 0
    assert read_metadata(out / "model.onnx")["classnames"] == ["cat", "dog"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_maple_export_matches_pytorch(tmp_path, dtype):
    maple = promptcore.MaPLe(make_model(), MIXED_NAMES, depth=2, seed=0).eval()
    with torch.no_grad():  # learned-looking prompts, so the visual prompts matter
        for p in maple.prompt_learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    report = to_onnx(maple, tmp_path / "maple.onnx", dtype=dtype)
    assert report.top1_agreement == 1.0
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (logits,) = _ort_logits(tmp_path / "maple.onnx", images.half() if dtype == "fp16" else images)
    with torch.no_grad():
        expected = maple(images)
        bare = promptcore.CoOp(maple.model, MIXED_NAMES, n_ctx=2)(images)
    tol = (1e-4 if dtype == "fp32" else 3e-2) * expected.abs().max().item()
    np.testing.assert_allclose(logits.astype(np.float32), expected.numpy(), atol=tol)
    assert np.abs(logits.astype(np.float32) - bare.numpy()).max() > 10 * tol  # the visual prompts are in the graph
    assert read_metadata(tmp_path / "maple.onnx")["options"]["depth"] == 2


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cocoop_export_keeps_text_side_in_graph(tmp_path, dtype):
    import onnx

    cocoop = promptcore.CoCoOp(make_model(), MIXED_NAMES, seed=0).eval()
    report = to_onnx(cocoop, tmp_path / "cocoop.onnx", dtype=dtype, batch_sizes=(1, 2))
    assert report.top1_agreement == 1.0
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (logits,) = _ort_logits(tmp_path / "cocoop.onnx", images.half() if dtype == "fp16" else images)
    with torch.no_grad():
        expected = cocoop(images, text_path="naive")  # the official per-image loop
    tol = (1e-4 if dtype == "fp32" else 3e-2) * expected.abs().max().item()
    np.testing.assert_allclose(logits.astype(np.float32), expected.float().numpy(), atol=tol)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "cocoop.onnx")).graph.node}
    assert "ArgMax" not in ops  # EOT positions are constants, not computed from token ids


def test_large_models_use_external_data(tmp_path, monkeypatch):
    from promptcore.export import onnx_export
    from promptcore.export.serving import write_triton_repository

    monkeypatch.setattr(onnx_export, "TWO_GB", 1024)  # treat the tiny model as "over 2 GB"
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0).eval()
    report = to_onnx(coop, tmp_path / "big.onnx")
    assert report.external_data and report.top1_agreement == 1.0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx.data").stat().st_size > (tmp_path / "big.onnx").stat().st_size
    images = torch.randn(2, 3, 32, 32)
    (logits,) = _ort_logits(tmp_path / "big.onnx", images)
    with torch.no_grad():
        np.testing.assert_allclose(logits, coop(images).numpy(), atol=1e-4)
    folder = write_triton_repository(tmp_path / "repo", tmp_path / "big.onnx", "big", MIXED_NAMES)
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["big.onnx.data", "model.onnx"]
    (served,) = _ort_logits(folder / "1" / "model.onnx", images)
    np.testing.assert_allclose(served, logits)


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory):
    from promptcore.export.serving import write_triton_repository

    root = tmp_path_factory.mktemp("repo")
    coop = promptcore.CoOp(make_model(), MIXED_NAMES[:3], n_ctx=4, seed=0).eval()
    to_onnx(coop, root / "m.onnx")
    return write_triton_repository(root / "repo", root / "m.onnx", "m", MIXED_NAMES[:3])


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "no_such_field: 3\n", 'no field named "no_such_field"'),
    (lambda t: t.replace("max_batch_size: 64", 'max_batch_size: "lots"'), "max_batch_size"),
    (lambda t: t.replace("data_type: TYPE_FP32", "data_type: TYPE_FP33", 1), "TYPE_FP33"),
    (lambda t: t.replace("data_type: TYPE_FP32", "data_type: TYPE_FP16", 1), "input 'images' field data_type"),
    (lambda t: t.replace("dims: 32\n", "dims: 31\n", 1), "input 'images' field dims"),
    (lambda t: t.replace('name: "logits"', 'name: "scores"'), "output names ['scores']"),
    (lambda t: t.replace("max_batch_size: 64", "max_batch_size: 4"), "preferred_batch_size 8"),
    (lambda t: t.replace('platform: "onnxruntime_onnx"', 'platform: "tensorflow_savedmodel"'), "platform"),
])
def test_serving_config_is_checked_against_triton_schema(served_repo, edit, message):
    import onnx

    text = (served_repo / "config.pbtxt").read_text()
    graph = onnx.load(str(served_repo / "1" / "model.onnx"))
    check_config(parse_config(text), graph)  # the written config passes
    with pytest.raises(ServingConfigError, match=re.escape(message)):
        check_config(parse_config(edit(text)), graph)
