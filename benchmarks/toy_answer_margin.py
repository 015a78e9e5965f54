#!/usr/bin/env python
"""Does the zoom bench's toy VLM answer on a margin, although its output distribution is almost flat?

The toy's training loss stays near 9 nats while its token accuracy is high: its embedding, tied to the LM
head, is frozen at random init (``recipes/toy/base_sft.yaml``), so the probability mass spreads over the
151,936 token ids. Everything ``qzoom demo`` measures reads greedy answers (accuracy, gate labels along the
resolution trajectory) or the gate's own probability (calibration), never the answer's probability; what
would matter is a greedy choice that stands on a hair. This script loads a finished demo's toy base and, on
the first ``--questions`` questions of a split at the 16x budget, prints per question kind: the top token's
probability (against uniform), the logit gap between the top two tokens, and the entropy (against ln V).
A measurement, not a test: nothing is asserted.

    python benchmarks/toy_answer_margin.py --demo runs/demo --questions 60
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line, setup_torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `qzoom demo --out` folder")
    p.add_argument("--questions", type=int, default=60, help="first N questions of the split")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    setup_torch(args.threads)

    import torch
    from PIL import Image

    from qzoom_swift.bench.dataset import read_split
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.model import QZoomModel

    def outputs(stage: str) -> dict:
        return json.loads((args.demo / "stages" / f"{stage}.json").read_text())["outputs"]

    demo_config = json.loads((args.demo / "summary.json").read_text())["demo_config"]
    tokens = demo_config["high_tokens"]
    qz = QZoomModel.from_pretrained(outputs("toy_base")["model_dir"], device="cpu")
    vocab = qz.model.get_input_embeddings().weight.shape[0]
    stats: dict[str, list[tuple[float, float, float]]] = {"fine": [], "coarse": []}
    for rec in read_split(outputs("bench")["root"], args.split)[: args.questions]:
        with Image.open(rec.image) as im:
            image = qz.adapter.resize_for_budget(im.convert("RGB"), tokens, tokens)
        with torch.inference_mode():
            logits = qz.model(**chat_inputs(qz.processor, [[image]], [rec.question])).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        top = torch.topk(logits, 2).values
        stats[rec.kind].append((float(logp.max().exp()), float(top[0] - top[1]), float(-(logp.exp() * logp).sum())))
    print(command_line(__file__, argv))
    print(f"toy base {outputs('toy_base')['model_dir']}, {args.split} split, {tokens} visual tokens, vocab {vocab}")
    for kind, rows in stats.items():
        if not rows:
            continue
        probs, gaps, entropies = zip(*rows)
        print(f"{kind:<6} n {len(rows)}: p(top) median {statistics.median(probs):.2e} (uniform {1 / vocab:.1e}); "
              f"logit gap top1-top2 min {min(gaps):.3f}, median {statistics.median(gaps):.3f}; entropy mean "
              f"{statistics.fmean(entropies):.3f} nats (ln V {math.log(vocab):.3f})")


if __name__ == "__main__":
    main()
