"""The demo's settings: every bench-specific knob in one dataclass (``DemoConfig``), and its presets.

The method's own defaults live in ``QZoomConfig``; what the toy bench needs differently is here, each
field with the evidence that chose it. ``qzoom demo --set KEY=VALUE`` overrides a field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qzoom_swift.config import parse_bool

NUMERICS_ENV: dict[str, dict[str, str]] = {
    "portable": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2",
                 "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {},
}
"""Environment each ``DemoConfig.numerics`` sets before torch is imported (torch reads these once, at start-up)."""

TRAINERS: dict[str, str] = {"swift": "swift sft", "llamafactory": "llamafactory-cli"}
"""``DemoConfig.trainer`` choices and the command each trains stages 1 and 3 with (stage titles, report)."""


@dataclass(frozen=True)
class DemoConfig:
    """Every bench-specific setting of the demo (the method's own defaults live in ``QZoomConfig``)."""

    seed: int = 0
    numerics: str = "portable"
    """CPU numerics of every torch computation of the demo (``NUMERICS_ENV``). ``portable``: 2 threads and AVX2
    kernels (ATen's dispatch, MKL's reproducible AVX2 branch, oneDNN's ISA cap), the same on every x86 machine of
    this project's kind whatever its CPU model; ``native``: the machine's defaults (all its cores, AVX-512 where
    present: faster, but the trained toy differs by CPU model and core count). Measured on a 20-step warm-up plus
    40 toy swift sft steps: two runs with the same threads and kernels give bit-identical weights; 1 thread
    instead of 2 changes them by 1.3e-6, AVX2 instead of AVX-512 kernels by 1.4e-5, and training amplifies such
    differences into another toy."""
    canvas: int = 448
    """Side of the bench's square scenes in pixels (``BenchSpec.for_canvas``); the hires preset's is 1120."""
    toy_preset: str = ""
    """The toy base to use: empty = trained on this bench with this preset's toy settings; a preset name (``full``)
    = that preset's toy base (its bench and training, shared through the cache), served with its processor's
    image cap raised to ``high_tokens``."""
    free_placement: bool = False
    """Harder bench: the digit box at any pixel offset, not on the token grid (the toy reads it far worse)."""
    distractors: int = 0
    """Harder bench: grey-outlined boxes with other digits."""
    train_images: int = 3000
    val_images: int = 300
    test_images: int = 400
    warmup_steps: int = 200
    """Vision-tower warm-up on native crops (stands in for a pretrained ViT)."""
    toy_steps: int = 1000
    toy_batch: int = 16
    curriculum: float = 0.15
    """Fraction of toy steps that are native crops and zoom layouts only, before the full mixture."""
    toy_freeze_vision: bool = False
    """Keep the warmed-up vision tower and merger fixed during the toy's swift sft. A linear probe finds the red
    box's low-resolution cell from the warm-up's visual tokens in 100% of val images, from the fully tuned toy's
    in 88.7% (``benchmarks/toy_mark_probe.py``). Frozen, the RPN's box held the digit on 100% of fine test
    questions (94% tuned), but the toy base missed its own targets (coarse 66% at 16 tokens, fine 94% at 256;
    Q-Zoom 74.8%): off by default."""
    low_tokens: int = 16
    """Q-Zoom's first pass and the low baseline: the 448 px canvas as 4x4 tokens (112 px a token)."""
    high_tokens: int = 256
    """The 16x baseline: the canvas at native scale (28 px a token); also the pseudo-label pass."""
    label_images: int = 1000
    """Train images whose two questions are pseudo-labelled (stage 1)."""
    label_new_tokens: int = 4
    """Colour answers are two BPE tokens; digits one."""
    label_heads: str = "0"
    """Layer 0, all heads: the toy's localising layer (the probe: 100% argmax on the target at 256 tokens; the
    method's automatic band, layers 1-2 of 4, gives flat maps here)."""
    label_queries: str = "answer+prompt"
    """One-word answers: the last prompt token is the query that reads the image (the answer token only
    predicts the end of the answer, and its attention is flat)."""
    label_tau_fg: float = 0.25
    """Foreground threshold of the stage-1 labels (``qzoom pseudo-labels --tau-fg``): the released scripts' 0.25, the
    library default; 0.2 is the paper's ablation optimum and the library default before issue 26."""
    label_sink: str = "none"
    """The L2-norm sink test flags the red target box itself in this toy (fine-question labels: 0.46 precision
    with it, 0.91 without, on 40 train questions); a model trained from scratch has no massive-activation sinks."""
    trainer: str = "swift"
    """What trains the branches in stages 1 and 3 (everything else is the same code): ``swift`` (``swift sft`` on
    ``recipes/toy/``) or ``llamafactory`` (``llamafactory-cli train`` on ``recipes/llamafactory/toy/``, in the
    LLaMA-Factory environment ``lf_bin``: ``qzoom lf-model`` folders, ``qzoom lf-dataset`` rows, ``qzoom lf-branches``
    back to the branch checkpoint the calibration and evaluation read), so the bench compares the two trainers."""
    lf_bin: str = ""
    """The ``bin/`` folder of the LLaMA-Factory environment (``llamafactory-cli``, ``qzoom``, ``python``) that
    ``trainer=llamafactory`` runs; empty: the checkout's ``.venv-lf/bin`` (``make venv-lf`` builds it)."""
    rpn_steps: int = 1200
    tau_roi: float = 0.2
    """Saved into the stage-1 checkpoint. On the val split's fine questions (heatmaps of the first full run):
    0.5 boxed the digit in 90.0% (1.15 cells a box), 0.2 in 93.3% (1.27), 0.1 in 96.0% (1.54 cells, more
    boxes beyond 2x2 cells, which are down-sampled below native scale)."""
    gate_images: int = 600
    """Further train images whose two questions are answered along the trajectory (stage 3)."""
    gate_budgets: str = "16,64,256"
    """The released rule puts a positive at one of the last two wrong budgets: with 16 and 64 wrong for fine
    questions, the gate learns at the budget it runs at (with 16,64,144,256 it never saw a positive at 16 and
    fine questions there got low probabilities: calibrated tau_gate 1.4e-4, 42% skipped)."""
    gate_stable_top: int = 1
    """The toy reads digits only at native scale (256 tokens): one top budget is the stable reference."""
    gate_steps: int = 200
    max_accuracy_drop: float = 0.01
    """Calibration: the decisions that skip most within this accuracy of the best on held-out trajectories."""
    threshold_rule: str = "plateau-middle"
    """Calibration (``labels.gate.THRESHOLD_RULES``): edge put tau_gate on a fine val question's probability (0.846
    in the last full run, fine questions at 0.842-0.88, coarse below 5e-4), spending the 1% allowed drop on skipping
    3 fine questions; plateau-middle: 0.048 on the same curve (plateau 4.6e-4 < tau <= 0.846), val 100% / 0.50."""
    roi_fallback: str = "peak"
    """``QZoomConfig.roi_fallback`` of the Q-Zoom runs (gated and always): none (released) or peak. Chosen on val
    on the full preset's trained pipeline: peak 98.3% vs none 95.7% (with plateau-middle); the library default
    stays none (the released behaviour) until a real model says otherwise."""
    roi_max_tokens: int = 256
    """``QZoomConfig.roi_max_tokens`` of the Q-Zoom runs: a box of up to 4x4 low-resolution cells is re-encoded at
    native scale (the toy reads digits only there). With 64 (2x2 cells, the recipes' value) every wrong answer in
    a box that held the digit was a box of 2x3 cells or more, down-sampled (8 of 200 fine test questions in the
    run before this setting). Chosen on val: 98.3% at 64, 99.0% at 144 and at 256 (mean visual tokens 25.1 vs
    25.6); 256 is the 16x baseline's budget, so a box never costs more than that baseline."""
    eval_split: str = "test"
    """Split the evaluation answers: test (reporting) or val (choosing settings such as roi_fallback)."""
    variants: str = "free_placement,distractors=2"
    """Harder test sets the trained pipeline is also evaluated on, without retraining: comma-separated, each a
    ``+``-joined list of bench settings, e.g. ``free_placement,distractors=2``. Empty: none."""
    eval_new_tokens: int = 4
    vllm_bin: str = ""
    """The ``bin/`` folder of a vLLM environment (``qzoom_swift[vllm]``; in a checkout ``.venv-vllm/bin``). Set, the
    evaluated split is answered again on vLLM after the evaluation (``bench/vllm_rows.py``, a subprocess in that
    environment): Q-Zoom through ``QZoomVLLM`` and plain vLLM at the low and high budgets, each beside its
    transformers row with the accuracy difference (flagged above 1 point). Empty (default): no vLLM rows."""
    vllm_batch: int = 1
    """Questions per vLLM ``generate`` call in those rows: 1 answers as the transformers rows do (one question at a
    time); larger batches let vLLM batch the requests (and the router route them together)."""
    overlays: int = 6
    """Test questions drawn in overlays.png."""

    @property
    def budgets(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.gate_budgets.split(","))

    def variant_specs(self) -> dict[str, dict[str, Any]]:
        """``variants`` parsed: name -> BenchSpec fields (free_placement, distractors) overriding this bench's."""
        out: dict[str, dict[str, Any]] = {}
        for name in (v.strip() for v in self.variants.split(",")):
            if not name:
                continue
            fields: dict[str, Any] = {}
            for item in name.split("+"):
                key, sep, raw = item.strip().partition("=")
                if key == "free_placement":
                    fields[key] = parse_bool(key, raw) if sep else True
                elif key == "distractors" and sep and raw.strip().isdigit():
                    fields[key] = int(raw)
                else:
                    raise ValueError(f"variants: {item!r}: expected free_placement[=BOOL] or distractors=N")
            out[name] = fields
        return out

    def __post_init__(self) -> None:
        from qzoom_swift.config import ROI_FALLBACKS
        from qzoom_swift.labels.gate import THRESHOLD_RULES

        for key, allowed in (("numerics", tuple(NUMERICS_ENV)), ("threshold_rule", THRESHOLD_RULES),
                             ("roi_fallback", ROI_FALLBACKS),
                             ("eval_split", ("test", "val")), ("toy_preset", ("", "full", "quick")),
                             ("trainer", TRAINERS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: choose from {', '.join(map(repr, allowed))}")
        if self.vllm_batch < 1:
            raise ValueError(f"vllm_batch={self.vllm_batch}: use 1 or more")
        if self.canvas % 112 or self.canvas < 112:
            raise ValueError(f"canvas={self.canvas}: use a multiple of 112 px (4 merged tokens of 28 px)")
        self.variant_specs()


PRESETS: dict[str, DemoConfig] = {
    "full": DemoConfig(),
    "quick": DemoConfig(train_images=40, val_images=12, test_images=16, warmup_steps=20, toy_steps=40,
                        toy_batch=4, label_images=10, rpn_steps=6, gate_images=10, gate_steps=4, overlays=2,
                        variants=""),
    # The paper's regime: visual tokens dominate the cost. The same scenes at 2.5 times the side (1120 px: 1,600
    # tokens at native scale, 100 at 112 px a token, the default's 16-token view 6.25 times over). The full preset's
    # toy base (448 px scenes) reads them: 100% at 1,600 tokens, fine 7% / coarse 100% at 100 (60 test scenes).
    # At 896 px (64 vs 1,024 tokens) the ceiling, the low baseline alone, was only 4.60x the 16x baseline end to
    # end and Q-Zoom reached 3.68x (80% of it); at 1120 px the ceiling measured 9.1x. Fewer labelled and evaluated
    # images than the full preset: every high-budget pass costs about 6x more.
    "hires": DemoConfig(canvas=1120, toy_preset="full", low_tokens=100, high_tokens=1600,
                        gate_budgets="100,400,1600", roi_max_tokens=1600, train_images=650, val_images=120,
                        test_images=200, label_images=400, rpn_steps=800, gate_images=250, variants=""),
}

def demo_config(preset: str, overrides: list[str]) -> DemoConfig:
    """The preset with ``KEY=VALUE`` overrides, each parsed as the field's type; unknown keys are an error."""
    cfg = PRESETS[preset]
    types = {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"qzoom demo: --set {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        try:
            values[key] = parse_bool(key, raw) if types[key] is bool else types[key](raw)
        except ValueError as exc:
            raise SystemExit(f"qzoom demo: --set {item!r}: {exc}") from exc
    try:
        return dataclasses.replace(cfg, **values)
    except ValueError as exc:
        raise SystemExit(f"qzoom demo: --set: {exc}") from exc
