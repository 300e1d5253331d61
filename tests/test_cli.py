"""The main job (``promptcore demo``) and command-line error handling: one line on stderr and exit status 2 for
any error (the traceback with PROMPTCORE_TRACEBACK=1), 130 on Ctrl-C."""

import os
import subprocess
import sys
from pathlib import Path

from promptcore import cli
from promptcore.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_paths_agree(capsys):
    assert main(["demo", "--model", "ViT-B-32", "--classes", "12", "--steps", "3", "--batch", "2", "--n-ctx", "4"]) == 0
    out = capsys.readouterr().out
    assert "12 imagenet classes" in out and "top-1 agreement 100.0%" in out
    assert out.count("loss") == 3 and "speed-up" in out


def test_bad_arguments_exit_non_zero_with_one_line(capsys):
    assert main(["demo", "--model", "NoSuchNet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "promptcore demo: error: unknown open_clip model 'NoSuchNet'"
    assert main(["demo", "--dataset", "mnist", "--model", "ViT-B-32"]) == 2
    assert "unknown data set 'mnist'" in capsys.readouterr().err


# -- the backstop: one line and exit status 2 for whatever escapes a command --------------------------------------


def _fail_with(exc):
    def handler(args):
        raise exc
    return handler


def test_unexpected_errors_are_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("PROMPTCORE_TRACEBACK", raising=False)
    monkeypatch.setattr(cli, "_demo", _fail_with(KeyError("index")))
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "promptcore demo: error: KeyError: 'index'\n"
    monkeypatch.setattr(cli, "_demo", _fail_with(RuntimeError(
        "decode_jpeg, /pytorch/vision/torchvision/csrc/io/image/cpu/decode_jpeg.cpp:171, Image is truncated")))
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "promptcore demo: error: Image is truncated\n"


def test_traceback_env_var_brings_the_traceback_back(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_demo", _fail_with(KeyError("index")))
    monkeypatch.setenv("PROMPTCORE_TRACEBACK", "1")
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "in handler" in err
    assert err.endswith("KeyError: 'index'\npromptcore demo: error: KeyError: 'index'\n")


def test_keyboard_interrupt_exits_130_without_traceback(monkeypatch, capsys):
    monkeypatch.delenv("PROMPTCORE_TRACEBACK", raising=False)
    monkeypatch.setattr(cli, "_demo", _fail_with(KeyboardInterrupt()))
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "promptcore demo: interrupted\n"


def test_garbage_pretrained_file_is_named(tmp_path, capsys):
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    assert main(["demo", "--model", "ViT-B-32", "--pretrained", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err == (f"promptcore demo: error: cannot load pretrained weights file {garbage} into ViT-B-32: not a "
                   f"safetensors file ({err.split('not a safetensors file (')[1]}")
    assert err.count("\n") == 1


def _promptcore(args, **env):
    environ = {k: v for k, v in os.environ.items() if k != "PROMPTCORE_TRACEBACK"}
    return subprocess.run([sys.executable, "-m", "promptcore", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**environ, "OMP_NUM_THREADS": "1", **env}, timeout=240)


def test_commands_in_a_subprocess_fail_with_one_line(tmp_path):
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"garbage\n")
    args = ["demo", "--model", "ViT-B-32", "--pretrained", str(garbage)]
    res = _promptcore(args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [f"promptcore demo: error: cannot load pretrained weights file {garbage} into "
                                       "ViT-B-32: not a PyTorch checkpoint that loads with weights_only=True "
                                       "(Unsupported operand 103)"]
    res = _promptcore(["tpt", str(tmp_path / "missing"), "--out", str(tmp_path / "p.jsonl")])
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"promptcore tpt: error: no image folder at {tmp_path / 'missing'}"]
    res = _promptcore(args, PROMPTCORE_TRACEBACK="1")
    assert res.returncode == 2 and "Traceback (most recent call last)" in res.stderr
    assert "UnpicklingError" in res.stderr and res.stderr.splitlines()[-1].startswith("promptcore demo: error: ")
