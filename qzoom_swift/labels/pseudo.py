"""``qzoom pseudo-labels``: stage-1 pseudo labels for an ms-swift dataset, resumable, in jsonl shards.

Input: an ms-swift jsonl (or a json list) whose records hold ``messages`` (the first user turn is the
question; an ``<image>`` tag marks where the image goes, else it goes first) and ``images`` (one local
path; relative paths are resolved against the dataset's directory, then the working directory).

For every record the base model (any supported family, eager attention) answers the question greedily
while :mod:`qzoom_swift.labels.attention` records its response-to-image attention; the map is turned into
tri-state labels by :func:`qzoom_swift.labels.tristate.tristate_labels`. Output, under ``OUT``:

- ``shard-00000.jsonl``, ... : the input record, unchanged, plus ``qzoom_id``, ``qzoom_status`` (``ok`` or
  why the sample is ignored), ``qzoom_answer``, ``qzoom_attn`` (the raw map, rows of floats),
  ``qzoom_attn_grid`` ([rows, cols]), ``qzoom_sink_attn`` (sink-head map or null), ``qzoom_vis_norm``
  (visual hidden-state norms), ``qzoom_box`` (grid box [x0, y0, x1, y1] or null), ``qzoom_peak`` and
  ``qzoom_rpn_labels`` (the 1 / 0 / -100 map, null for an ignored sample). The shards feed
  ``swift sft --tuner_type qzoom`` with ``QZOOM_TRAIN=rpn`` as they are; the grid is stored so training
  can resample the labels to the grid the image has there (``training.resample_label_map``);
- ``rejects.jsonl``: one line per record that could not be labelled, with a ``reason`` (``bad_json``,
  ``bad_messages``, ``no_question``, ``no_image``, ``multi_image``, ``image_tag_mismatch``,
  ``unsupported_image``, ``missing_image``, ``unreadable_image``, ``empty_answer``, ``no_decode_step``) and
  a ``detail``;
- ``job.json``: the settings (and, for ``--heads auto``, the layers chosen on the calibration records);
- ``summary.json``: counts by outcome, ignored samples, rejects by reason, time and samples/s.

Crash safety: a record's id is its line index plus a hash of its content. Each output line is written
with one ``write``, flushed and fsynced; on start the shards and rejects are scanned for finished ids and
a partial last line (a kill in mid-write) is cut off, so a rerun of the same command continues without
duplicates or gaps. Records are batched in fixed blocks of ``batch_size`` input records, so a resumed
run computes exactly the batches (and numbers) an uninterrupted run computes. A non-empty output
directory that is not this job's is never touched without ``--overwrite``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.fileio import write_json_atomic
from qzoom_swift.labels.jobs import (
    JOB_FILE,
    STATUS_REJECTED,
    SUMMARY_FILE,
    JobError,
    OutputDir,
    Prepared,
    Reject,
    prepare_out_dir,
    read_dataset,
    record_id,
)
from qzoom_swift.labels.jobs import prepare_record as _prepare_record
from qzoom_swift.labels.tristate import (
    DEFAULT_TAU_NORM,
    IGNORED_STATUSES,
    SINK_FILTERS,
    STATUS_OK,
)

JOB_VERSION = 1

ANSWER_SUFFIX = "Answer the question using a single word or phrase."
GROUNDING_INSTRUCTION = (
    "Output the grounding bounding box of Region of Interest for the question. "
    "IMPORTANT: The output MUST be raw text, one box per line. DO NOT use JSON. "
    "Follow this exact format: x_min y_min x_max y_max {detail_label}."
)
"""The official natural-image prompt (reference §2.1): the answer becomes a box, the attention sharper."""

REJECT_REASONS = ("bad_json", "bad_messages", "no_question", "no_image", "multi_image", "image_tag_mismatch",
                  "unsupported_image", "missing_image", "unreadable_image", "empty_answer", "no_decode_step")


def grounding_rewrite(after: str) -> str:
    """The official natural-image prompt: replace the short-answer suffix by the grounding instruction."""
    return (after.replace(ANSWER_SUFFIX, GROUNDING_INSTRUCTION) if ANSWER_SUFFIX in after
            else f"{after.strip()} {GROUNDING_INSTRUCTION}")


def prepare_record(record: Any, base_dir: Path, grounding_prompt: bool) -> Prepared | Reject:
    """Check one record and build its (optionally grounding) prompt; see :func:`jobs.prepare_record`."""
    return _prepare_record(record, base_dir, grounding_rewrite if grounding_prompt else None, "stage-1 labelling")


@dataclass
class PseudoLabelOptions:
    model: str
    dataset: str
    out: str
    batch_size: int = 1
    max_new_tokens: int = 128
    mode: str = "textual"
    """Head table of known checkpoints: textual (documents, OCR) or natural (photos)."""
    heads: str = "default"
    """default: the known table, else auto; auto: most concentrated layers; or a spec '20:1,4;22'."""
    sink_heads: str | None = None
    """Sink heads spec overriding the table ('' = none)."""
    sink: str = "auto"
    """auto (heads when the selection has sink heads or is a known one, else norm), heads, norm, both, none."""
    sink_threshold: float | None = None
    """Sink-head threshold; None = the selection's (1e-2; 1e-3 for LLaVA-1.5-7B)."""
    tau_norm: float = DEFAULT_TAU_NORM
    queries: str = "answer"
    """answer: the answer tokens' attention (as released); answer+prompt: also the last prompt token's."""
    grounding_prompt: str = "auto"
    """auto (on for mode natural), on, off: replace/append the official grounding instruction."""
    max_tokens: int = 576
    """Visual-token budget per image when labelling (Qwen families; 0 = the processor's own setting)."""
    calibration: int = 16
    top_k: int = 2
    tau_fg: float | None = None
    tau_bg: float | None = None
    max_box_fraction: float | None = None
    min_peak: float | None = None
    """None = the LabelThresholds default."""
    shard_size: int = 1000
    overwrite: bool = False
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    # What must match for a resume to continue an earlier run (batch/shard size, progress, device may change).
    RESUME_KEYS = ("model", "dataset", "max_new_tokens", "mode", "queries", "heads", "sink_heads", "sink",
                   "sink_threshold", "tau_norm", "grounding_prompt", "max_tokens", "calibration", "top_k", "tau_fg",
                   "tau_bg", "max_box_fraction", "min_peak", "limit", "batch_size", "dtype")


# ------------------------------------------------------------------------------------------------ records


# ------------------------------------------------------------------------------------------------- output


# ------------------------------------------------------------------------------------------------- model


def _resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise JobError(f"--dtype {dtype!r}: choose from auto, {', '.join(table)}")
    return device, table[dtype]


def load_labelling_model(model_dir: str, device: str = "auto", dtype: str = "auto"):
    """(model, processor, family) with eager attention in the language model (the vision tower keeps sdpa)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.families import family_of

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise JobError(f"cannot read the model config of {model_dir}: {exc}") from exc
    try:
        family = family_of(config)
    except ValueError as exc:
        raise JobError(f"unsupported model {model_dir}: {exc}") from exc
    device, torch_dtype = _resolve_device_dtype(device, dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch_dtype, attn_implementation={"text_config": "eager", "vision_config": "sdpa"})
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor, family


def set_max_visual_tokens(processor, max_tokens: int) -> bool:
    """Cap the visual tokens per image of a Qwen-style (pixel-budget) processor; False if it has fixed size."""
    ip = processor.image_processor
    merge, patch = getattr(ip, "merge_size", None), getattr(ip, "patch_size", None)
    if not max_tokens or merge is None or patch is None:
        return False
    longest = int(max_tokens) * (int(patch) * int(merge)) ** 2
    shortest = min(int(ip.size["shortest_edge"]), longest)
    ip.size = {"shortest_edge": shortest, "longest_edge": longest}
    return True


# -------------------------------------------------------------------------------------------------- job


def _grid_list(values, grid: tuple[int, int], digits: int = 6) -> list[list[float]]:
    rows = values.reshape(grid).tolist()
    return [[float(f"{v:.{digits}g}") for v in row] for row in rows]


def _resolve_selection(opts: PseudoLabelOptions, family: str, num_layers: int, hidden: int, num_heads: int):
    """(HeadSelection or None for auto, candidate layers)."""
    from qzoom_swift.labels.attention import (
        MODES,
        QUERIES,
        HeadSelection,
        auto_candidate_layers,
        known_head_selection,
    )

    if opts.queries not in QUERIES:
        raise JobError(f"--queries {opts.queries!r}: choose from {', '.join(QUERIES)}")
    if opts.mode not in MODES:
        raise JobError(f"--mode {opts.mode!r}: choose from {', '.join(MODES)}")
    selection = None
    if opts.heads == "default":
        selection = known_head_selection(family, num_layers, hidden, opts.mode)
    elif opts.heads != "auto":
        try:
            selection = HeadSelection(HeadSelection.parse_spec(opts.heads), {}, source="custom")
        except ValueError as exc:
            raise JobError(f"--heads: {exc}") from exc
    if selection is not None and opts.sink_heads is not None:
        sink = HeadSelection.parse_spec(opts.sink_heads) if opts.sink_heads.strip() else {}
        selection = HeadSelection(selection.grounding, sink, selection.sink_threshold, selection.source)
    if selection is not None and opts.sink_threshold is not None:
        selection = HeadSelection(selection.grounding, selection.sink, opts.sink_threshold, selection.source)
    if selection is not None:
        try:
            selection.check(num_layers, num_heads)
        except ValueError as exc:
            raise JobError(f"--heads: {exc}") from exc
    return selection, auto_candidate_layers(num_layers)


def _sink_method(opts: PseudoLabelOptions, selection) -> str:
    if opts.sink not in (*SINK_FILTERS, "auto"):
        raise JobError(f"--sink {opts.sink!r}: choose from auto, {', '.join(SINK_FILTERS)}")
    if opts.sink != "auto":
        if opts.sink in ("heads", "both") and selection is not None and not selection.sink and \
                selection.source == "custom":
            raise JobError("--sink heads needs sink heads: pass --sink-heads 'LAYER:H,H'")
        return opts.sink
    if selection is not None and (selection.sink or selection.source.startswith("known:")):
        return "heads"
    return "norm"


def run_pseudo_labels(opts: PseudoLabelOptions) -> dict:
    """Run (or resume) a pseudo-label job; returns the summary (also written to ``summary.json``)."""
    from qzoom_swift.config import LabelThresholds, QZoomConfig
    from qzoom_swift.families import get_adapter
    from qzoom_swift.labels.attention import (
        HeadSelection,
        eos_token_ids,
        generate_with_attention,
        image_grids,
        rank_layers_by_concentration,
    )
    from qzoom_swift.labels.tristate import combine_sink_masks, label_kwargs, tristate_labels

    t_start = time.perf_counter()
    if opts.batch_size < 1 or opts.shard_size < 1 or opts.max_new_tokens < 1:
        raise JobError("--batch-size, --shard-size and --max-new-tokens must be >= 1")
    dataset = Path(opts.dataset).resolve()
    if not dataset.is_file():
        raise JobError(f"dataset {dataset} not found")
    opts.dataset = str(dataset)
    model_path = Path(opts.model)
    opts.model = str(model_path.resolve()) if model_path.exists() else opts.model
    defaults = LabelThresholds()
    thresholds = {k: (getattr(opts, k) if getattr(opts, k) is not None else getattr(defaults, k))
                  for k in ("tau_fg", "tau_bg", "max_box_fraction", "min_peak")}
    for k, v in thresholds.items():
        setattr(opts, k, v)
    label_cfg = QZoomConfig(labelling=LabelThresholds(**thresholds))
    settings = {k: getattr(opts, k) for k in PseudoLabelOptions.RESUME_KEYS}
    root, previous = prepare_out_dir(opts.out, opts.overwrite, settings, PseudoLabelOptions.RESUME_KEYS,
                                     "pseudo-label")

    model, processor, family = load_labelling_model(opts.model, opts.device, opts.dtype)
    t_loaded = time.perf_counter()
    adapter = get_adapter(model)
    text_cfg = adapter.text_config(model)
    num_layers, hidden, num_heads = len(adapter.decoder_layers(model)), int(text_cfg.hidden_size), \
        int(text_cfg.num_attention_heads)
    selection, candidates = _resolve_selection(opts, family, num_layers, hidden, num_heads)
    if previous is not None and previous.get("head_selection"):
        selection = HeadSelection.from_dict(previous["head_selection"])
    sink_method = _sink_method(opts, selection)
    grounding_prompt = opts.grounding_prompt == "on" or (opts.grounding_prompt == "auto" and opts.mode == "natural")
    if opts.grounding_prompt not in ("auto", "on", "off"):
        raise JobError(f"--grounding-prompt {opts.grounding_prompt!r}: choose from auto, on, off")
    capped = set_max_visual_tokens(processor, opts.max_tokens)
    eos = eos_token_ids(model, processor.tokenizer)

    job = previous or {"version": JOB_VERSION, "settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    job.update(family=family, num_layers=num_layers, hidden_size=hidden, num_heads=num_heads,
               sink_filter=sink_method, grounding_prompt_used=grounding_prompt, max_tokens_applied=capped,
               label_config=label_kwargs(label_cfg),
               head_selection=None if selection is None else selection.to_dict(),
               auto_candidates=candidates)
    write_json_atomic(root / JOB_FILE, job)

    records = read_dataset(dataset)
    if opts.limit is not None:
        records = records[: opts.limit]
    out = OutputDir(root, opts.shard_size)
    out.scan()
    ids = {rid for _, rid, _ in records}
    indices = {i for i, _, _ in records}
    stale = [rid for rid in out.done if rid not in ids and int(rid.split("-", 1)[0]) in indices]
    if stale:
        raise JobError(f"the dataset changed since {root} was started (record {stale[0]} is no longer in it): "
                       "pass --overwrite to start again")
    done_before = sum(1 for _, rid, _ in records if rid in out.done)

    timing = Counter()
    processed = 0
    outcome = Counter()
    held: list = []  # (kind, payload) waiting for the auto layer choice
    calibration: list[dict] = []
    base_dir = dataset.parent

    def norm_layer_of(sel) -> int:
        """Layer whose input hidden states give the norm sink test: the lowest grounding layer."""
        return min(sel.grounding)

    def labelled_record(rid, rec, answer, sample, grid, sel):
        h, w = grid
        n = h * w
        att = sample.head_mean(sel.grounding)
        if att.numel() != n:
            raise RuntimeError(f"record {rid}: {att.numel()} visual tokens for a {h}x{w} grid")
        att = att.view(h, w)
        sink_attn = sample.head_mean(sel.sink)
        sink_attn = None if sink_attn is None else sink_attn.view(h, w)
        norms = sample.norms.get(norm_layer_of(sel))
        norms = None if norms is None else norms.view(h, w)
        mask = combine_sink_masks(sink_method, (h, w), sink_attn=sink_attn, norms=norms,
                                  sink_threshold=sel.sink_threshold, tau_norm=opts.tau_norm)
        res = tristate_labels(att, mask, **label_kwargs(label_cfg))
        data = {"qzoom_id": rid, "qzoom_status": res.status}
        data.update({k: v for k, v in rec.items() if not k.startswith("qzoom_")})
        data.update(qzoom_answer=answer, qzoom_attn=_grid_list(att, grid), qzoom_attn_grid=[h, w],
                    qzoom_sink_attn=None if sink_attn is None else _grid_list(sink_attn, grid),
                    qzoom_vis_norm=None if norms is None else _grid_list(norms, grid),
                    qzoom_sink_tokens=int(mask.sum()),
                    qzoom_box=None if res.box is None else [res.box.x0, res.box.y0, res.box.x1, res.box.y1],
                    qzoom_peak=float(f"{res.peak:.6g}"), qzoom_rpn_labels=res.as_list())
        return data

    def emit(kind, payload):
        nonlocal processed
        t0 = time.perf_counter()
        if kind == "reject":
            rid, index, reject = payload
            out.write_reject(rid, index, reject)
            outcome["rejected"] += 1
        else:
            rid, rec, answer, sample, grid = payload
            data = labelled_record(rid, rec, answer, sample, grid, selection)
            out.write_record(data)
            outcome["labelled" if data["qzoom_status"] == STATUS_OK else data["qzoom_status"]] += 1
        processed += 1
        timing["write_s"] += time.perf_counter() - t0
        if bar is not None:
            bar.update(1)

    def choose_layers():
        nonlocal selection
        from qzoom_swift.labels.tristate import sink_mask_from_norms

        maps = []
        for sample, grid in calibration:
            per = {}
            for layer in candidates:
                m = sample.per_layer[layer].mean(dim=0)
                if layer in sample.norms:
                    m = m * ~sink_mask_from_norms(sample.norms[layer].view(grid), opts.tau_norm).flatten()
                per[layer] = m
            maps.append(per)
        ranking = rank_layers_by_concentration(maps) if maps else [(layer, 1.0) for layer in candidates]
        chosen = sorted(layer for layer, _ in ranking[: max(1, opts.top_k)])
        selection = HeadSelection({layer: None for layer in chosen}, {}, source="auto")
        job["head_selection"] = selection.to_dict()
        job["auto_ranking"] = [[layer, round(score, 6)] for layer, score in ranking]
        job["auto_calibration_samples"] = len(maps)
        write_json_atomic(root / JOB_FILE, job)

    def flush_held():
        for kind, payload in held:
            emit(kind, payload)
        held.clear()

    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), initial=done_before, desc="pseudo-labels", unit="rec", dynamic_ncols=True)
    try:
        bs = opts.batch_size
        for start in range(0, len(records), bs):
            block = records[start:start + bs]
            todo = [r for r in block if r[1] not in out.done]
            if not todo:
                continue
            t0 = time.perf_counter()
            prepared = [(i, rid, rec, prepare_record(rec, base_dir, grounding_prompt)) for i, rid, rec in block]
            valid = [(i, rid, rec, p) for i, rid, rec, p in prepared if isinstance(p, Prepared)]
            timing["read_s"] += time.perf_counter() - t0
            results: dict[str, tuple] = {}
            if valid:
                t0 = time.perf_counter()
                texts = [processor.apply_chat_template(p.messages, add_generation_prompt=True) for *_, p in valid]
                inputs = processor(text=texts, images=[p.image for *_, p in valid], return_tensors="pt",
                                   padding=True).to(model.device)
                grids = image_grids(model, inputs)
                timing["preprocess_s"] += time.perf_counter() - t0
                layers = candidates if selection is None else selection.layers
                norm_layers = candidates if selection is None else [norm_layer_of(selection)]
                t0 = time.perf_counter()
                new_ids, samples = generate_with_attention(model, inputs, layers, norm_layers, eos,
                                                           opts.max_new_tokens, queries=opts.queries)
                timing["generate_s"] += time.perf_counter() - t0
                for (_i, rid, _rec, _p), ids_row, sample, grid in zip(valid, new_ids, samples, grids):
                    row = ids_row.tolist()
                    cut = next((k for k, t in enumerate(row) if t in eos), len(row))
                    answer = processor.tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
                    results[rid] = (answer, sample, grid)
            for i, rid, rec, p in prepared:
                if rid in out.done:
                    continue
                if isinstance(p, Reject):
                    item = ("reject", (rid, i, p))
                else:
                    answer, sample, grid = results[rid]
                    if not answer:
                        item = ("reject", (rid, i, Reject("empty_answer", "the model's answer is empty")))
                    elif sample.num_steps == 0:
                        item = ("reject", (rid, i, Reject(
                            "no_decode_step", "the answer has no token after the first to read attention from; "
                                              "raise --max-new-tokens")))
                    else:
                        item = ("record", (rid, rec, answer, sample, grid))
                        if selection is None:
                            calibration.append((sample, grid))
                if selection is None:
                    held.append(item)
                else:
                    emit(*item)
            if selection is None and len(calibration) >= opts.calibration:
                choose_layers()
                flush_held()
        if selection is None:
            choose_layers()
            flush_held()
    finally:
        out.close()
        if bar is not None:
            bar.close()

    elapsed = time.perf_counter() - t_start
    work_s = time.perf_counter() - t_loaded
    statuses = Counter(out.done.get(rid) for _, rid, _ in records if rid in out.done)
    counts = {"labelled": statuses.get(STATUS_OK, 0), **{s: statuses.get(s, 0) for s in IGNORED_STATUSES},
              "rejected": statuses.get(STATUS_REJECTED, 0)}
    summary = {
        "dataset": opts.dataset,
        "output": str(root),
        "model": opts.model,
        "family": family,
        "head_selection": job.get("head_selection"),
        "sink_filter": sink_method,
        "label_config": job["label_config"],
        "records_total": len(records),
        "records_done": sum(counts.values()),
        "complete": sum(counts.values()) == len(records),
        "outcomes": counts,
        "ignored": sum(counts[s] for s in IGNORED_STATUSES),
        "rejects_by_reason": dict(sorted(out.reject_reasons.items())),
        "shards": [p.name for p in out.shards()],
        "this_run": {
            "resumed_from": done_before,
            "processed": processed,
            "outcomes": dict(outcome),
            "seconds": round(elapsed, 3),
            "model_load_s": round(t_loaded - t_start, 3),
            "samples_per_s": round(processed / work_s, 4) if processed and work_s > 0 else None,
            "timing_s": {k: round(v, 3) for k, v in sorted(timing.items())},
        },
        "settings": settings,
    }
    write_json_atomic(root / SUMMARY_FILE, summary)
    return summary


__all__ = [
    "GROUNDING_INSTRUCTION", "JobError", "OutputDir", "Prepared", "PseudoLabelOptions", "REJECT_REASONS", "Reject",
    "load_labelling_model", "prepare_record", "read_dataset", "record_id", "run_pseudo_labels",
    "set_max_visual_tokens",
]
