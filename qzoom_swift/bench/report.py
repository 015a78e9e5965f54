"""The demo's report: the acceptance targets and ``report.md`` rendered from ``summary.json``."""

from __future__ import annotations

from typing import Any

from qzoom_swift.bench.settings import DemoConfig


def acceptance(metrics: dict[str, Any], cfg: DemoConfig) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    r = metrics["runs"]
    low, high = r[f"baseline@{cfg.low_tokens}"], r[f"baseline@{cfg.high_tokens}"]
    q, always = r["qzoom"], r["always"]
    box = always.get("box") or {}
    checks = [
        ("toy base: fine accuracy at 16x budget >= 90%", high["accuracy_fine"], high["accuracy_fine"] >= 0.90),
        ("toy base: fine accuracy at the low budget <= 20%", low["accuracy_fine"], low["accuracy_fine"] <= 0.20),
        ("toy base: coarse accuracy at the low budget >= 95%", low["accuracy_coarse"], low["accuracy_coarse"] >= 0.95),
        ("SD-RPN: box contains the GT target on >= 80% of fine questions", box.get("contains_target"),
         (box.get("contains_target") or 0) >= 0.80),
        ("gate: zoom rate >= 85% on fine questions", q["zoom_rate_fine"], (q["zoom_rate_fine"] or 0) >= 0.85),
        ("gate: zoom rate <= 15% on coarse questions", q["zoom_rate_coarse"], (q["zoom_rate_coarse"] or 0) <= 0.15),
        ("Q-Zoom: overall accuracy within 3 points of the 16x baseline", q["accuracy"] - high["accuracy"],
         q["accuracy"] >= high["accuracy"] - 0.03),
        ("Q-Zoom: >= 4x the 16x baseline's throughput", q["relative_throughput"], q["relative_throughput"] >= 4.0),
    ]
    return [{"target": t, "measured": v, "met": bool(ok)} for t, v, ok in checks]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


RUN_LABELS = {"qzoom": "Q-Zoom (gated)", "always": "Q-Zoom, always zoom"}


def render_report(summary: dict[str, Any]) -> str:
    m = summary["metrics"]
    cfg = summary["config"]
    runs = m["runs"]
    low = f"baseline@{summary['demo_config']['low_tokens']}"
    lines = [f"# Q-Zoom demo: the zoom bench ({summary['preset']} preset)", "",
             f"Command: `{summary['command']}` - total {summary['total_s']:.1f} s this run (stages run now: "
             f"{summary['stages_ran']}, cached: {summary['stages_cached']}), CPU threads {m['threads']}, torch "
             f"{summary['versions']['torch']}, transformers {summary['versions']['transformers']}, ms-swift "
             f"{summary['versions']['ms-swift']}.", ""]
    if summary["preset"] != "full":
        lines += ["> Reduced preset: every stage ran on a handful of samples and a few steps; the numbers below are "
                  "not meaningful. `qzoom demo` without arguments runs the measured configuration.", ""]
    lines += ["## Results on the test split", "",
              f"{runs[low]['samples']} questions ({summary['bench']['questions']['test']['fine']} fine: the digit in "
              f"the red box; {summary['bench']['questions']['test']['coarse']} coarse: the colour of the large "
              f"shape), one at a time (batch 1), runs interleaved per question. Throughput is relative to "
              f"{m['reference']}. `never` (Q-Zoom without zoom) is {low}: the same computation.", "",
              "| run | visual tokens (mean) | accuracy all | fine | coarse | throughput vs 16x | ms / question "
              "| zoom rate fine / coarse |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in runs.items():
        label = RUN_LABELS.get(name, f"base model at {r['tokens']} tokens" + (" (= never)" if name == low else ""))
        zr = "-" if r["mode"] == "never" else f"{_pct(r['zoom_rate_fine'])} / {_pct(r['zoom_rate_coarse'])}"
        lines.append(f"| {label} | {r['mean_visual_tokens']:.1f} | {_pct(r['accuracy'])} | {_pct(r['accuracy_fine'])} "
                     f"| {_pct(r['accuracy_coarse'])} | {r['relative_throughput']:.2f}x | {r['mean_latency_ms']:.1f} "
                     f"| {zr} |")
    q, always = runs["qzoom"], runs["always"]
    box = always.get("box") or {}
    pl = m["pseudo_labels"]
    lines += ["", "## Localisation and routing", "",
              "| measure | value |", "|---|---|",
              f"| stage-1 pseudo labels, fine questions: fg cells touching the GT box (precision) | "
              f"{_pct((pl.get('fine') or {}).get('fg_precision'))} |",
              f"| stage-1 pseudo labels, fine questions: some fg cell on the GT box (hit rate) | "
              f"{_pct((pl.get('fine') or {}).get('hit_rate'))} |",
              f"| stage-1 pseudo labels ignored (fine / coarse) | {_pct((pl.get('fine') or {}).get('ignored_rate'))} / "
              f"{_pct((pl.get('coarse') or {}).get('ignored_rate'))} |",
              f"| RPN box contains the GT digit box (fine, mode always) | {_pct(box.get('contains_target'))} |",
              f"| RPN box IoU with the GT digit box, median (a one-cell box scores about 0.03) | "
              f"{_num(box.get('median_iou'))} |",
              f"| RPN box IoU with the GT digit's low-res cell, median (1 = exactly that cell) | "
              f"{_num(box.get('median_cell_iou'))} |",
              f"| gate AUC, fine (zoom) vs coarse (no zoom) | {_num(q.get('gate_auc_fine_vs_coarse'))} |",
              f"| zoom rate of Q-Zoom: fine / coarse / all | {_pct(q['zoom_rate_fine'])} / {_pct(q['zoom_rate_coarse'])} "
              f"/ {_pct(q['zoom_rate'])} |",
              f"| tau_gate (calibrated) / tau_roi | {_num(cfg['tau_gate'])} / {_num(cfg['tau_roi'])} |",
              "", "## Acceptance", "", f"Targets of issue #10, measured by this run ({summary['preset']} preset).", "",
              "| target | measured | met |", "|---|---:|---|"]
    for a in summary["acceptance"]:
        v = a["measured"]
        text = "-" if v is None else (f"{v:.2f}x" if "throughput" in a["target"] else
                                      f"{100 * v:+.1f} points" if "within" in a["target"] else _pct(v))
        lines.append(f"| {a['target']} | {text} | {'yes' if a['met'] else 'NO'} |")
    lines += ["", "## The same test split through evalscope", "",
              f"`qzoom eval --model {summary['model_dir']} --checkpoint {summary['checkpoint']} --data-root "
              f"{summary['evalscope_data_root']} --benchmarks qzoom_bench --run baseline:{summary['demo_config']['high_tokens']} "
              f"--run zoom:{summary['demo_config']['low_tokens']}:low_min_tokens={summary['demo_config']['low_tokens']}"
              f":roi_min_tokens={cfg['roi_min_tokens']}:roi_max_tokens={cfg['roi_max_tokens']} --out runs/eval-bench`",
              "", "## Figures", "", "- `pareto.png`: accuracy vs relative throughput of every run",
              "- `overlays.png`: test images with the GT box (green), the RPN box (red) and the low-res heatmap",
              "- `gate_calibration.png`: estimated accuracy and no-RoI ratio over tau_gate (held-out trajectories)",
              "", "## Stages", "",
              "| # | stage | status | time (s) | output |", "|---|---|---|---:|---|"]
    for i, st in enumerate(summary["stages"].values(), 1):
        lines.append(f"| {i} | {st['title']} | {st['this_run']} | {st['seconds']:.1f} | {st['line'].replace('|', '/')} |")
    lines += ["", "Q-Zoom settings used: " + ", ".join(f"{k}={cfg[k]}" for k in (
        "branch_layer", "branch_depth", "low_min_tokens", "low_max_tokens", "roi_min_tokens", "roi_max_tokens",
        "tau_roi", "blur_kernel", "tau_gate")) + ".", ""]
    return "\n".join(lines)
