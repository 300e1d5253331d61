"""The benchmark command cannot rot: run_all.py --smoke end to end, its bad input, the generated README
table, and the FlexAttention formulation the attention baseline relies on."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import scaled_error

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CASES = ("kernels", "text_encoding", "coop_eval", "maple_eval", "cocoop", "tpt", "zeroshot", "export")


@pytest.fixture(scope="module")
def bench_modules():
    for path in (BENCH, BENCH / "kernels"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return {name: importlib.import_module(name) for name in ("bench_kernels", "run_all", "make_table", "common")}




def _attention_inputs(G, C, S, H, d, P, prefix_groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(G, C, S, H, d, generator=gen) for _ in range(3))
    kp, vp = (torch.randn(prefix_groups, P, H, d, generator=gen) for _ in range(2))
    lens = torch.randint(1, S + 1, (C,), generator=gen)
    return q, k, v, kp, vp, lens


@pytest.mark.parametrize("G,C,S,H,d,P,prefix_groups", [
    (1, 6, 5, 2, 16, 3, 1),     # CoOp: one shared prefix
    (2, 3, 5, 2, 16, 3, 2),     # CoCoOp: a prefix per group
    (3, 7, 4, 1, 8, 1, 1),      # prefix broadcast over groups, odd class count, a one-token prefix
    (1, 1, 1, 3, 24, 17, 1),    # one class of one row, head dim not a power of two
    (2, 5, 9, 2, 16, 0, 2),     # no prefix at all
])
def test_flex_formulation_matches_prefix_attention_ref(bench_modules, G, C, S, H, d, P, prefix_groups):
    from promptcore.kernels import prefix_attention_ref

    args = _attention_inputs(G, C, S, H, d, P, prefix_groups)
    ref = prefix_attention_ref(*args)
    got = bench_modules["bench_kernels"].flex_prefix_attention(*args, compiled=False)
    assert got.shape == ref.shape
    assert scaled_error(got, ref) < 2e-6


def test_flex_formulation_check_catches_a_wrong_mask(bench_modules):
    """The same comparison fails when the mask drops the diagonal (a query not seeing its own key)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from promptcore.kernels import prefix_attention_ref

    G, C, S, H, d, P = 1, 4, 5, 2, 16, 3
    args = _attention_inputs(G, C, S, H, d, P, 1)

    def strictly_causal(b, h, q_idx, kv_idx):
        s = kv_idx - P
        return (kv_idx < P) | ((s >= 0) & (s // S == q_idx // S) & (s % S < q_idx % S))

    wrong = create_block_mask(strictly_causal, None, None, C * S, P + C * S, device="cpu")
    got = bench_modules["bench_kernels"].flex_prefix_attention(*args, block_mask=wrong, compiled=False)
    assert scaled_error(got, prefix_attention_ref(*args)) > 1e-2


def test_triton_provider_runs_under_the_interpreter(bench_modules):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton provider needs the interpreter on CPU (tests/conftest.py sets it)")
    rows = bench_modules["bench_kernels"].case(kernels=["cosine"], modes=["fwd"], providers=["triton", "torch"],
                                               dtype="fp32", size="smoke", device="cpu", compile=False)
    assert [r["provider"] for r in rows] == ["triton", "torch"]
    assert rows[0]["interpreter"] is True and rows[1]["interpreter"] is False
    assert all(r["median_ms"] > 0 and r["flops"] > 0 for r in rows)


def test_case_rejects_unknown_options(bench_modules):
    sys.path.insert(0, str(BENCH))
    bench_cocoop = importlib.import_module("bench_cocoop")
    with pytest.raises(TypeError, match="unknown option.*clases"):
        bench_cocoop.case(clases=[10])


def _run_all(*argv, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="0")  # the methods' kernels would run interpreted: minutes
    return subprocess.run([sys.executable, str(BENCH / "run_all.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = _run_all("--smoke", "--device", "cpu", "--out", str(out))
    return out, proc


def test_smoke_runs_every_case(smoke_run):
    out, proc = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    done = {r["case"] for r in rows if r["bench"] == "case_done"}
    assert done == set(CASES)
    peaks = [r for r in rows if r["bench"] == "peaks"]
    assert len(peaks) == 1 and peaks[0]["peak_gbps"] > 0 and peaks[0]["peak_tflops_fp32"] > 0
    measured = [r for r in rows if r["bench"] not in ("peaks", "case_done") and "skipped" not in r]
    for row in measured:
        for key in ("torch", "triton", "git_sha", "date", "device", "driver"):
            assert key in row, (key, row.get("bench"))
    benches = {r["bench"] for r in measured}
    assert {"kernels", "text_encoding", "coop_eval", "maple_eval", "cocoop", "tpt", "export"} <= benches
    kernel_providers = {(r["kernel"], r["provider"]) for r in measured if r["bench"] == "kernels"}
    assert {("attention", "torch"), ("attention", "sdpa"), ("attention", "flex"), ("cosine", "torch"),
            ("assembly", "torch")} <= kernel_providers
    for row in measured:
        if row["bench"] != "kernels":
            assert row["times_s"][row["baseline"]] > 0
            assert all(v > 0 for v in row["ratio_vs_baseline"].values())
    zeroshot = [r for r in rows if r.get("bench") == "zeroshot"]
    import promptcore

    assert bool(zeroshot) and (("skipped" in zeroshot[0]) != hasattr(promptcore, "ZeroShot"))


def test_smoke_writes_summary_and_plots(smoke_run):
    out, proc = smoke_run
    assert proc.returncode == 0
    summary = (out / "summary.md").read_text()
    assert "| text encoding | fwd |" in summary and "| CoCoOp | fwd+bwd |" in summary
    assert "speed-up over the baseline" in summary
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # plots are optional; everything else is not
    assert {p.name for p in out.glob("*.png")} >= {"text_encoding.png", "cocoop.png", "tpt.png", "kernel_attention.png"}


def test_resume_skips_done_cases_and_drops_a_torn_line(smoke_run, tmp_path):
    out, proc = smoke_run
    assert proc.returncode == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["bench"] == "peaks" or r.get("run_case") == "coop_eval"
            or (r["bench"] == "case_done" and r["case"] == "coop_eval")]
    before = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    results = tmp_path / "results.jsonl"
    results.write_text(before + '{"bench": "coop_eval", "trunc')  # a run killed mid-write
    again = _run_all("--smoke", "--device", "cpu", "--out", str(tmp_path), "--resume", "--cases", "coop_eval")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== coop_eval: done in an earlier run, skipped" in again.stdout
    after = results.read_text()
    assert after.startswith(before) and "trunc" not in after
    added = [json.loads(line) for line in after[len(before):].splitlines()]
    assert [r["bench"] for r in added] == ["peaks"]
    assert "| CoOp eval | eval |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--cases", "kernels", "nope"], "unknown case 'nope'"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(bench_modules, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench_modules["run_all"].main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_existing_results_are_not_overwritten(bench_modules, capsys, tmp_path):
    (tmp_path / "results.jsonl").write_text('{"bench": "peaks"}\n')
    with pytest.raises(SystemExit) as exc:
        bench_modules["run_all"].main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    assert (tmp_path / "results.jsonl").read_text() == '{"bench": "peaks"}\n'


def test_cuda_request_without_a_gpu_is_refused(bench_modules, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exc:
        bench_modules["run_all"].main(["--device", "cuda", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def _row(bench, times, baseline, **extra):
    return {"bench": bench, "times_s": times, "baseline": baseline, "model": "m", "precision": "fp16", **extra}


def test_table_ratios_and_fractions_come_from_the_rows(bench_modules):
    mt = bench_modules["make_table"]
    rows = [{"bench": "peaks", "gpu": "G", "driver": "1", "cuda": "12", "peak_gbps": 1000.0, "peak_tflops": 100.0,
             "peak_tflops_fp16": 100.0, "torch": "t", "triton": "tr", "git_sha": "abc", "date": "d", "plan": "cuda"},
            _row("cocoop", {"naive": 0.4, "fast": 0.1}, "naive", classes=100, mode="fwd",
                 frac_peak_flops={"naive": 0.05, "fast": 0.2}),
            {"bench": "kernels", "kernel": "attention", "shape": {"C": 10}, "mode": "fwd", "dtype": "float16",
             "provider": "torch", "median_ms": 3.0, "frac_peak_bw": 0.1, "frac_peak_flops": 0.01},
            {"bench": "kernels", "kernel": "attention", "shape": {"C": 10}, "mode": "fwd", "dtype": "float16",
             "provider": "triton", "median_ms": 1.0, "frac_peak_bw": 0.3, "frac_peak_flops": 0.03}]
    table = mt.table_markdown(mt.comparisons(rows))
    assert "| CoCoOp | fwd | fp16 | m, 100 classes | naive 400 ms (5% FLOP) | fast **4.00x** (20% FLOP) |" in table
    assert "| attention | fwd | fp16 | C=10 | torch 3 ms (10% BW) | triton **3.00x** (30% BW) |" in table
    assert "GPU G (driver 1, CUDA 12)" in mt.run_header(rows)


def test_readme_table_is_generated_from_the_committed_results(bench_modules, tmp_path):
    mt = bench_modules["make_table"]
    committed = [p for p in mt.DEFAULT_RESULTS if p.exists()]
    assert committed, "a committed results file (benchmarks/results/<device>/results.jsonl) is expected"
    assert mt.main(["--check"]) == 0
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("| text encoding |", "| text encodin |", 1))
    assert mt.main(["--check", "--readme", str(readme)]) == 1
    assert mt.main(["--readme", str(readme)]) == 0  # regenerating repairs it
    assert mt.main(["--check", "--readme", str(readme)]) == 0
    assert readme.read_text() == (ROOT / "README.md").read_text()
    with pytest.raises(ValueError, match="exactly one"):
        mt.replace_section("no markers here", "x")
