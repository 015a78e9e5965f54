"""The zoom bench's toy base VLM: a 2 M-parameter Qwen2.5-VL built here, warmed up, then tuned with swift sft.

Real Q-Zoom starts from a pretrained VLM. Here no weights can be downloaded, so the base is trained from
scratch on the bench, in two steps:

1. ``build_toy_base``: a small Qwen2.5-VL (the probe's shape: 4 decoder layers of width 128, a 4-block
   vision tower) with the project's local tokenizer, whose vision tower first learns to read digits on
   native-scale crops (a plain PyTorch loop with a throw-away linear head). That warm-up stands in for a
   pretrained ViT: reading 10 px glyphs through an untrained LM never bootstraps in CPU minutes
   (``shared/reference/toy-bench-probe.md``, runs 1-3).
2. ``toy_sft_rows`` + ``recipes/toy/base_sft.yaml``: ``swift sft`` full tuning on the bench at mixed
   resolutions: native crops, whole images at 16-256 tokens, and the zoomed layout (low-resolution image
   plus a crop re-encoded at native scale, rebuilt by the ``qzoom_roi`` template exactly as zoom
   inference builds it).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from qzoom_swift.bench.render import (
    DEFAULT_SPEC,
    BenchSpec,
    aligned_crop_around,
    question_for,
    render_scene,
    token_cell,
)
from qzoom_swift.fileio import write_json_atomic, write_jsonl_atomic
from qzoom_swift.recipes_command import RECIPES_DIR

PATCH_UNIT = 28  # Qwen2.5-VL: patch 14 x merge 2
TOY_VERSION = 3
GROUND_QUESTION = "Where is the red box?"
"""Toy training only: answered with the index of the low-resolution token that holds the box (row-major)."""

TOY_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
TOY_VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3])


def toy_config():
    from transformers import Qwen2_5_VLConfig

    from qzoom_swift.synthetic.tokenizer import QWEN_VOCAB_SIZE

    return Qwen2_5_VLConfig(text_config=dict(TOY_TEXT, vocab_size=QWEN_VOCAB_SIZE), vision_config=dict(TOY_VISION),
                            tie_word_embeddings=True)


def _processor(tokenizer, min_tokens: int = 4, max_tokens: int = 256):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from qzoom_swift.synthetic.tokenizer import QWEN2_VL_CHAT_TEMPLATE

    unit = PATCH_UNIT ** 2
    image_processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": min_tokens * unit,
                                                  "longest_edge": max_tokens * unit})
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _native_crop(rng: random.Random, spec: BenchSpec, sides: tuple[int, ...]):
    img, scene = render_scene(rng, spec)
    box = aligned_crop_around(scene.target_box, rng.choice(sides), spec.canvas, rng, PATCH_UNIT)
    return img.crop(box), scene.digit


def _low_res_scene(rng: random.Random, spec: BenchSpec, side: int):
    img, scene = render_scene(rng, spec)
    cells = side // PATCH_UNIT
    cx, cy = token_cell(scene.target_box, spec.canvas, cells)
    return img.resize((side, side), resample=3), cy * cells + cx  # bicubic, as resize_for_budget


def vision_warmup(model, processor, spec: BenchSpec, *, steps: int = 300, batch: int = 32, lr: float = 5e-4,
                  seed: int = 0, sides: tuple[int, ...] = (56, 84), low_tokens: int = 16,
                  progress: bool = True) -> dict[str, Any]:
    """Stand-in for a pretrained ViT: two throw-away linear heads on the vision tower's merged tokens.

    - reading: the digit of a native-scale crop (mean-pooled tokens -> 10 classes);
    - marking: which token of the whole image at ``low_tokens`` holds the red box (a score per token,
      softmax over the image's tokens). Without it the low-resolution features barely encode the 2-3 px
      red mark (a linear probe found its cell in 41% of images), and no region head can be learned on them.

    Returns the learning curves (EMA accuracies every 25 steps) and the final EMA accuracies.
    """
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    visual = model.model.visual
    width = int(model.config.vision_config.out_hidden_size)
    read_head, mark_head = torch.nn.Linear(width, 10), torch.nn.Linear(width, 1)
    params = list(visual.parameters()) + list(read_head.parameters()) + list(mark_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    visual.train()
    low_side = PATCH_UNIT * int(round(low_tokens ** 0.5))
    ema, ema_mark, curve = 0.1, 1.0 / low_tokens, []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="vision warm-up", disable=not progress, unit="step")
    for step in bar:
        side = rng.choice(sides)  # one side per batch: no padding, equal token counts
        crops, digits = zip(*[_native_crop(rng, spec, (side,)) for _ in range(batch)])
        lows, cells = zip(*[_low_res_scene(rng, spec, low_side) for _ in range(batch)])
        enc = processor.image_processor(images=list(crops) + list(lows), return_tensors="pt", do_resize=False)
        feats = visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        feats = getattr(feats, "pooler_output", feats)
        n_crop = (side // PATCH_UNIT) ** 2
        read_logits = read_head(feats[: batch * n_crop].view(batch, n_crop, -1).mean(dim=1))
        mark_logits = mark_head(feats[batch * n_crop:].view(batch, low_tokens, -1)).squeeze(-1)
        target, target_cell = torch.tensor(digits), torch.tensor(cells)
        loss = torch.nn.functional.cross_entropy(read_logits, target) + \
            torch.nn.functional.cross_entropy(mark_logits, target_cell)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = 0.9 * ema + 0.1 * float((read_logits.argmax(-1) == target).float().mean())
        ema_mark = 0.9 * ema_mark + 0.1 * float((mark_logits.argmax(-1) == target_cell).float().mean())
        if (step + 1) % 25 == 0:
            curve.append([step + 1, round(ema, 3), round(ema_mark, 3)])
            bar.set_postfix(read=f"{ema:.2f}", mark=f"{ema_mark:.2f}", loss=f"{float(loss):.2f}")
    visual.eval()
    return {"steps": steps, "batch": batch, "lr": lr, "sides": list(sides), "ema_accuracy": round(ema, 3),
            "ema_mark_accuracy": round(ema_mark, 3), "curve": curve, "seconds": round(time.perf_counter() - t0, 1)}


def build_toy_base(out_dir: str | Path, spec: BenchSpec = DEFAULT_SPEC, *, seed: int = 0, warmup_steps: int = 300,
                   low_tokens: int = 16, progress: bool = True) -> dict[str, Any]:
    """Write the warmed-up toy model directory (config, weights, tokenizer, processor) atomically.

    Returns the warm-up record (also saved as ``toy_warmup.json`` in the directory).
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from qzoom_swift.synthetic.tokenizer import build_qwen_tokenizer

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer(None)  # Qwen2.5-VL chat template
    processor = _processor(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(toy_config(), dtype=torch.float32)
    record = vision_warmup(model, processor, spec, steps=warmup_steps, seed=seed, low_tokens=low_tokens,
                           progress=progress)
    record["params"] = sum(p.numel() for p in model.parameters())
    record["params_without_embedding"] = record["params"] - model.get_input_embeddings().weight.numel()
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / "toy_warmup.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------------------- swift sft rows


def budget_kwargs(tokens: int) -> dict[str, int]:
    """chat_template_kwargs that make ms-swift encode a row's image at exactly ``tokens`` visual tokens."""
    pixels = tokens * PATCH_UNIT * PATCH_UNIT
    return {"min_pixels": pixels, "max_pixels": pixels}


def _row(image: str, question: str, answer: str, tokens: int, **extra) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"<image>{question}"},
                         {"role": "assistant", "content": answer}],
            "images": [image], "chat_template_kwargs": budget_kwargs(tokens), **extra}


def roi_cells_around(target_box, cells: tuple[int, int], grid: int, canvas: int, rng: random.Random):
    """A ``cells`` (w, h) block of the ``grid x grid`` low-resolution token grid containing the target's
    centre: (grid box, normalised pixel box), as ``qzoom mine-hard`` stores a RoI."""
    cx, cy = token_cell(target_box, canvas, grid)
    w, h = cells
    x0 = min(max(cx - rng.randrange(w), 0), grid - w)
    y0 = min(max(cy - rng.randrange(h), 0), grid - h)
    return (x0, y0, x0 + w, y0 + h), [x0 / grid, y0 / grid, (x0 + w) / grid, (y0 + h) / grid]


def toy_sft_rows(records, crops_dir: str | Path, *, steps: int, batch: int, seed: int = 0, low_tokens: int = 16,
                 high_tokens: int = 256, curriculum: float = 0.25) -> list[dict[str, Any]]:
    """``steps * batch`` training rows in batch-sized blocks of one layout each (no padding waste).

    Layouts: ``crop`` (a native-scale crop around the digit, 2x2 to 6x6 tokens, fine question), ``full``
    (the whole image at one of 16..256 tokens, either question), ``zoom`` (the image at ``low_tokens``
    plus a ``qzoom_roi`` crop of 1-4 low-resolution cells containing the digit for fine questions, or
    anywhere for coarse ones), ``coarse`` (the image at ``low_tokens``, coarse question: cheap steps that
    teach the colours, which otherwise lag the digits) and ``ground`` (the image at ``low_tokens``, "where is
    the red box?" answered with the token index: the grounding a pretrained VLM brings, which the region
    head reads). The first ``curriculum`` of the blocks are crops, zoom, coarse and ground layouts only.
    Rows stay in this order: train with ``dataset_shuffle``/``train_dataloader_shuffle`` off.
    """
    from PIL import Image

    rng = random.Random(seed)
    crops_dir = Path(crops_dir)
    crops_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[str, dict[str, Any]] = {}
    for r in records:
        by_image.setdefault(r.image, {"target_box": r.target_box, "canvas": r.canvas})[r.kind] = r.answer
    images = sorted(by_image)
    canvas = by_image[images[0]]["canvas"]
    grid = int(round(low_tokens ** 0.5))
    sides = [s for s in range(PATCH_UNIT * 4, canvas + 1, PATCH_UNIT * 2)]  # 112, 168, ..., canvas
    full_weights = [3 if s in (sides[0], sides[-1]) else 1 for s in sides]
    rows: list[dict[str, Any]] = []
    n_crops = 0
    curriculum_blocks = int(curriculum * steps)
    for block in range(steps):
        if block < curriculum_blocks:
            layout = rng.choice(("crop", "crop", "zoom", "coarse", "ground"))
        else:
            layout = rng.choices(("crop", "full", "zoom", "coarse", "ground"), weights=(25, 30, 25, 10, 10))[0]
        if layout == "crop":
            side = rng.choice((56, 84, 112, 168))
        elif layout == "full":
            side = rng.choices(sides, weights=full_weights)[0]
        else:
            cells = rng.choices(((1, 1), (2, 1), (1, 2), (2, 2)), weights=(60, 12, 13, 15))[0]
        for _ in range(batch):
            image = rng.choice(images)
            info = by_image[image]
            if layout == "crop":
                box = aligned_crop_around(info["target_box"], side, canvas, rng, PATCH_UNIT)
                path = crops_dir / f"{n_crops:06d}.png"
                with Image.open(image) as im:
                    im.crop(box).save(path)
                n_crops += 1
                rows.append(_row(str(path.resolve()), question_for("fine"), info["fine"], (side // PATCH_UNIT) ** 2))
            elif layout == "coarse":
                rows.append(_row(image, question_for("coarse"), info["coarse"], low_tokens))
            elif layout == "ground":
                (x0, y0, _, _), _ = roi_cells_around(info["target_box"], (1, 1), grid, canvas, rng)
                rows.append(_row(image, GROUND_QUESTION, str(y0 * grid + x0), low_tokens))
            elif layout == "full":
                kind = rng.choice(("fine", "coarse"))
                tokens = min(high_tokens, (side // PATCH_UNIT) ** 2)
                rows.append(_row(image, question_for(kind), info[kind], tokens))
            else:
                kind = "fine" if rng.random() < 0.8 else "coarse"
                if kind == "fine":
                    grid_box, norm = roi_cells_around(info["target_box"], cells, grid, canvas, rng)
                else:
                    w, h = cells
                    x0, y0 = rng.randrange(grid - w + 1), rng.randrange(grid - h + 1)
                    grid_box = (x0, y0, x0 + w, y0 + h)
                    norm = [x0 / grid, y0 / grid, (x0 + w) / grid, (y0 + h) / grid]
                rows.append(_row(image, question_for(kind), info[kind], low_tokens,
                                 qzoom_roi={"box": norm, "grid_box": list(grid_box), "grid": [grid, grid]}))
    return rows


# ------------------------------------------------------------------------------------------ cached toy base

TOY_RECIPE = RECIPES_DIR / "toy" / "base_sft.yaml"  # shipped in the package


def toy_base_key(bench_meta: dict[str, Any], *, seed: int, warmup_steps: int, steps: int, batch: int,
                 curriculum: float, low_tokens: int, high_tokens: int, freeze_vision: bool = False,
                 numerics: str = "native") -> str:
    """Identity of a trained toy base: the bench it learns from, every training setting and the recipe."""
    import hashlib

    recipe = TOY_RECIPE.read_text() if TOY_RECIPE.is_file() else ""
    fields = {"bench": bench_meta, "seed": seed, "warmup_steps": warmup_steps, "steps": steps, "batch": batch,
              "curriculum": curriculum, "low": low_tokens, "high": high_tokens, "recipe": recipe,
              "version": TOY_VERSION}
    if freeze_vision:  # only when set: toys trained before the option existed keep their keys
        fields["freeze_vision"] = True
    if numerics != "native":  # toys cached before the setting were trained with the machine's own numerics
        fields["numerics"] = numerics
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_toy_base(bench_root: str | Path, cache_dir: str | Path, *, seed: int = 0, warmup_steps: int = 300,
                   steps: int = 1000, batch: int = 16, curriculum: float = 0.15, low_tokens: int = 16,
                   high_tokens: int = 256, freeze_vision: bool = False, numerics: str = "native",
                   in_process: bool = True, log=print) -> dict[str, Any]:
    """The trained toy base for the bench at ``bench_root``, built once per settings under ``cache_dir``.

    ``freeze_vision`` keeps the warmed-up vision tower and its merger fixed during ``swift sft``
    (``--freeze_vit true --freeze_aligner true``): the warm-up's features locate the red mark, and full tuning
    erodes that (``benchmarks/toy_mark_probe.py``).

    Steps (each reused when already done): vision warm-up -> ``init/``; rows -> ``sft_rows.jsonl``;
    ``swift sft recipes/toy/base_sft.yaml`` -> ``sft/checkpoint-<steps>``; ``toy.json`` (written last) names
    the finished model directory. Returns the contents of ``toy.json``.
    """
    from qzoom_swift.bench.dataset import BENCH_FILE, read_split
    from qzoom_swift.bench.sft import swift_sft

    bench_root = Path(bench_root)
    meta = json.loads((bench_root / BENCH_FILE).read_text())
    spec = BenchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
    key = toy_base_key(meta, seed=seed, warmup_steps=warmup_steps, steps=steps, batch=batch, curriculum=curriculum,
                       low_tokens=low_tokens, high_tokens=high_tokens, freeze_vision=freeze_vision, numerics=numerics)
    root = Path(cache_dir) / "toy" / key
    done = root / "toy.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if Path(record["model_dir"], "model.safetensors").is_file():
            return {**record, "reused": True}
    root.mkdir(parents=True, exist_ok=True)
    init = root / "init"
    if not (init / "toy_warmup.json").is_file():
        log(f"toy base: vision warm-up ({warmup_steps} steps) -> {init}")
        build_toy_base(init, spec, seed=seed, warmup_steps=warmup_steps, low_tokens=low_tokens)
    warmup = json.loads((init / "toy_warmup.json").read_text())
    rows_path = root / "sft_rows.jsonl"
    if not rows_path.is_file():
        rows = toy_sft_rows(read_split(bench_root, "train"), root / "crops", steps=steps, batch=batch, seed=seed,
                            low_tokens=low_tokens, high_tokens=high_tokens, curriculum=curriculum)
        write_jsonl_atomic(rows_path, rows)
    out = root / "sft"
    shutil.rmtree(out, ignore_errors=True)
    log(f"toy base: swift sft {TOY_RECIPE.name}, {steps} steps x {batch} -> {out}")
    t0 = time.perf_counter()
    sft_log = swift_sft(TOY_RECIPE, ["--model", str(init), "--dataset", str(rows_path), "--output_dir", str(out),
                                     "--max_steps", str(steps), "--save_steps", str(steps), "--seed", str(seed),
                                     "--warmup_steps", str(min(60, max(1, steps // 10))),
                                     *(["--freeze_vit", "true", "--freeze_aligner", "true"] if freeze_vision else [])],
                        root, in_process=in_process)
    model_dir = out / f"checkpoint-{steps}"
    if not (model_dir / "model.safetensors").is_file():
        raise RuntimeError(f"swift sft left no {model_dir}/model.safetensors; see {sft_log}")
    logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines() if line.strip()]
    losses = [[row["global_step/max_steps"], row["loss"]] for row in logs if "loss" in row]
    record = {"key": key, "model_dir": str(model_dir), "warmup": warmup, "steps": steps, "batch": batch,
              "curriculum": curriculum, "freeze_vision": freeze_vision, "sft_seconds": round(time.perf_counter() - t0, 1),
              "losses": losses, "sft_log": str(sft_log), "recipe": str(TOY_RECIPE)}
    write_json_atomic(done, record)
    return {**record, "reused": False}


def serving_copy(model_dir: str | Path, max_tokens: int) -> Path:
    """The trained toy at ``model_dir`` with its processor's image cap raised to ``max_tokens`` visual tokens.

    The processor saved with the toy caps images at the largest budget it was trained with; a bench at a higher
    resolution (``DemoConfig.toy_preset``) needs larger images through. The weights are the same files
    (hard links, a copy where links are impossible); only ``processor_config.json`` differs. Built next to the
    model in a temporary folder and renamed into place, so a half-built copy is never used.
    """
    import os

    model_dir = Path(model_dir)
    target = model_dir.parent / f"{model_dir.name}-max{max_tokens}"
    if (target / "processor_config.json").is_file():
        return target
    processor_file = model_dir / "processor_config.json"
    if not processor_file.is_file():
        raise FileNotFoundError(f"{processor_file}: the toy model has no processor config to raise the cap of")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=model_dir.parent))
    try:
        for src in model_dir.iterdir():
            if src.is_file() and src.name != processor_file.name:
                try:
                    os.link(src, tmp / src.name)
                except OSError:
                    shutil.copy2(src, tmp / src.name)
        config = json.loads(processor_file.read_text())
        config["image_processor"]["size"]["longest_edge"] = max_tokens * PATCH_UNIT ** 2
        write_json_atomic(tmp / processor_file.name, config)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
