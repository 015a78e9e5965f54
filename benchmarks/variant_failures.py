#!/usr/bin/env python
"""Why does Q-Zoom lose accuracy on the distractor variant of the zoom bench: the box, or the read?

The bench's ground truth (``gt.jsonl``) stores the red target box, not the grey distractor boxes. This script
renders the variant's test scenes again from the same seed (rendering is deterministic per seed; ``Scene``
carries the distractors), then sorts the gated Q-Zoom run's fine answers (``<demo>/variants/<variant>/answers.jsonl``)
into: the red box outside the crop; or inside it, by the number of distractor boxes also inside and whether
a wrong answer named a distractor's digit. A measurement, not a test: nothing is asserted.

    python benchmarks/variant_failures.py --demo runs/demo --variant distractors-2
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `qzoom demo --out` folder")
    p.add_argument("--variant", default="distractors-2", help="folder under <demo>/variants/")
    p.add_argument("--run", default="qzoom", help="run name in the variant's answers.jsonl")
    args = p.parse_args(argv)

    from qzoom_swift.bench.dataset import split_seed
    from qzoom_swift.bench.evaluate import box_contains
    from qzoom_swift.bench.render import BenchSpec, render_scene

    folder = args.demo / "variants" / args.variant
    meta = json.loads((folder / "bench" / "bench.json").read_text())
    spec = BenchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
    rng = random.Random(split_seed(meta["seed"], "test"))  # as bench.dataset.write_split draws the split
    scenes = [render_scene(rng, spec)[1] for _ in range(meta["sizes"]["test"])]

    counts: Counter = Counter()
    for line in (folder / "answers.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["run"] != args.run or row["kind"] != "fine" or not row.get("box"):
            continue
        scene = scenes[int(row["id"].split("-")[1])]
        crop = [v * spec.canvas for v in row["box"]]
        if not box_contains(crop, scene.target_box):
            counts[("red box outside the crop", "right" if row["correct"] else "wrong")] += 1
            continue
        inside = [(box, digit) for box, digit in scene.distractors if box_contains(crop, box)]
        named = not row["correct"] and any(row["answer"].strip() == str(digit) for _, digit in inside)
        counts[("red box in the crop", f"{len(inside)} distractor(s) in the crop",
                "right" if row["correct"] else ("wrong, named a distractor's digit" if named else "wrong"))] += 1
    print(command_line(__file__, argv))
    print(f"{folder}: run {args.run}, fine questions with a box: {sum(counts.values())}")
    for key, n in sorted(counts.items()):
        print(f"{n:5d}  {' / '.join(key)}")


if __name__ == "__main__":
    main()
