"""Folder runs (promptcore/runner.py): ``promptcore eval`` and ``promptcore tpt`` rows against direct calls and
the naive text path, independence from world size and shard order (torchrun, gloo), resume after SIGKILL, a
failing rank, corrupt images, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import scaled_error
from PIL import Image

import promptcore
from promptcore.cli import main
from promptcore.runner import (
    RunError,
    class_labels,
    decode_image_file,
    image_seed,
    load_image,
    parts_dir,
    read_rows,
    run_folder,
    scan_image_folder,
    summary_path,
)
from promptcore.views import make_views

ROOT = Path(__file__).resolve().parents[1]
MODEL = "promptcore-runner-tiny"
CONFIG = {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
NAMES = ["dog", "cat", "great white shark"]
SUBPROCESS_TIMEOUT = 240


def _write_images(root: Path, counts=(3, 2, 2), folders=("b_dog", "c_cat", "a_shark")):
    """Class folders in an order that differs from the sorted one; PNG and JPEG files of odd sizes."""
    gen = torch.Generator().manual_seed(0)
    for c, (folder, n) in enumerate(zip(folders, counts)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            arr = torch.randint(0, 256, (30 + 5 * i, 36 + c, 3), dtype=torch.uint8, generator=gen).numpy()
            Image.fromarray(arr).save(root / folder / (f"{i}.png" if i % 2 == 0 else f"{i}.jpg"), quality=95)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A registered tiny open_clip config and its weights file, an image folder, its class-name file."""
    import open_clip

    base = tmp_path_factory.mktemp("runner")
    config = base / f"{MODEL}.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL).eval()
    weights = base / "weights.pt"
    torch.save(model.state_dict(), weights)
    data = _write_images(base / "data")
    # label order = sorted folders: a_shark, b_dog, c_cat
    names = base / "names.txt"
    names.write_text("great white shark\ndog\ncat\n")
    return {"base": base, "config": config, "weights": weights, "data": data, "names": names, "model": model}


def _model(setup):
    import copy

    return copy.deepcopy(setup["model"])


def _common(setup, out, data=None):
    return [str(data or setup["data"]), "--model", MODEL, "--model-config", str(setup["config"]), "--pretrained",
            str(setup["weights"]), "--classnames", str(setup["names"]), "--classnames-in-folder-order", "--device",
            "cpu", "--workers", "0", "--quiet", "--out", str(out)]


def _tpt_args(setup, out, batch=4, data=None, extra=()):
    return ["tpt", *_common(setup, out, data), "--views", "4", "--selection", "0.5", "--batch", str(batch),
            "--precision", "fp32", "--steps", "2", "--seed", "3", *extra]


def _tpt_module(setup):
    names = [line for line in setup["names"].read_text().splitlines() if line]
    return promptcore.TPT(_model(setup), names, n_views=4, selection=0.5, steps=2, precision="native", seed=3)


def _run_cli(args, env_extra=None, torchrun=0, timeout=SUBPROCESS_TIMEOUT):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "promptcore", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)




# -- decoding and seeds ---------------------------------------------------------------------------------------


def test_decoding_matches_pil_and_falls_back_for_other_formats(tmp_path):
    arr = torch.randint(0, 256, (17, 23, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy()
    for name in ("a.png", "b.bmp"):  # torchvision.io decodes PNG; BMP goes through PIL
        Image.fromarray(arr).save(tmp_path / name)
        img = load_image(tmp_path / name)
        assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(arr).permute(2, 0, 1))
    Image.fromarray(arr[..., 0]).save(tmp_path / "gray.png")  # grayscale becomes RGB
    assert decode_image_file(tmp_path / "gray.png").shape == (3, 17, 23)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        decode_image_file(tmp_path / "bad.jpg")


def test_jpeg_bytes_path_decodes_in_batches_and_isolates_corrupt_files(setup, tmp_path):
    """The CUDA route (JPEG bytes from the workers, one batched ``decode_jpeg`` on the device), run on the CPU."""
    from promptcore.runner import FolderImages, _to_device

    data = _write_images(tmp_path / "data")
    (data / "c_cat" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # index 6
    folder = scan_image_folder(data)
    samples = [FolderImages(folder, range(7), jpeg_bytes=True)[k] for k in range(7)]
    assert [s.encoded for s in samples] == [False, True, False, True, False, False, True]
    images = _to_device(samples, torch.device("cpu"))
    for k, (sample, image) in enumerate(zip(samples, images)):
        if k == 6:
            assert image is None and "cannot decode JPEG" in sample.error
        else:
            assert sample.error is None and torch.equal(image, decode_image_file(data / folder.paths[k]))


def test_image_seeds_depend_on_seed_and_index_only():
    assert image_seed(3, 5) == image_seed(3, 5)
    seeds = {image_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2 ** 63 for x in seeds)


# -- TPT / ZERO rows ---------------------------------------------------------------------------------------------


def test_tpt_rows_equal_direct_tuning_and_the_naive_path(setup, tmp_path):
    out = tmp_path / "preds.jsonl"
    assert main(_tpt_args(setup, out)) == 0
    rows = read_rows(out)
    folder = scan_image_folder(setup["data"])
    assert [r["index"] for r in rows] == list(range(7)) and [r["path"] for r in rows] == folder.paths
    assert [r["label"] for r in rows] == [0, 0, 1, 1, 1, 2, 2]  # a_shark, b_dog, c_cat
    assert not parts_dir(out).exists()
    # the same images tuned directly, all at once, with each image's own view generator
    tpt = _tpt_module(setup)
    images = [load_image(setup["data"] / p) for p in folder.paths]
    views = torch.cat([make_views([img], 4, 32, generator=torch.Generator().manual_seed(image_seed(3, i)))
                       for i, img in enumerate(images)])
    fast = tpt.adapt(views)
    naive = tpt.adapt(views, text_path="naive")
    assert [r["pred"] for r in rows] == fast.preds.tolist() == naive.preds.tolist()
    assert [r["selected"] for r in rows] == fast.selected.tolist() == naive.selected.tolist()
    losses = torch.tensor([r["loss"] for r in rows]).t()
    assert losses.shape == (2, 7)
    assert scaled_error(losses, naive.losses) < 1e-4 and scaled_error(losses, fast.losses) < 1e-4
    assert [r["top5"][:3] for r in rows] == torch.argsort(fast.logits, -1, descending=True).tolist()
    summary = json.loads(summary_path(out).read_text())
    correct = sum(r["pred"] == r["label"] for r in rows)
    assert summary["images"] == 7 and summary["correct"] == correct and summary["top1"] == correct / 7
    assert summary["top5"] == 1.0 and summary["complete"] and summary["failed"] == []  # 3 classes: always in top-5
    assert [p["images"] for p in summary["per_class"]] == [2, 3, 2]
    assert [p["name"] for p in summary["per_class"]] == ["great white shark", "dog", "cat"]
    assert summary["images_per_s"] > 0 and summary["world_size"] == 1

    zero_out = tmp_path / "zero.jsonl"
    assert main(_tpt_args(setup, zero_out, extra=["--zero", "--selection", "0.5"])) == 0
    zrows = read_rows(zero_out)
    direct = tpt.zero(views, 0.5)
    assert [r["pred"] for r in zrows] == direct.preds.tolist()
    assert [r["selected"] for r in zrows] == direct.selected.tolist()
    assert all(r["top5"][0] == r["pred"] and sorted(r["top5"]) == [0, 1, 2] for r in zrows)


def test_rows_do_not_depend_on_world_size_shards_or_batch(setup, tmp_path):
    """One process vs torchrun --nproc-per-node 2 (gloo): byte-identical files. Both run one CPU thread per
    process (torchrun's default): CPU GEMMs round differently with other thread counts or batch shapes, so batch
    1 vs batch 4 gives the same predictions, views and top-5, and losses equal to rounding."""
    one, two, small = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "b1.jsonl"
    res = _run_cli(_tpt_args(setup, one))
    assert res.returncode == 0, res.stderr
    res = _run_cli(_tpt_args(setup, two, extra=["--workers", "1"]), torchrun=2)  # decoding in a worker process
    assert res.returncode == 0, res.stderr
    assert two.read_bytes() == one.read_bytes()
    summary = json.loads(summary_path(two).read_text())
    assert summary["world_size"] == 2 and summary["processed_this_run"] == 7
    assert main(_tpt_args(setup, small, batch=1)) == 0
    a, b = read_rows(one), read_rows(small)
    for key in ("index", "path", "label", "pred", "top5", "selected"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert scaled_error(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a])) < 1e-5


def test_sigkill_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    reference, out = tmp_path / "ref.jsonl", tmp_path / "preds.jsonl"
    assert main(_tpt_args(setup, reference, batch=1)) == 0
    args = _tpt_args(setup, out, batch=1)
    proc = subprocess.Popen([sys.executable, "-m", "promptcore", *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = parts_dir(out) / "rank-00000.jsonl"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    done = read_rows(part)
    assert 2 <= len(done) < 7
    with open(part, "a") as f:  # a row cut short by the kill
        f.write('{"index": 6, "path": "c_ca')
    assert main(args) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert json.loads(summary_path(out).read_text())["processed_this_run"] == 7 - len(done)
    assert main(args) == 0  # a finished run is not redone
    assert out.read_bytes() == reference.read_bytes()
    assert json.loads(summary_path(out).read_text())["processed_this_run"] == 0


def test_corrupt_images_are_reported_skipped_or_stop_the_run(setup, tmp_path, capsys):
    data = _write_images(tmp_path / "data")
    bad = data / "b_dog" / "1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")  # index 3
    out = tmp_path / "strict.jsonl"
    assert main(_tpt_args(setup, out, batch=2, data=data, extra=["--strict"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("promptcore tpt: error: cannot read image") and str(bad) in err and "\n" not in err
    assert not out.exists() and [r["index"] for r in read_rows(parts_dir(out) / "rank-00000.jsonl")] == [0, 1]
    # without --strict the same out resumes, skips the corrupt image and names it in the summary
    assert main(_tpt_args(setup, out, batch=2, data=data)) == 0
    assert [r["index"] for r in read_rows(out)] == [0, 1, 2, 4, 5, 6]
    summary = json.loads(summary_path(out).read_text())
    assert [f["path"] for f in summary["failed"]] == [str(bad)] and "cannot decode" in summary["failed"][0]["error"]
    assert summary["complete"] is False and summary["processed_this_run"] == 4


def test_failing_rank_stops_the_run_naming_rank_and_image(setup, tmp_path):
    data = _write_images(tmp_path / "data")
    bad = data / "b_dog" / "1.jpg"  # index 3: the second image of rank 1
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "preds.jsonl"
    start = time.monotonic()
    res = _run_cli(_tpt_args(setup, out, batch=1, data=data, extra=["--strict"]), torchrun=2)
    assert res.returncode != 0
    assert "rank 1 of 2: cannot read image" in res.stderr and str(bad) in res.stderr
    assert time.monotonic() - start < SUBPROCESS_TIMEOUT
    assert not out.exists()
    kept = [r["index"] for p in parts_dir(out).glob("rank-*.jsonl") for r in read_rows(p)]
    assert 1 in kept and len(kept) == len(set(kept))  # rank 1's first image was saved before it failed


# -- eval: CoOp, CoCoOp, MaPLe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple"])
def test_eval_rows_equal_the_naive_path(setup, tmp_path, method):
    names = [line for line in setup["names"].read_text().splitlines() if line]
    model = _model(setup)
    if method == "coop":
        module = promptcore.CoOp(model, names, n_ctx=4, seed=0)
    elif method == "cocoop":
        module = promptcore.CoCoOp(model, names, seed=0)
    else:
        module = promptcore.MaPLe(model, names, depth=2, seed=0)
    with torch.no_grad():
        for p in module.prompt_learner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))  # not the init
    module.save(tmp_path / "prompts.safetensors", model_name=MODEL)
    out = tmp_path / "preds.jsonl"
    common = _common(setup, out)
    common.remove("--classnames")
    common.remove(str(setup["names"]))  # the prompt file carries the class names
    assert main(["eval", *common, "--method", method, "--checkpoint", str(tmp_path / "prompts.safetensors"),
                 "--batch", "3"]) == 0
    rows = read_rows(out)
    folder = scan_image_folder(setup["data"])
    images = torch.stack([make_views([load_image(setup["data"] / p)], 1, 32)[0, 0] for p in folder.paths])
    module.eval()
    with torch.no_grad():
        if method == "cocoop":
            naive = module(images, text_path="naive")
        else:
            module.text_path = "naive"  # the official full 77-token prompts
            naive = module(images)
    assert [r["pred"] for r in rows] == naive.argmax(-1).tolist()
    assert [r["top5"] for r in rows] == torch.argsort(naive, -1, descending=True).tolist()
    summary = json.loads(summary_path(out).read_text())
    assert summary["config"]["method"] == method and summary["images"] == 7
    assert summary["top1"] == sum(r["pred"] == r["label"] for r in rows) / 7


def test_eval_official_coop_checkpoint_checks_the_class_names(setup, tmp_path, capsys):
    """An official Dassl checkpoint through build_from_checkpoint: its recorded training classes must match."""
    from test_checkpoints import write_dassl_checkpoint

    names = [line for line in setup["names"].read_text().splitlines() if line]
    coop = promptcore.CoOp(_model(setup), names, n_ctx=4, seed=0)
    with torch.no_grad():
        emb = coop.model.token_embedding(coop.tokenized_prompts)
    ctx = 0.02 * torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    ckpt = write_dassl_checkpoint(tmp_path / "output", {"ctx": ctx, "token_prefix": emb[:, :1],
                                                        "token_suffix": emb[:, 5:]})
    out = tmp_path / "preds.jsonl"
    assert main(["eval", *_common(setup, out), "--method", "coop", "--checkpoint", str(ckpt)]) == 0
    rows = read_rows(out)
    coop.load_official(ckpt)
    coop.eval().text_path = "naive"
    folder = scan_image_folder(setup["data"])
    images = torch.stack([make_views([load_image(setup["data"] / p)], 1, 32)[0, 0] for p in folder.paths])
    with torch.no_grad():
        assert [r["pred"] for r in rows] == coop(images).argmax(-1).tolist()
    # the folder names are not the checkpoint's training classes: refused, nothing written
    other = tmp_path / "other.jsonl"
    common = _common(setup, other)
    common.remove("--classnames")
    common.remove(str(setup["names"]))
    assert main(["eval", *common, "--method", "coop", "--checkpoint", str(ckpt)]) == 2
    assert "disagrees with" in capsys.readouterr().err
    assert not other.exists() and not parts_dir(other).exists()


# -- bad input ---------------------------------------------------------------------------------------------


def _listing(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_bad_input_is_one_line_exit_2_and_writes_nothing(setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "a" / "notes.txt").write_text("x")
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "stranger.jsonl").write_text("mine\n")
    out = tmp_path / "preds.jsonl"
    checkpoint = ["--checkpoint", str(tmp_path / "x.safetensors")]
    cases = [
        (["tpt", *_common(setup, out, tmp_path / "empty")], "has no class folders"),
        (["tpt", *_common(setup, out, tmp_path / "noimages")], "no images under"),
        (["tpt", *_common(setup, out, tmp_path / "missing")], "no image folder at"),
        (["tpt", *_common(setup, out), "--classnames", str(tmp_path / "two.txt")], "2 class names for 3 class"),
        (["tpt", *_common(setup, out), "--dataset", "imagenet"], "--classnames and --dataset"),
        (["tpt", *_common(setup, tmp_path / "nowhere" / "p.jsonl")], "does not exist"),
        (["tpt", *_common(setup, Path("/proc/promptcore-preds.jsonl"))], "is not writable"),
        (["tpt", *_common(setup, tmp_path)], "is a folder"),
        (["tpt", *_common(setup, tmp_path / "stranger.jsonl")], "was not written by a promptcore folder run"),
        (["tpt", *_common(setup, out), "--batch", "0"], "--batch must be >= 1"),
        (["eval", *_common(setup, out), "--method", "coop"], "needs --checkpoint"),
        (["eval", *_common(setup, out), "--method", "coop", *checkpoint, "--templates", "simple"],
         "--templates applies to --method zeroshot"),
    ]
    if not hasattr(promptcore, "ZeroShot"):
        cases.append((["eval", *_common(setup, out), "--method", "zeroshot"], "needs promptcore.ZeroShot"))
    before = _listing(tmp_path)
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith(f"promptcore {args[0]}: error:"), (args, err)
        assert _listing(tmp_path) == before, args


def test_resume_refuses_results_of_another_run(setup, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    assert main(_tpt_args(setup, out, extra=["--limit", "2"])) == 0
    assert len(read_rows(out)) == 2
    before = out.read_bytes(), summary_path(out).read_bytes()
    assert main(_tpt_args(setup, out, extra=["--limit", "2", "--lr", "0.01"])) == 2
    assert "holds the results of a different run (differs in lr)" in capsys.readouterr().err
    assert (out.read_bytes(), summary_path(out).read_bytes()) == before
    module = _tpt_module(setup)
    with pytest.raises(ValueError, match="mode 'tpt' needs a promptcore.TPT"):
        run_folder(promptcore.CoOp(_model(setup), NAMES, n_ctx=4), setup["data"], tmp_path / "x.jsonl", mode="tpt")
    with pytest.raises(ValueError, match="4 class names for 3 class folders"):
        run_folder(module, setup["data"], tmp_path / "x.jsonl", mode="tpt", classnames=["a", "b", "c", "d"])
    assert not (tmp_path / "x.jsonl").exists() and not parts_dir(tmp_path / "x.jsonl").exists()
    assert isinstance(RunError("x"), RuntimeError)
    assert np.isfinite(json.loads(summary_path(out).read_text())["images_per_s"])


# -- class names vs class folders ---------------------------------------------------------------------------------


def test_class_labels_match_by_name_or_declared_folder_order():
    folders = ["Great_White_Shark", "cat", "dog"]  # sorted
    assert class_labels(folders, ["dog", "great white shark", "Cat"]) == [1, 2, 0]
    assert class_labels(folders, ["dog", "great white shark", "Cat"], in_folder_order=True) == [1, 2, 0]
    wnids = ["n01", "n02", "n03"]
    with pytest.raises(ValueError, match=r"do not match the class folder names \(folders without a class name: "
                                         r"'n01', 'n02', 'n03'; class names without a folder: 'dog', 'cat', 'x'\)"
                                         r".*--classnames-in-folder-order"):
        class_labels(wnids, ["dog", "cat", "x"])
    assert class_labels(wnids, ["dog", "cat", "x"], in_folder_order=True) == [0, 1, 2]
    with pytest.raises(ValueError, match="folders without a class name: 'bird'; class names without a folder: 'owl'"):
        class_labels(["bird", "cat", "dog"], ["owl", "cat", "dog"])
    # declared in folder order, but a name that is a folder's name sits at another folder's position
    with pytest.raises(ValueError, match="not in the sorted folder order: name 1 'dog' is folder 'dog' \\(label 2\\)"):
        class_labels(["bird", "cat", "dog"], ["dog", "cat", "owl"], in_folder_order=True)
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        class_labels(folders, ["dog", "cat"], in_folder_order=True)


def _zeroshot_args(setup, out, data, names, extra=()):
    common = _common(setup, out, data)
    common.remove("--classnames-in-folder-order")
    common[common.index("--classnames") + 1] = str(names)
    return ["eval", *common, "--method", "zeroshot", "--templates", "simple", *extra]


def test_class_name_file_in_another_order_maps_folders_by_name(setup, tmp_path):
    """A class-name file whose order differs from the sorted folders used to label folder k with line k."""
    data = _write_images(tmp_path / "data", folders=("dog", "cat", "Great_White_Shark"))
    names = tmp_path / "names.txt"
    names.write_text("great white shark\ndog\ncat\n")  # sorted folders: Great_White_Shark, cat, dog
    out = tmp_path / "preds.jsonl"
    assert main(_zeroshot_args(setup, out, data, names)) == 0
    rows = read_rows(out)
    lines = names.read_text().splitlines()
    wanted = {"Great_White_Shark": 0, "dog": 1, "cat": 2}
    assert [r["label"] for r in rows] == [wanted[r["path"].split("/")[0]] for r in rows]
    assert all(lines[r["label"]] == r["path"].split("/")[0].replace("_", " ").lower() for r in rows)
    summary = json.loads(summary_path(out).read_text())
    assert [(p["name"], p["images"]) for p in summary["per_class"]] == [("great white shark", 2), ("dog", 3),
                                                                          ("cat", 2)]


def test_class_names_that_do_not_match_the_folders_are_refused(setup, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    before = _listing(tmp_path)
    for args in (_zeroshot_args(setup, out, setup["data"], setup["names"]), _tpt_args(setup, out)):
        if "--classnames-in-folder-order" in args:
            args.remove("--classnames-in-folder-order")
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"promptcore {args[0]}: error: the class names do not match the class folder names "
                              "(folders without a class name: 'a_shark', 'b_dog', 'c_cat'; class names without a "
                              "folder: 'great white shark', 'dog', 'cat'); if the names are in the sorted folder "
                              "order, say so with --classnames-in-folder-order"), err
        assert "\n" not in err and _listing(tmp_path) == before
    # the module's own class names (a prompt file's, or run_folder without classnames) are checked the same way
    with pytest.raises(ValueError, match="do not match the class folder names"):
        run_folder(_tpt_module(setup), setup["data"], out, mode="zero", progress=False)
    assert _listing(tmp_path) == before
    summary = run_folder(_tpt_module(setup), setup["data"], out, mode="zero", progress=False, limit=1,
                         classnames_in_folder_order=True)
    assert summary["images"] == 1 and read_rows(out)[0]["label"] == 0


# -- hand-edited or damaged rows --------------------------------------------------------------------------------


def test_damaged_rows_are_refused_naming_file_and_line(setup, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    args = _tpt_args(setup, out, extra=["--limit", "2", "--steps", "1"])
    assert main(args) == 0
    before = out.read_bytes(), summary_path(out).read_bytes()
    first = json.loads(out.read_text().splitlines()[0])
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"config": json.loads(summary_path(out).read_text())["config"]}))
    part = parts / "rank-00000.jsonl"
    no_index = {k: v for k, v in first.items() if k != "index"}
    cases = [
        (json.dumps(no_index), "the row has no 'index'"),
        ("[1, 2]", "a row must be a JSON object, got list"),
        (json.dumps({**first, "pred": "cat"}), "'pred' must be a JSON integer, got 'cat'"),
        (json.dumps({**first, "index": 5}), "index 5 is c_cat/0.png (label 2) in"),
        (json.dumps({**first, "index": 99}), "index 99 is outside the folder's 7 images"),
        ('{"index": 0, "path', None),  # a cut-short last line is not an error: it is dropped
        ("{not json", "is not a JSON row"),
    ]
    for bad, message in cases:
        if message is None:
            continue
        part.write_text(json.dumps(first) + "\n" + bad + "\n")
        assert main(args) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"promptcore tpt: error: {part}:2") and message in err and "\n" not in err, err
        assert (out.read_bytes(), summary_path(out).read_bytes()) == before
    # the merged file is read the same way
    part.unlink()
    out.write_text(json.dumps(no_index) + "\n")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"promptcore tpt: error: {out}:1: the row has no 'index'"), err
    out.write_bytes(b"\xff\xfe\x00garbage\n")
    assert main(args) == 2
    assert f"{out} is not a UTF-8 JSON-lines file" in capsys.readouterr().err


# -- errors without build paths, random weights, unreadable --pretrained files -----------------------------------


def test_decode_errors_name_the_file_without_torchvision_build_paths(tmp_path):
    from promptcore.runner import FolderImages, _to_device, error_text

    bad = tmp_path / "data" / "cat" / "bad.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError) as info:
        decode_image_file(bad)
    message = str(info.value)
    assert message.startswith(f"cannot decode image {bad}: ") and len(message) > len(f"cannot decode image {bad}: ")
    folder = scan_image_folder(tmp_path / "data")
    decoded = FolderImages(folder, [0])[0]
    encoded = FolderImages(folder, [0], jpeg_bytes=True)[0]
    _to_device([encoded], torch.device("cpu"))  # the GPU route's decoder, run on the CPU
    for text in (message, decoded.error, encoded.error):
        assert text and "csrc" not in text and ".cpp" not in text and "/pytorch/" not in text, text
    c10 = RuntimeError("bad header\nException raised from decode at /pytorch/vision/torchvision/csrc/io/x.cpp:62 "
                       "(most recent call first):\nframe #0: c10::Error::Error() + 0x1")
    assert error_text(c10) == "bad header"
    assert error_text(RuntimeError("decode_png, /__w/vision/pytorch/vision/torchvision/csrc/io/image/cpu/"
                                   "decode_png.cpp:77, Internal error.")) == "Internal error."
    assert error_text(KeyError()) == "KeyError"


def test_random_weights_are_the_same_whatever_the_global_rng(setup):
    """Without --pretrained every torchrun rank builds its own model: the weights must not depend on the
    process's RNG state (they used to, so ranks disagreed)."""
    from promptcore.models import RANDOM_WEIGHTS_SEED, load_model

    torch.manual_seed(1)
    a, _ = load_model(MODEL)
    torch.manual_seed(2)
    torch.rand(3)
    state = torch.get_rng_state()
    b, _ = load_model(MODEL)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    torch.manual_seed(RANDOM_WEIGHTS_SEED + 1)
    c, _ = load_model(MODEL, seed=RANDOM_WEIGHTS_SEED + 1)
    assert not torch.equal(c.state_dict()["text_projection"], sa["text_projection"])


def test_unreadable_pretrained_files_are_named(setup, tmp_path, capsys):
    garbage_pt, text_pt, garbage_st = tmp_path / "garbage.pt", tmp_path / "text.pt", tmp_path / "garbage.safetensors"
    garbage_pt.write_bytes(b"garbage\n")
    text_pt.write_bytes(b"this is not a checkpoint")
    garbage_st.write_bytes(b"\x00" * 64)
    wrong, cut = tmp_path / "wrong.pt", tmp_path / "cut.pt"
    torch.save({"x": torch.zeros(2)}, wrong)
    cut.write_bytes(setup["weights"].read_bytes()[:4096])
    out = tmp_path / "preds.jsonl"
    cases = [(garbage_pt, "not a PyTorch checkpoint that loads with weights_only=True"),
             (text_pt, "cannot load pretrained weights file"), (cut, "cannot load pretrained weights file"),
             (garbage_st, "not a safetensors file"), (wrong, "Missing key(s)"),
             (tmp_path / "missing.pt", "no pretrained weights file at")]
    for path, message in cases:
        args = _tpt_args(setup, out)
        args[args.index("--pretrained") + 1] = str(path)
        assert main(args) == 2, path
        err = capsys.readouterr().err.strip()
        assert err.startswith("promptcore tpt: error: ") and str(path) in err and message in err, err
        assert "\n" not in err and len(err) < 500
    assert not out.exists() and not parts_dir(out).exists()
