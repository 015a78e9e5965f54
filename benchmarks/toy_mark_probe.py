#!/usr/bin/env python
"""How well do a toy VLM's low-resolution visual tokens say where the red box is? A linear-probe ceiling.

The region head (SD-RPN) of ``qzoom demo`` can only find the digit's cell if the low-resolution features
encode it. This script takes one or more toy model directories (e.g. ``$QZOOM_CACHE/toy/<key>/init``, the
vision warm-up's output, and ``.../sft/checkpoint-1000``, the trained toy base), encodes bench images at the
low budget with the vision tower (the merged visual tokens the LLM reads), and fits a linear score per token
(softmax over the image's tokens, cross-entropy on the cell that holds the red box's centre) on ``--train``
images of the train split; it prints the accuracy on the val split for each model. A measurement, not a
test: nothing is asserted.

    python benchmarks/toy_mark_probe.py --bench runs/demo/bench --models $QZOOM_CACHE/toy/<key>/init \\
        $QZOOM_CACHE/toy/<key>/sft/checkpoint-1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)
from _bench_env import command_line, setup_torch


def features(model_dir: Path, records, low_tokens: int, threads: int):
    """Merged visual tokens of each record's image at ``low_tokens`` (N, tokens, width) and the target cells."""
    import torch
    from PIL import Image

    from qzoom_swift.bench.render import token_cell
    from qzoom_swift.model import QZoomModel

    setup_torch(threads)
    qz = QZoomModel.from_pretrained(str(model_dir), device="cpu", dtype="float32")
    visual = qz.adapter.inner_model(qz.model).visual
    grid = int(round(low_tokens ** 0.5))
    feats, cells = [], []
    for rec in records:
        with Image.open(rec.image) as im:
            low = qz.adapter.resize_for_budget(im.convert("RGB"), low_tokens, low_tokens)  # as the first pass
        enc = qz.adapter.encode_images(qz.processor, [low])
        with torch.inference_mode():
            out = visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        feats.append(getattr(out, "pooler_output", out).view(low_tokens, -1))
        col, row = token_cell(tuple(rec.target_box), rec.canvas, grid)
        cells.append(row * grid + col)
    return torch.stack(feats), torch.tensor(cells)


def probe(train_x, train_y, val_x, val_y, epochs: int, seed: int) -> tuple[float, float]:
    """Train and val accuracy of a linear per-token score (full-batch AdamW, standardised features)."""
    import torch

    torch.manual_seed(seed)
    mean, std = train_x.mean(dim=(0, 1)), train_x.std(dim=(0, 1)) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    head = torch.nn.Linear(tx.shape[-1], 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(head(tx).squeeze(-1), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = float((head(tx).squeeze(-1).argmax(-1) == train_y).float().mean())
        val_acc = float((head(vx).squeeze(-1).argmax(-1) == val_y).float().mean())
    return train_acc, val_acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bench", type=Path, default=Path("runs/demo/bench"), help="a `qzoom demo` bench folder")
    p.add_argument("--models", type=Path, nargs="+", required=True, help="toy model directories to probe")
    p.add_argument("--low-tokens", type=int, default=16, help="the low budget (a square grid)")
    p.add_argument("--train", type=int, default=1000, help="train-split images the probe is fitted on")
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from qzoom_swift.bench.dataset import read_split

    train = [r for r in read_split(args.bench, "train") if r.kind == "fine"][: args.train]  # one record an image
    val = [r for r in read_split(args.bench, "val")]
    print(command_line(__file__, argv))
    print(f"bench {args.bench}: probe fitted on {len(train)} train images, scored on {len(val)} val images, "
          f"{args.low_tokens} tokens (chance {1 / args.low_tokens:.3f})")
    for model_dir in args.models:
        tx, ty = features(model_dir, train, args.low_tokens, args.threads)
        vx, vy = features(model_dir, val, args.low_tokens, args.threads)
        train_acc, val_acc = probe(tx, ty, vx, vy, args.epochs, seed=0)
        print(f"{model_dir}: train {train_acc:.3f}, val {val_acc:.3f}")


if __name__ == "__main__":
    main()
