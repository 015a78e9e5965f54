"""Results of ``qzoom eval``: per-benchmark numbers from evalscope's outputs, the summary table, the Pareto plot.

``collect_benchmark`` turns one evalscope task directory into a small JSON-able dict (score, samples, latency,
visual tokens, zoom rate, gate probability, accuracy with and without zoom). ``summarize`` compares runs:

- accuracy per benchmark (evalscope's primary metric, in [0, 1]) and their plain average;
- throughput: per benchmark samples / sum of per-sample model latency (the paper's definition, batch 1), and
  over benchmarks the paper's "rectified" group throughput ``sum(W) / sum(W_i / tput_i)`` with W the full
  split sizes, so a benchmark weighs as if it had run in full whatever ``--limit`` was; relative throughput is
  that number divided by the reference run's over the same benchmarks;
- mean visual tokens (low-resolution view + crop) and zoom rate, averaged over benchmarks.

``write_summary`` writes ``summary.md``, ``summary.csv`` and ``summary.json``; ``pareto_plot`` draws accuracy
against relative throughput per benchmark group (Doc/OCR, high-resolution), like the paper's Fig. 8.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from qzoom_swift.eval.suite import BENCHMARKS, GROUP_TITLES
from qzoom_swift.fileio import atomic_path, write_text_atomic


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _report_score(report: dict[str, Any], metric: str) -> tuple[float, str, int]:
    metrics = report.get("metrics") or []
    if not metrics:
        raise ValueError(f"evalscope report {report.get('name')!r} has no metrics")
    chosen = next((m for m in metrics if (m.get("identity") or {}).get("name") == metric), metrics[0])
    return float(chosen["score"]), (chosen.get("identity") or {}).get("name", metric), int(chosen.get("num", 0))


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def collect_benchmark(work_dir: str | Path, model_id: str, benchmark: str) -> dict[str, Any]:
    """Numbers of one evalscope task (``work_dir`` with ``reports/``, ``predictions/`` and ``reviews/``)."""
    work_dir = Path(work_dir)
    bench = BENCHMARKS[benchmark]
    report_path = work_dir / "reports" / model_id / f"{benchmark}.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"no evalscope report at {report_path}")
    score, metric, num = _report_score(json.loads(report_path.read_text()), bench.main_metric)

    samples: list[dict[str, Any]] = []
    for pred_path in sorted((work_dir / "predictions" / model_id).glob(f"{benchmark}_*.jsonl")):
        review_path = work_dir / "reviews" / model_id / pred_path.name
        scores = {}
        if review_path.is_file():
            for row in _read_jsonl(review_path):
                sc = (row.get("sample_score") or {}).get("score") or {}
                value = (sc.get("value") or {}).get(sc.get("main_score_name") or "")
                if value is None and sc.get("value"):
                    value = next(iter(sc["value"].values()))
                scores[row.get("index")] = value
        for row in _read_jsonl(pred_path):
            meta = ((row.get("model_output") or {}).get("metadata") or {}).get("qzoom")
            if meta is None:
                continue
            samples.append({**meta, "score": scores.get(row.get("index")), "index": row.get("index"),
                            "subset": pred_path.stem.removeprefix(f"{benchmark}_")})
    if not samples:
        raise ValueError(f"{benchmark}: no per-sample qzoom metadata in {work_dir / 'predictions' / model_id}")

    # a failed sample counts in the score (evalscope scored its empty answer) and in `samples`, and is listed;
    # latency, tokens, zoom rate and gate come from the answered ones
    failed = [s for s in samples if s.get("failed")]
    answered = [s for s in samples if not s.get("failed")]
    total_latency = sum(s["latency_s"] for s in answered)
    zoomed = [s for s in answered if s.get("zoomed")]
    direct = [s for s in answered if not s.get("zoomed")]
    return {
        "benchmark": benchmark,
        "metric": metric,
        "score": score,
        "num": num,
        "samples": len(samples),
        "failed": len(failed),
        "failures": {r: sum(1 for s in failed if s["failure"] == r) for r in sorted({s["failure"] for s in failed})},
        "failed_samples": [{"subset": s["subset"], "index": s["index"], "failure": s["failure"],
                            "error": s.get("error", "")} for s in failed],
        "latency_total_s": total_latency,
        "latency_mean_s": total_latency / len(answered) if answered else None,
        "throughput_sps": len(answered) / total_latency if total_latency > 0 else None,
        "visual_tokens_mean": _mean([s["visual_tokens"] for s in answered]),
        "visual_tokens_low_mean": _mean([s["visual_tokens_low"] for s in answered]),
        "prompt_tokens_mean": _mean([s["prompt_tokens"] for s in answered]),
        "output_tokens_mean": _mean([s.get("output_tokens", 0) for s in answered]),
        "zoom_rate": len(zoomed) / len(answered) if answered else None,
        "gate_prob_mean": _mean([s.get("gate_prob") for s in answered]),
        "score_zoomed": _mean([s["score"] for s in zoomed]),
        "score_direct": _mean([s["score"] for s in direct]),
        "reasons": {r: sum(1 for s in answered if s.get("reason") == r)
                    for r in sorted({s.get("reason") for s in answered})},
    }


def rectified_throughput(per_bench: dict[str, dict[str, Any]], names: list[str]) -> float | None:
    """``sum(W) / sum(W_i / tput_i)`` over ``names`` (W: full split sizes); None if any is missing."""
    total_w = total_t = 0.0
    for name in names:
        tput = (per_bench.get(name) or {}).get("throughput_sps")
        if not tput:
            return None
        w = BENCHMARKS[name].full_size
        total_w += w
        total_t += w / tput
    return total_w / total_t if total_t > 0 else None


def _run_row(run: dict[str, Any], names: list[str], ref: dict[str, Any] | None) -> dict[str, Any]:
    per = run["benchmarks"]
    row: dict[str, Any] = {"run": run["name"], "mode": run["mode"], "budget": run["budget"]}
    for name in names:
        row[name] = per[name]["score"] if name in per else None
    scores = [row[n] for n in names]
    row["avg_accuracy"] = _mean(scores) if all(s is not None for s in scores) else None
    row["throughput_sps"] = rectified_throughput(per, names)
    ref_tput = rectified_throughput(ref["benchmarks"], names) if ref else None
    row["rel_throughput"] = row["throughput_sps"] / ref_tput if (row["throughput_sps"] and ref_tput) else None
    row["mean_visual_tokens"] = _mean([per[n]["visual_tokens_mean"] for n in names if n in per])
    row["zoom_rate"] = _mean([per[n]["zoom_rate"] for n in names if n in per])
    row["samples"] = sum(per[n]["samples"] for n in names if n in per)
    row["failed"] = sum(per[n].get("failed", 0) for n in names if n in per)
    groups = {}
    for group in dict.fromkeys(BENCHMARKS[n].group for n in names):
        members = [n for n in names if BENCHMARKS[n].group == group]
        g_scores = [per[n]["score"] for n in members if n in per]
        g_tput = rectified_throughput(per, members)
        g_ref = rectified_throughput(ref["benchmarks"], members) if ref else None
        groups[group] = {"benchmarks": members,
                         "avg_accuracy": _mean(g_scores) if len(g_scores) == len(members) else None,
                         "throughput_sps": g_tput,
                         "rel_throughput": g_tput / g_ref if (g_tput and g_ref) else None}
    row["groups"] = groups
    return row


def summarize(runs: list[dict[str, Any]], names: list[str], reference: str | None = None) -> dict[str, Any]:
    """Rows (one per run, in order) comparing ``runs`` (each ``{name, mode, budget, benchmarks: {...}}``)."""
    by_name = {r["name"]: r for r in runs}
    if reference is None:
        reference = next((r["name"] for r in runs if r["mode"] == "baseline"), runs[0]["name"] if runs else None)
    if reference is not None and reference not in by_name:
        raise ValueError(f"reference run {reference!r} is not among the runs {list(by_name)}")
    ref = by_name.get(reference) if reference else None
    return {"reference": reference, "benchmarks": names, "rows": [_run_row(r, names, ref) for r in runs]}


CSV_FIXED = ("run", "mode", "budget")
CSV_TAIL = ("avg_accuracy", "throughput_sps", "rel_throughput", "mean_visual_tokens", "zoom_rate", "samples",
            "failed")


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "f3":
        return f"{value:.3f}"
    if kind == "f0":
        return f"{value:.0f}"
    return str(value)


def to_markdown(summary: dict[str, Any], title: str = "Q-Zoom evaluation") -> str:
    names = summary["benchmarks"]
    head = ["run", "mode", "budget", *(BENCHMARKS[n].pretty for n in names), "Avg", "rel. throughput",
            "samples/s", "visual tokens", "zoom rate", "n", "failed"]
    lines = [f"# {title}", "",
             f"Accuracy in % (evalscope's primary metric per benchmark); throughput relative to "
             f"`{summary['reference']}` (rectified over full split sizes, model time per sample, batch 1); "
             "visual tokens = low-resolution view + crop, mean per sample; zoom rate = share of zoomed samples. "
             "Averages count each benchmark once. failed = samples that could not be answered (unreadable image, "
             "out of memory, model error): scored as wrong, counted in n, listed in each benchmark's result.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [row["run"], row["mode"], str(row["budget"]), *(_fmt(row[n], "pct") for n in names),
                 _fmt(row["avg_accuracy"], "pct"), _fmt(row["rel_throughput"], "x"), _fmt(row["throughput_sps"], "f3"),
                 _fmt(row["mean_visual_tokens"], "f0"), _fmt(row["zoom_rate"], "pct"), str(row["samples"]),
                 str(row.get("failed", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    groups = list(dict.fromkeys(g for row in summary["rows"] for g in row["groups"]))
    if len(groups) > 1:
        lines += ["", "## By group", "", "| run | " + " | ".join(
            f"{GROUP_TITLES.get(g, g)} Avg | {GROUP_TITLES.get(g, g)} rel. throughput" for g in groups) + " |",
            "|---|" + "---|---|" * len(groups)]
        for row in summary["rows"]:
            cells = [row["run"]]
            for g in groups:
                gr = row["groups"].get(g, {})
                cells += [_fmt(gr.get("avg_accuracy"), "pct"), _fmt(gr.get("rel_throughput"), "x")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(summary: dict[str, Any]) -> str:
    names = summary["benchmarks"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_FIXED, *names, *CSV_TAIL])
    for row in summary["rows"]:
        values = [row[k] for k in (*CSV_FIXED, *names, *CSV_TAIL)]
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in values])
    return buf.getvalue()


def pareto_plot(summary: dict[str, Any], path: str | Path) -> Path:
    """Accuracy (%) against relative throughput, one panel per benchmark group, one series per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    groups = list(dict.fromkeys(g for row in rows for g in row["groups"]))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.2 * max(1, len(groups)), 4.2), squeeze=False)
    styles = {"baseline": ("tab:blue", "o", "-"), "zoom": ("tab:red", "*", "-"),
              "always": ("tab:orange", "^", "--"), "never": ("tab:gray", "s", ":")}
    for ax, group in zip(axes[0], groups or ["all"]):
        for mode, (colour, marker, line) in styles.items():
            pts = []
            for row in rows:
                g = row["groups"].get(group) or {}
                if row["mode"] == mode and g.get("rel_throughput") and g.get("avg_accuracy") is not None:
                    pts.append((g["rel_throughput"], 100 * g["avg_accuracy"], row["run"]))
            if not pts:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], line, color=colour, marker=marker,
                    markersize=11 if marker == "*" else 7, label="Q-Zoom" if mode == "zoom" else mode)
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
        names = ", ".join(BENCHMARKS[n].pretty for n in (rows[0]["groups"].get(group, {}).get("benchmarks") or [])) \
            if rows else ""
        ax.set_title(f"{GROUP_TITLES.get(group, group)}\n{names}", fontsize=9)
        ax.set_xlabel(f"throughput relative to {summary['reference']}")
        ax.set_ylabel("average accuracy (%)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Accuracy vs. throughput", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(summary: dict[str, Any], out_dir: str | Path, title: str = "Q-Zoom evaluation") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "summary.md", "csv": out_dir / "summary.csv", "json": out_dir / "summary.json",
             "plot": out_dir / "pareto.png"}
    # each file whole or not at all: a reader (or a run stopped half-way) never sees a torn summary
    write_text_atomic(paths["markdown"], to_markdown(summary, title))
    write_text_atomic(paths["csv"], to_csv(summary))
    write_text_atomic(paths["json"], json.dumps(summary, indent=2) + "\n")
    with atomic_path(paths["plot"], suffix=".png") as tmp:
        pareto_plot(summary, tmp)
    return paths
