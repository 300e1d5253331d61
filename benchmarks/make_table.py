"""The README's performance table, generated from committed run_all.py results (never typed).

    python benchmarks/make_table.py                                   # rewrite README.md between the markers
    python benchmarks/make_table.py --check                           # exit 1 if README.md is out of date
    python benchmarks/make_table.py --results a/results.jsonl --print # print the table only
    python benchmarks/make_table.py --summary DIR                     # redo DIR/summary.md and plots

Reads the results files (default: benchmarks/results/cuda/results.jsonl and
benchmarks/results/cpu/results.jsonl, those that exist) and writes one table per file between
``<!-- benchmark-table:start -->`` and ``<!-- benchmark-table:end -->`` in README.md. Every figure
is a ratio measured in that run (speed-up over the row's baseline) with its fraction of the peak
measured in the same run (FLOP: model FLOPs of the useful work / matmul peak; BW: bytes / copy
bandwidth). run_all.py uses the same functions for its summary.md and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START = "<!-- benchmark-table:start -->"
END = "<!-- benchmark-table:end -->"
DEFAULT_RESULTS = (HERE / "results" / "cuda" / "results.jsonl", HERE / "results" / "cpu" / "results.jsonl")
BOOKKEEPING = ("peaks", "case_done", "case_failed")
# promptcore's providers first, then the baselines (rows store providers in key order)
ORDER = ("triton", "fast", "promptcore", "onnxruntime-cuda", "onnxruntime-cpu", "fast_text", "bare_image",
         "naive_compiled", "compile", "flex", "flex-eager", "sdpa")
TITLES = {"kernels": "kernel", "text_encoding": "text encoding", "coop_eval": "CoOp eval", "maple_eval": "MaPLe eval",
          "cocoop": "CoCoOp", "tpt": "TPT", "zeroshot": "zero-shot classifier", "export": "ONNX export"}


@dataclass
class Comparison:
    """Providers measured side by side on one configuration, and the baseline they are compared with."""

    bench: str
    title: str
    mode: str
    dtype: str
    config: str
    baseline: str
    times: Dict[str, float]  # median seconds
    fractions: Dict[str, Tuple[float, str]] = field(default_factory=dict)  # provider -> (fraction, "FLOP"|"BW")
    x: Optional[float] = None  # class count, for the plots

    def ratio(self, provider: str) -> float:
        return self.times[self.baseline] / self.times[provider]


def _short_dtype(name: Optional[str]) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(name or "", name or "")


def _kernel_config(kernel: str, shape: dict) -> Tuple[str, Optional[float]]:
    text = " ".join(f"{k}={v}" for k, v in shape.items())
    classes = shape.get("C", shape.get("N"))
    return text, classes


def comparisons(rows: List[dict]) -> List[Comparison]:
    """Group result rows into comparisons: kernel rows by (kernel, shape, mode, dtype), one per method row."""
    out = []
    kernel_groups = defaultdict(list)
    for row in rows:
        if row.get("bench") in BOOKKEEPING or "skipped" in row or "error" in row:
            continue
        if row.get("bench") == "kernels":
            key = (row["kernel"], json.dumps(row["shape"], sort_keys=False), row["mode"], row["dtype"])
            kernel_groups[key].append(row)
        elif "times_s" in row:
            bench = row["bench"]
            mode = row.get("mode") or row.get("case") or "eval"  # eval and export rows: inference only
            dtype = row.get("precision") or row.get("dtype") or ""
            parts = [row.get("model", "")]
            if "classes" in row:
                parts.append(f"{row['classes']} classes")
            for key, label in (("batch", "batch"), ("images", "images"), ("views", "views"), ("n_ctx", "n_ctx"),
                               ("templates", "templates"), ("method", "")):
                if key in row and not (key == "method" and bench.endswith("_eval")):
                    parts.append(f"{label} {row[key]}".strip())
            fractions = {k: (v, "FLOP") for k, v in row.get("frac_peak_flops", {}).items()}
            out.append(Comparison(bench, TITLES.get(bench, bench), mode, dtype, ", ".join(p for p in parts if p),
                                  row["baseline"], dict(row["times_s"]), fractions, row.get("classes")))
    for (kernel, shape, mode, dtype), group in kernel_groups.items():
        times, fractions = {}, {}
        for r in group:
            name = "flex-eager" if r["provider"] == "flex" and r.get("flex_compiled") is False else r["provider"]
            times[name] = r["median_ms"] / 1e3
            bw, fl = r.get("frac_peak_bw") or 0.0, r.get("frac_peak_flops") or 0.0
            fractions[name] = (bw, "BW") if bw >= fl else (fl, "FLOP")
        baseline = "torch" if "torch" in times else sorted(times)[0]
        config, x = _kernel_config(kernel, json.loads(shape))
        out.append(Comparison("kernels", f"{kernel}", mode, _short_dtype(dtype), config, baseline, times,
                              fractions, x))
    return out


OVER_PEAK_MARK = "†"
OVER_PEAK_NOTE = (f"{OVER_PEAK_MARK} above 100%: the peak, measured once at the start of the run, was measured while "
                  "the machine was busier than during that row; fractions of peak from such a run are unreliable.\n")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1e3:.3g} s"


def _frac(c: Comparison, provider: str) -> str:
    if provider not in c.fractions:
        return ""
    value, kind = c.fractions[provider]
    return f" ({100 * value:.2g}% {kind}{OVER_PEAK_MARK if value > 1 else ''})"


def table_markdown(comps: List[Comparison], skip_modes=()) -> str:
    """A markdown table: baseline time, then each other provider's speed-up over it and fraction of peak."""
    lines = ["| benchmark | mode | dtype | configuration | baseline: median (of peak) | "
             "speed-up over the baseline (of peak) |", "|---|---|---|---|---|---|"]
    for c in comps:
        if c.mode in skip_modes and c.bench == "kernels":
            continue
        others = sorted((p for p in c.times if p != c.baseline), key=lambda p: (ORDER + (p,)).index(p))
        cells = "; ".join(f"{p} **{c.ratio(p):.2f}x**{_frac(c, p)}" for p in others)
        lines.append(f"| {c.title} | {c.mode} | {c.dtype} | {c.config} | "
                     f"{c.baseline} {_ms(c.times[c.baseline])}{_frac(c, c.baseline)} | {cells} |")
    text = "\n".join(lines) + "\n"
    return text + ("\n" + OVER_PEAK_NOTE if OVER_PEAK_MARK in text else "")


def run_header(rows: List[dict]) -> str:
    """One paragraph: where and when the rows were measured, and the peaks they refer to."""
    peaks = [r for r in rows if r.get("bench") == "peaks"]
    if not peaks:
        return "No peaks row in these results.\n"
    p = peaks[0]
    matmul = ", ".join(f"{k.removeprefix('peak_tflops_')} matmul {v:.3g} TFLOP/s" for k, v in sorted(p.items())
                       if k.startswith("peak_tflops_"))
    if p.get("gpu"):
        where = f"GPU {p['gpu']} (driver {p.get('driver')}, CUDA {p.get('cuda')})"
    else:
        where = (f"CPU {p.get('cpu')} ({p.get('threads')} threads). CPU figures: only the ratios mean "
                 f"anything, and the Triton kernels do not run on a CPU (no `triton` provider)")
    parts = ""
    if len(peaks) > 1:
        parts = (f" Run in {len(peaks)} parts (`--resume`), the peaks above from the first; each fraction of peak "
                 "refers to the peaks measured in its own part.")
    return (f"{where}; torch {p.get('torch')}, triton {p.get('triton')}, git {p.get('git_sha')}, "
            f"{p.get('date')}, plan `{p.get('plan')}`. Peaks measured in the run: copy {p['peak_gbps']:.3g} GB/s, "
            f"{matmul}.{parts}\n")


def summary_markdown(rows: List[dict]) -> str:
    """run_all.py's summary.md: the header, failures and skips, and every comparison of the run."""
    parts = ["# promptcore benchmarks\n", run_header(rows)]
    failed = [r for r in rows if r.get("bench") == "case_failed"]
    skipped = [r for r in rows if "skipped" in r]
    for r in failed:
        parts.append(f"- **{r['case']} failed**: {r['error']}\n")
    for r in rows:
        if "error" in r and r.get("bench") != "case_failed":
            what = " ".join(str(r[k]) for k in ("bench", "kernel", "shape", "mode", "provider", "dtype") if k in r)
            parts.append(f"- **failed** {what}: {r['error']}\n")
    for r in skipped:
        parts.append(f"- {r['bench']} skipped: {r['skipped']}\n")
    parts.append("\n" + table_markdown(comparisons(rows)))
    return "\n".join(parts)


def readme_section(paths: List[Path]) -> str:
    """The text between the README markers: one header and table per results file."""
    parts = [f"<!-- generated by benchmarks/make_table.py from {', '.join(_rel(p) for p in paths)}; "
             "do not edit by hand -->\n"]
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        parts.append(f"From `{_rel(path)}`: " + run_header(rows))
        parts.append(table_markdown(comparisons(rows), skip_modes=("bwd",)))
    if not any("cuda" in p.parts for p in paths):
        parts.append("GPU figures: none committed yet (no GPU run of `run_all.py --device cuda` in this tree).\n")
    return "\n".join(parts)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def replace_section(text: str, section: str) -> str:
    """README text with the part between the markers replaced; a clear error if the markers are missing."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must contain exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{section}{END}{tail}"


def plot_all(rows: List[dict], out_dir: Path) -> List[Path]:
    """One PNG per benchmark (kernels: per kernel): median time per provider against the class count,
    one panel per (mode, dtype). Returns the files written; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[dev]')", file=sys.stderr)
        return []
    by_plot = defaultdict(list)
    for c in comparisons(rows):
        by_plot[c.title if c.bench == "kernels" else c.bench].append(c)
    written = []
    for name, comps in by_plot.items():
        panels = list(dict.fromkeys((c.mode, c.dtype) for c in comps))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (mode, dtype) in zip(axes[0], panels):
            sel = [c for c in comps if (c.mode, c.dtype) == (mode, dtype)]
            labels = list(dict.fromkeys(c.config for c in sel))
            for provider in dict.fromkeys(p for c in sel for p in c.times):
                pts = [(labels.index(c.config), c.times[provider] * 1e3) for c in sel if provider in c.times]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel("median ms")
            ax.set_title(f"{comps[0].title} {mode} {dtype}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{'kernel_' + name if comps[0].bench == 'kernels' else name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, nargs="+", default=None, help="results.jsonl files written by run_all.py")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the README table differs from the generated one")
    p.add_argument("--print", action="store_true", help="print the generated section instead of writing it")
    p.add_argument("--summary", type=Path, metavar="DIR", default=None,
                   help="instead: rewrite DIR/summary.md and DIR's plots from DIR/results.jsonl")
    args = p.parse_args(argv)
    if args.summary is not None:
        results = args.summary / "results.jsonl"
        if not results.is_file():
            print(f"make_table.py: error: {results} does not exist", file=sys.stderr)
            return 2
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        (args.summary / "summary.md").write_text(summary_markdown(rows))
        plots = plot_all(rows, args.summary)
        print(f"wrote {args.summary / 'summary.md'} and {len(plots)} plots")
        return 0
    paths = args.results or [path for path in DEFAULT_RESULTS if path.exists()]
    missing = [str(path) for path in paths if not path.is_file()]
    if not paths or missing:
        print(f"make_table.py: error: no results file {' '.join(missing) or 'found'}; run benchmarks/run_all.py",
              file=sys.stderr)
        return 2
    section = readme_section(paths)
    if args.print:
        print(section)
        return 0
    try:
        text = args.readme.read_text()
        new = replace_section(text, section)
    except (OSError, ValueError) as exc:
        print(f"make_table.py: error: {args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.readme}: the benchmark table is out of date; run python benchmarks/make_table.py",
                  file=sys.stderr)
            return 1
        print(f"{args.readme}: the benchmark table matches {', '.join(_rel(p) for p in paths)}")
        return 0
    tmp = args.readme.with_name(args.readme.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(args.readme)
    print(f"wrote the benchmark table of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
