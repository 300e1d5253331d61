"""Export reliability: NaN-aware verification, whole-folder commits, locking, SIGTERM, metadata and file checks."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from helpers import MIXED_NAMES, make_model
from test_export import TINY_CONFIG, _export_args

import promptcore
from promptcore.cli import main
from promptcore.export import ExportError, ExportReport, pipeline, read_metadata, to_onnx

TESTS = Path(__file__).resolve().parent


# -- a tiny release and one real export folder, shared (an export takes seconds) ---------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    import open_clip
    from test_checkpoints import write_dassl_checkpoint

    root = tmp_path_factory.mktemp("release")
    config = root / "promptcore-tiny-test.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("promptcore-tiny-test")
    weights = root / "tiny-weights.pt"
    torch.save(model.state_dict(), weights)
    coop = promptcore.CoOp(model, MIXED_NAMES, n_ctx=4, seed=0)
    with torch.no_grad():
        emb = model.token_embedding(coop.tokenized_prompts)
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    ckpt = write_dassl_checkpoint(root / "output", {"ctx": ctx, "token_prefix": emb[:, :1],
                                                    "token_suffix": emb[:, 5:]})
    classes = root / "classes.txt"
    classes.write_text("\n".join(MIXED_NAMES) + "\n")
    r = {"config": config, "weights": weights, "ckpt": ckpt, "classes": classes, "root": root}
    assert main(_export_args(r, root / "export", "--serving", "triton-server")) == 0
    r["export"] = root / "export"
    return r


@pytest.fixture
def folder(release, tmp_path):
    """A private copy of the shared export folder, to tamper with."""
    out = tmp_path / "export"
    shutil.copytree(release["export"], out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rehash(out: Path) -> None:
    """Record the current files' sha256 in the report (a folder as an older or a forged export would leave it)."""
    report = json.loads((out / "export_report.json").read_text())
    report["sha256"] = {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*"))
                        if p.is_file() and p.name != "export_report.json"}
    (out / "export_report.json").write_text(json.dumps(report))


def _set_metadata(onnx_path: Path, **fields) -> None:
    import onnx

    model = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in fields.items():
        if value is None:
            props.pop("promptcore." + key, None)
        else:
            props["promptcore." + key] = value
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_path))


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- NaN and agreement ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["every class", "one class"])
def test_export_with_nan_prompts_fails(tmp_path, where):
    coop = promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, csc=where == "one class", seed=0).eval()
    with torch.no_grad():
        if where == "every class":
            coop.prompt_learner.ctx.fill_(float("nan"))
        else:
            coop.prompt_learner.ctx[2].fill_(float("nan"))
    with pytest.raises(ExportError, match="non-finite logits: .*NaN"):
        to_onnx(coop, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_verify_fails_on_nan_weights(release, folder, capsys):
    # NaN in the CLIP weights verify rebuilds PyTorch from (the prompt file's reader refuses NaN prompts itself)
    weights = folder.parent / "nan-weights.pt"
    state = torch.load(release["weights"], weights_only=True)
    state["visual.proj"][:, ::2] = float("nan")
    torch.save(state, weights)
    _set_metadata(folder / "model.onnx", pretrained=str(weights), pretrained_size=str(weights.stat().st_size),
                  pretrained_sha256=_sha256(weights))
    _rehash(folder)
    code = main(["verify", str(folder / "model.onnx"), "--provider", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out.startswith("MISMATCH"), captured
    assert "non-finite logits: PyTorch returned" in captured.err and "NaN" in captured.err, captured.err


def test_verify_ok_requires_top1_agreement(folder, monkeypatch):
    def disagreeing(*args, **kwargs):  # logits close everywhere, yet 3 of 4 images pick another class
        return {"max_abs_diff": 0.0, "max_abs_logit": 10.0, "top1_agreement": 0.25, "max_disagreement_gap": 5.0,
                "nonfinite": "", "torch_ms": 1.0, "onnxruntime_ms": 1.0, "provider": "CPUExecutionProvider",
                "provider_note": ""}

    monkeypatch.setattr(pipeline, "compare_with_onnxruntime", disagreeing)
    result = pipeline.verify_folder_model(folder / "model.onnx", provider="cpu")
    assert not result["ok"] and "top-1 agreement 25.0%" in result["failure"]


def test_disagreements_within_tolerance_are_ties():
    from promptcore.export.onnx_export import judge

    base = {"max_abs_diff": 1e-4, "max_abs_logit": 10.0, "top1_agreement": 0.5, "nonfinite": ""}
    assert judge({**base, "max_disagreement_gap": 1e-5}, "fp32") == ""
    assert "top-1" in judge({**base, "max_disagreement_gap": 1.0}, "fp32")
    assert "non-finite" in judge({**base, "top1_agreement": 1.0, "max_disagreement_gap": 0.0,
                                  "nonfinite": "PyTorch returned 3 NaN logits at batch 1"}, "fp32")
    assert "max |diff| nan" in judge({**base, "max_abs_diff": float("nan"), "max_disagreement_gap": 0.0}, "fp32")


# -- whole-folder commits ---------------------------------------------------------------------------------------


def _fake_to_onnx(marker: str, hold=None):
    """A stand-in for to_onnx writing a marked model file at once (the folder logic is under test, not torch)."""

    def fake(module, path, dtype="fp32", with_features=False, extra_metadata=None, progress=None, provider="auto"):
        Path(path).write_bytes(f"model {marker}".encode())
        if hold is not None:
            hold()
        return ExportReport(path=str(path), method=module.method, dtype=dtype, num_classes=len(module.classnames),
                            image_size=32, outputs=["logits"], external_data=False, batch_sizes=[1],
                            max_abs_diff=0.0, max_abs_logit=1.0, top1_agreement=1.0, torch_ms=1.0,
                            onnxruntime_ms=1.0)

    return fake


@pytest.fixture
def coop_module():
    return promptcore.CoOp(make_model(), MIXED_NAMES[:3], n_ctx=4, seed=0).eval()


def _old_export(tmp_path, module, monkeypatch) -> dict:
    monkeypatch.setattr(pipeline, "to_onnx", _fake_to_onnx("old"))
    pipeline.export_folder(module, tmp_path / "out")
    return _snapshot(tmp_path / "out")


class _Crash(Exception):
    pass


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_crash_at_any_move_leaves_a_complete_folder(tmp_path, monkeypatch, coop_module, exchange):
    old = _old_export(tmp_path, coop_module, monkeypatch)
    monkeypatch.setattr(pipeline, "to_onnx", _fake_to_onnx("new"))
    if not exchange:  # the fallback where the system has no atomic exchange
        monkeypatch.setattr(pipeline, "_exchange", lambda a, b: False, raising=False)
    real = {"replace": os.replace, "rename": os.rename, "move": shutil.move,
            "exchange": getattr(pipeline, "_exchange", lambda a, b: False)}
    moves = []

    def counting(name, crash_at):
        def move(*args, **kwargs):
            moves.append(name)
            if len(moves) == crash_at:
                raise _Crash(f"simulated crash at move {crash_at} ({name})")
            return real[name](*args, **kwargs)
        return move

    outcomes = set()
    for crash_at in range(1, 8):
        moves.clear()
        for name, target in (("replace", os), ("rename", os), ("move", shutil)):
            monkeypatch.setattr(target, name, counting(name, crash_at))
        monkeypatch.setattr(pipeline, "_exchange", counting("exchange", crash_at), raising=False)
        try:
            pipeline.export_folder(coop_module, tmp_path / "out")
            outcomes.add("new")
        except _Crash:
            outcomes.add("old")
            assert _snapshot(tmp_path / "out") == old, f"crash at move {crash_at}"
        finally:
            for name, target in (("replace", os), ("rename", os), ("move", shutil)):
                monkeypatch.setattr(target, name, real[name])
            monkeypatch.setattr(pipeline, "_exchange", real["exchange"], raising=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], f"crash at move {crash_at}"
        if "new" in outcomes:
            break
    assert outcomes == {"old", "new"}
    new = _snapshot(tmp_path / "out")
    assert new["model.onnx"] == b"model new" and set(new) == set(old)


def test_export_fails_without_touching_the_old_folder(tmp_path, monkeypatch, coop_module):
    old = _old_export(tmp_path, coop_module, monkeypatch)

    def failing(*args, **kwargs):
        raise ExportError("simulated verification failure")

    monkeypatch.setattr(pipeline, "to_onnx", failing)
    with pytest.raises(ExportError, match="simulated"):
        pipeline.export_folder(coop_module, tmp_path / "out")
    assert _snapshot(tmp_path / "out") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_holding_other_files_is_not_replaced(tmp_path, monkeypatch, coop_module):
    monkeypatch.setattr(pipeline, "to_onnx", _fake_to_onnx("new"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds 'notes.txt', which promptcore export does not write"):
        pipeline.export_folder(coop_module, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_exports_are_refused(tmp_path, monkeypatch, coop_module):
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        assert release.wait(60)

    monkeypatch.setattr(pipeline, "to_onnx", _fake_to_onnx("first", hold))
    errors = []
    first = threading.Thread(target=lambda: _run_catching(errors, coop_module, tmp_path / "out"))
    first.start()
    try:
        assert started.wait(60)
        with pytest.raises(ExportError, match="another export into .*out is running"):
            pipeline.export_folder(coop_module, tmp_path / "out")
    finally:
        release.set()
        first.join(60)
    assert errors == []
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"model first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock file and staging gone


def _run_catching(errors, module, out):
    try:
        pipeline.export_folder(module, out)
    except BaseException as exc:  # reported to the main thread
        errors.append(exc)


def test_report_is_written_last_with_every_file_hash(release):
    out = release["export"]
    report = json.loads((out / "export_report.json").read_text())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(report["sha256"]) == [f for f in files if f != "export_report.json"]
    assert "triton-server/promptcore_coop/labels.txt" in report["sha256"]
    assert all(report["sha256"][f] == _sha256(out / f) for f in report["sha256"])


@pytest.mark.parametrize("victim", ["triton-server/promptcore_coop/labels.txt", "prompts.safetensors", "model.onnx"])
def test_verify_names_a_changed_or_missing_file(folder, capsys, victim):
    path = folder / victim
    path.write_bytes(path.read_bytes() + b"\n")
    assert main(["verify", str(folder / "model.onnx"), "--provider", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{path} changed after the export" in err
    path.unlink()
    assert main(["verify", str(folder / "model.onnx"), "--provider", "cpu"]) == 2
    missing = f"no ONNX file at {path}" if victim == "model.onnx" else f"{path} is missing"
    assert missing in capsys.readouterr().err


# -- SIGTERM ----------------------------------------------------------------------------------------------------


SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    os.environ.setdefault("PROMPTCORE_BACKEND", "torch")
    from helpers import make_model
    import promptcore
    from promptcore.export import pipeline
    from test_export_reliability import _fake_to_onnx

    if {custom!r}:
        signal.signal(signal.SIGTERM, lambda *a: print("previous handler ran", flush=True))
    module = promptcore.CoOp(make_model(), ["cat", "dog"], n_ctx=4, seed=0)
    out = {out!r}
    pipeline.to_onnx = _fake_to_onnx("old")
    pipeline.export_folder(module, out)

    def hold():
        print("READY", flush=True)
        time.sleep(120)

    pipeline.to_onnx = _fake_to_onnx("new", hold)
    try:
        pipeline.export_folder(module, out)
    except Exception as exc:
        print("ERROR", exc, flush=True)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the previous handler is back
        sys.exit(3)
""")


@pytest.mark.parametrize("custom", [False, True], ids=["default-handler", "own-handler"])
def test_sigterm_during_export_cleans_up(tmp_path, custom):
    out = tmp_path / "out"
    script = SIGTERM_SCRIPT.format(tests=str(TESTS), custom=custom, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(tmp_path))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")
        assert any(p.name.startswith(".out.promptcore-staging.") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if custom:
        assert proc.returncode == 3 and "previous handler ran" in rest and "interrupted by SIGTERM" in rest, err
    else:
        assert proc.returncode == -signal.SIGTERM, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no lock file
    assert (out / "model.onnx").read_bytes() == b"model old"


def test_sigterm_handler_is_restored(tmp_path, monkeypatch, coop_module):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        monkeypatch.setattr(pipeline, "to_onnx", _fake_to_onnx("new"))
        pipeline.export_folder(coop_module, tmp_path / "out")
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- paths and metadata that verify reads -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../elsewhere/prompts.safetensors", "/tmp/prompts.safetensors", "..", "sub/x"])
def test_verify_reads_the_prompts_file_only_from_the_folder(folder, name, capsys):
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(folder / "prompts.safetensors", elsewhere / "prompts.safetensors")
    _set_metadata(folder / "model.onnx", prompts_file=name)
    _rehash(folder)
    assert main(["verify", str(folder / "model.onnx"), "--provider", "cpu"]) == 2
    assert f"promptcore.prompts_file is {name!r}; it must be a bare file name" in capsys.readouterr().err


def test_relative_pretrained_is_recorded_resolved_and_checked(release, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "w" / "tiny.pt"
    weights.parent.mkdir()
    shutil.copy(release["weights"], weights)
    monkeypatch.chdir(weights.parent)
    args = _export_args(release, tmp_path / "rel")
    args[args.index("--pretrained") + 1] = "tiny.pt"
    assert main(args) == 0
    meta = read_metadata(tmp_path / "rel" / "model.onnx")
    assert meta["pretrained"] == str(weights) and meta["pretrained_sha256"] == _sha256(weights)
    assert meta["pretrained_size"] == str(weights.stat().st_size)
    monkeypatch.chdir(tmp_path)  # verify runs from another folder
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "rel" / "model.onnx"), "--provider", "cpu"]) == 0
    state = torch.load(weights, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, weights)
    assert main(["verify", str(tmp_path / "rel" / "model.onnx"), "--provider", "cpu"]) == 2
    assert f"the pretrained weights file {weights} changed since" in capsys.readouterr().err


def _tiny_onnx(path: Path, **fields) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph)
    meta = {"method": "coop", "classnames": json.dumps(["a", "b", "c"]), "options": "{}", "model_name": "tiny",
            "dtype": "fp32", "image_size": "32", "outputs": json.dumps(["logits"]), "version": "0"}
    meta.update(fields)
    for key, value in meta.items():
        if value is not None:
            model.metadata_props.add(key="promptcore." + key, value=value)
    onnx.save(model, str(path))
    return path


def test_complete_metadata_reads_back(tmp_path):
    meta = read_metadata(_tiny_onnx(tmp_path / "m.onnx"))
    assert meta["classnames"] == ["a", "b", "c"] and meta["dtype"] == "fp32"


@pytest.mark.parametrize("fields, message", [
    ({"dtype": None}, "promptcore.dtype is missing"),
    ({"dtype": "int8"}, "promptcore.dtype is 'int8'"),
    ({"image_size": None}, "promptcore.image_size is missing"),
    ({"image_size": "big"}, "promptcore.image_size is 'big'"),
    ({"classnames": "[1, 2"}, "promptcore.classnames is not valid JSON"),
    ({"classnames": json.dumps(["a", "b\nc"])}, "promptcore.classnames is not valid: class 1"),
    ({"options": "[]"}, "promptcore.options is not a JSON object"),
    ({"outputs": json.dumps(["scores"])}, "promptcore.outputs is"),
    ({"method": "resnet"}, "promptcore.method is 'resnet'"),
    ({"model_name": None}, "promptcore.model_name is missing"),
])
def test_read_metadata_checks_every_field(tmp_path, fields, message, capsys):
    path = _tiny_onnx(tmp_path / "model.onnx", **fields)
    with pytest.raises(ExportError, match=re.escape(f"{path}: metadata field {message}")):
        read_metadata(path)
    report = {"sha256": {"model.onnx": _sha256(path)}}
    (tmp_path / "export_report.json").write_text(json.dumps(report))
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptcore verify: error:") and message in err


@pytest.mark.parametrize("batch", ["0", "-2", "two"])
def test_verify_batch_must_be_positive(folder, batch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(folder / "model.onnx"), "--batch", "1", batch])
    assert exit_info.value.code == 2
    assert "argument --batch: batch size" in capsys.readouterr().err
    with pytest.raises(ExportError, match="batch sizes must be integers >= 1"):
        pipeline.verify_folder_model(folder / "model.onnx", batch_sizes=(1, 0))


# -- class names that would break labels.txt ---------------------------------------------------------------------


BAD_NAMES = [["cat", "dog\nfish", "bird"], ["cat", "dog\rfish", "bird"], ["cat", "dog\u2028fish", "bird"],
             ["cat", "dog\x00", "bird"]]


@pytest.mark.parametrize("names", BAD_NAMES, ids=["newline", "carriage-return", "line-separator", "nul"])
def test_control_characters_in_class_names_are_refused(release, tmp_path, names, coop_module, monkeypatch):
    from promptcore.export.serving import write_triton_repository

    with pytest.raises(ExportError, match=r"class 1 \('dog.*holds the control character"):
        write_triton_repository(tmp_path / "repo", release["export"] / "model.onnx", "m", names)
    assert not (tmp_path / "repo").exists()
    coop_module.classnames = list(names)  # past whatever the prompt layer checks
    monkeypatch.setattr(pipeline, "to_onnx", _fake_to_onnx("new"))
    with pytest.raises(ExportError, match=r"class 1 \('dog.*holds the control character"):
        pipeline.export_folder(coop_module, tmp_path / "out", serving="triton-server")
    with pytest.raises(ExportError, match=r"class 1 \('dog.*holds the control character"):
        to_onnx(coop_module, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_the_swap_lets_it_complete(tmp_path, monkeypatch, coop_module):
    _old_export(tmp_path, coop_module, monkeypatch)
    monkeypatch.setattr(pipeline, "to_onnx", _fake_to_onnx("new"))
    real_swap = pipeline._swap_in

    def swap_with_sigterm(stage, out):
        os.kill(os.getpid(), signal.SIGTERM)
        real_swap(stage, out)

    monkeypatch.setattr(pipeline, "_swap_in", swap_with_sigterm)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        pipeline.export_folder(coop_module, tmp_path / "out")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]  # handed on to the previous handler once the swap is done
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"model new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
