"""The demo's settings: every bench-specific knob in one dataclass (``DemoConfig``), and its presets.

The method's own defaults live in ``QZoomConfig``; what the toy bench needs differently is here, each
field with the evidence that chose it. ``qzoom demo --set KEY=VALUE`` overrides a field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qzoom_swift.config import parse_bool


@dataclass(frozen=True)
class DemoConfig:
    """Every bench-specific setting of the demo (the method's own defaults live in ``QZoomConfig``)."""

    seed: int = 0
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
    low_tokens: int = 16
    """Q-Zoom's first pass and the low baseline: the 448 px canvas as 4x4 tokens."""
    high_tokens: int = 256
    """The 16x baseline: the canvas at native scale; also the pseudo-label pass."""
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
    label_sink: str = "none"
    """The L2-norm sink test flags the red target box itself in this toy (fine-question labels: 0.46 precision
    with it, 0.91 without, on 40 train questions); a model trained from scratch has no massive-activation sinks."""
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
    """Calibration: the highest tau_gate within this accuracy of the best on held-out trajectories."""
    eval_new_tokens: int = 4
    overlays: int = 6
    """Test questions drawn in overlays.png."""

    @property
    def budgets(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.gate_budgets.split(","))


PRESETS: dict[str, DemoConfig] = {
    "full": DemoConfig(),
    "quick": DemoConfig(train_images=40, val_images=12, test_images=16, warmup_steps=20, toy_steps=40,
                        toy_batch=4, label_images=10, rpn_steps=6, gate_images=10, gate_steps=4, overlays=2),
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
    return dataclasses.replace(cfg, **values)
