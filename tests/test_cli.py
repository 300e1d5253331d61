"""The main job (``promptcore demo``) and command-line error handling."""

from promptcore.cli import main


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
