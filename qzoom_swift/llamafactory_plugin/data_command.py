"""``qzoom lf-dataset``: the argument definitions (standard library only, so ``qzoom --help`` stays fast) and the run."""

from __future__ import annotations

import argparse
import json
import sys

LF_DATASET_HELP = "export a labelling job's output as a LLaMA-Factory dataset (ShareGPT + pre-tokenized)"
LF_DATASET_DESCRIPTION = (
    "Read the output folder of `qzoom pseudo-labels` (stage 1), `qzoom mine-hard` (stage 2) or `qzoom gate-labels` "
    "(stage 3) and write, under --out: NAME.json (ShareGPT, <image> in the user turn) with its dataset_info.json "
    "entry; tokenized/, the same rows tokenized by LLaMA-Factory's own template and processor plus the fixed-length "
    "qzoom_* columns its training reads (recipe: tokenized_path: DIR/tokenized, remove_unused_columns: false); "
    "images/ pre-resized to the grid each row trains at; rejects.jsonl (rows LLaMA-Factory would drop or cut, with "
    "the reason); qzoom_lf_dataset.json (what was exported and the recipe keys to repeat). Stage-2 rows hold two "
    "images (the source, then the RoI crop) and qzoom_roi. Needs LLaMA-Factory (the llamafactory extra). The folder "
    "appears complete or not at all; a finished one is replaced only with --force. The tokenized form names the "
    "images by absolute path: export again after moving --out.")


def lf_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_output", metavar="JOB_OUTPUT", help="the --out folder of a finished labelling job")
    p.add_argument("--model", required=True,
                   help="the model folder to train (`qzoom lf-model`'s output, or its base): its tokenizer, processor "
                        "and Q-Zoom settings (RoI budget) are used")
    p.add_argument("--template", required=True,
                   help="LLaMA-Factory's chat template, the recipe's `template` (qwen2_vl for Qwen2.5-VL, "
                        "qwen3_vl_nothink for Qwen3-VL Instruct, llava for LLaVA-1.5)")
    p.add_argument("--out", required=True, help="the dataset folder to write (the recipe's dataset_dir)")
    p.add_argument("--name", default=None, help="the dataset's name in dataset_info.json (default qzoom_stageN)")
    p.add_argument("--force", action="store_true", help="replace a finished export in --out")
    p.add_argument("--cutoff-len", type=int, default=None,
                   help="longest row in tokens; longer rows are rejected, never cut (default 8192; the recipe's "
                        "cutoff_len must be at least this)")
    p.add_argument("--image-max-pixels", type=int, default=None,
                   help="LLaMA-Factory's image_max_pixels for the export and the recipe (default 16777216: the "
                        "exported images are already at their grid)")
    p.add_argument("--image-min-pixels", type=int, default=None,
                   help="LLaMA-Factory's image_min_pixels (default 1024, its own default)")
    p.add_argument("--rpn-cells", type=int, default=None,
                   help="stage 1: fixed length of qzoom_rpn_labels (default: the largest label map)")
    p.add_argument("--roi-noise", type=float, default=None,
                   help="stage 2: chance of replacing a row's stored box by a random one, drawn once here (default "
                        "QZOOM_ROI_NOISE, else 0; the released Qwen3 recipe uses 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the RoI-noise draw")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def lf_dataset_run(args: argparse.Namespace) -> int:
    from qzoom_swift.extras import require_extra

    require_extra("llamafactory", "qzoom lf-dataset")
    from qzoom_swift.fileio import quiet_transformers
    from qzoom_swift.llamafactory_plugin import data

    quiet_transformers()
    defaults = {"cutoff_len": data.DEFAULT_CUTOFF_LEN, "image_max_pixels": data.DEFAULT_IMAGE_MAX_PIXELS,
                "image_min_pixels": data.DEFAULT_IMAGE_MIN_PIXELS}
    opts = data.LFExportOptions(
        job=str(args.job_output), model=str(args.model), template=args.template, out=str(args.out), name=args.name,
        force=args.force, rpn_cells=args.rpn_cells, roi_noise=args.roi_noise, seed=args.seed,
        progress=not args.no_progress,
        **{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()})
    try:
        manifest = data.export_lf_dataset(opts)
    except (data.ExportError, ValueError, OSError) as exc:
        print(f"qzoom lf-dataset: error: {exc}", file=sys.stderr)
        return 1
    print(f"{manifest['rows']} rows exported for stage {manifest['stage']} ({manifest['kind']}), "
          f"{manifest['rejected']} rejected {manifest['rejects'] or ''} -> {args.out}")
    print("recipe keys:\n" + "\n".join(f"  {k}: {json.dumps(v)}" for k, v in manifest["recipe"].items()))
    return 0
