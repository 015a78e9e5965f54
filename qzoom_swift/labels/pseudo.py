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
  ``qzoom_rpn_labels`` (the 1 / 0 / -100 map, null for an ignored sample; on the released grid, ``--grid
  square``, 24 x 24 with the square padding labelled background, and ``qzoom_pad_square: true`` so that
  training pads the image the same way). The shards feed
  ``swift sft --tuner_type qzoom`` with ``QZOOM_TRAIN=rpn`` as they are; the ``qzoom_*`` template encodes
  each row at exactly its labels' grid (a row that sets its own budget has its labels resampled,
  ``training.resample_label_map``);
- ``rejects.jsonl``: one line per record that could not be labelled, with a ``reason`` (``bad_json``,
  ``bad_messages``, ``no_question``, ``no_image``, ``multi_image``, ``image_tag_mismatch``,
  ``unsupported_image``, ``missing_image``, ``unreadable_image``, ``empty_answer``, ``no_decode_step``,
  ``prompt_too_long`` (over ``--max-prompt-tokens``, checked before the model runs), ``model_error`` and
  ``out_of_memory`` (the record failed inside the model; the job goes on, a resume never retries it)) and
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

from qzoom_swift.families.registry import RELEASED_PAD_FILL
from qzoom_swift.labels.gate import SHORT_ANSWER_INSTRUCTION
from qzoom_swift.labels.jobs import (
    STATUS_REJECTED,
    Block,
    JobError,
    LabelJob,
    OutputDir,
    Prepared,
    Reject,
    RunOptions,
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

ANSWER_SUFFIX = SHORT_ANSWER_INSTRUCTION
GROUNDING_INSTRUCTION = (
    "Output the grounding bounding box of Region of Interest for the question. "
    "IMPORTANT: The output MUST be raw text, one box per line. DO NOT use JSON. "
    "Follow this exact format: x_min y_min x_max y_max {detail_label}."
)
"""The official natural-image prompt (reference §2.1): the answer becomes a box, the attention sharper."""

RELEASED_GRID_SIDE = 24
"""The released labelling grid: every image padded to a square and encoded at exactly 24 x 24 = 576 tokens."""
GRIDS = ("auto", "square", "native")

REJECT_REASONS = ("bad_json", "bad_messages", "no_question", "no_image", "multi_image", "image_tag_mismatch",
                  "unsupported_image", "missing_image", "unreadable_image", "empty_answer", "no_decode_step",
                  "prompt_too_long", "model_error", "out_of_memory")


def grounding_rewrite(after: str) -> str:
    """The official natural-image prompt: replace the short-answer suffix by the grounding instruction."""
    return (after.replace(ANSWER_SUFFIX, GROUNDING_INSTRUCTION) if ANSWER_SUFFIX in after
            else f"{after.strip()} {GROUNDING_INSTRUCTION}")


def prepare_record(record: Any, base_dir: Path, grounding_prompt: bool) -> Prepared | Reject:
    """Check one record and build its (optionally grounding) prompt; see :func:`jobs.prepare_record`."""
    return _prepare_record(record, base_dir, grounding_rewrite if grounding_prompt else None, "stage-1 labelling")


@dataclass
class PseudoLabelOptions(RunOptions):
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
    grid: str = "auto"
    """square: the released grid (padded to a square with grey, exactly 24 x 24 tokens, padding cells labelled
    background); native: the image's own aspect ratio at up to ``max_tokens``; auto: square for the paper's
    checkpoints (the family registry's known sizes), native otherwise. LLaVA-1.5 is always square, padded with its
    mean colour: it sees every image so at inference (``image_aspect_ratio: pad``)."""
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
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    max_prompt_tokens: int | None = None
    """Longer prompts (text + max_tokens) are rejected before the model runs (eager attention memory grows with
    the square of the length); None = max_tokens + 4096 text tokens, within the model's context."""

    # What must match for a resume to continue an earlier run (batch/shard size, progress, device may change).
    RESUME_KEYS = ("model", "dataset", "max_new_tokens", "mode", "queries", "heads", "sink_heads", "sink",
                   "sink_threshold", "tau_norm", "grounding_prompt", "max_tokens", "grid", "calibration", "top_k",
                   "tau_fg", "tau_bg", "max_box_fraction", "min_peak", "limit", "batch_size", "dtype")


# ------------------------------------------------------------------------------------------------- model


def load_labelling_model(model_dir: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto",
                         local_rank: int | None = None):
    """(model, processor, family) with eager attention in the language model (the vision tower keeps sdpa)."""
    from transformers import AutoConfig

    from qzoom_swift.families import family_of
    from qzoom_swift.loading import LoadSettings, ModelLoadError, load_model

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise JobError(f"cannot read the model config of {model_dir}: {exc}") from exc
    try:
        family = family_of(config)
    except ValueError as exc:
        raise JobError(f"unsupported model {model_dir}: {exc}") from exc
    try:
        model, processor = load_model(model_dir, LoadSettings(device, dtype, attn_implementation),
                                      reads_attention=True, local_rank=local_rank)
    except ModelLoadError as exc:
        raise JobError(str(exc)) from exc
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


def set_fixed_visual_tokens(processor, tokens: int) -> bool:
    """Make a Qwen-style processor encode a (pre-resized) image at exactly ``tokens``: min = max pixels."""
    ip = processor.image_processor
    merge, patch = getattr(ip, "merge_size", None), getattr(ip, "patch_size", None)
    if merge is None or patch is None:
        return False
    pixels = int(tokens) * (int(patch) * int(merge)) ** 2
    ip.size = {"shortest_edge": pixels, "longest_edge": pixels}
    return True


def released_grid_image(image, patch_unit: int, side_tokens: int = RELEASED_GRID_SIDE,
                        fill: tuple[int, int, int] = RELEASED_PAD_FILL):
    """The image as the released labelling shows it: padded to a ``fill`` square (grey; LLaVA-1.5: its mean
    colour), resized to ``side_tokens`` cells."""
    from qzoom_swift.roi import pad_to_square

    side = side_tokens * patch_unit
    square = pad_to_square(image.convert("RGB"), fill)
    return square if square.size == (side, side) else square.resize((side, side), resample=3)


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


class PseudoLabelJob(LabelJob):
    """The pseudo-label run: one greedy answer per record, its attention map turned into tri-state labels.

    With ``--heads auto`` the layers are not known when the first blocks run: their outputs are held
    back (with the attention of every candidate layer) until ``calibration`` labelled records have come
    in, the layers are chosen on those, and the held outputs are written with that choice.
    """

    job_name = "pseudo-label"
    kind = "pseudo-labels"
    progress_desc = "pseudo-labels"
    progress_unit = "rec"
    opts: PseudoLabelOptions

    def __init__(self, opts: PseudoLabelOptions):
        super().__init__(opts)
        self.timing: Counter = Counter()
        self.outcome: Counter = Counter()
        self.held: list[tuple[str, tuple]] = []  # (kind, payload) waiting for the auto layer choice
        self.calibration: list[tuple[Any, tuple[int, int]]] = []
        self.selection: Any = None  # HeadSelection; None until the auto choice is made
        self.square = False  # the released grid (set up in setup())
        self.image_sizes: dict[str, tuple[int, int]] = {}  # id -> original (w, h), for the padding cells

    # ------------------------------------------------------------------------------------------ setup

    def configure(self) -> dict:
        from qzoom_swift.config import LabelThresholds, QZoomConfig

        opts = self.opts
        if opts.batch_size < 1 or opts.shard_size < 1 or opts.max_new_tokens < 1:
            raise JobError("--batch-size, --shard-size and --max-new-tokens must be >= 1")
        opts.dataset = str(self.find_dataset(absolute=True))
        model_path = Path(opts.model)
        opts.model = str(model_path.resolve()) if model_path.exists() else opts.model
        defaults = LabelThresholds()
        thresholds = {k: (getattr(opts, k) if getattr(opts, k) is not None else getattr(defaults, k))
                      for k in ("tau_fg", "tau_bg", "max_box_fraction", "min_peak")}
        for k, v in thresholds.items():
            setattr(opts, k, v)
        self.label_cfg = QZoomConfig(labelling=LabelThresholds(**thresholds))
        return {k: getattr(opts, k) for k in PseudoLabelOptions.RESUME_KEYS}

    def setup(self) -> None:
        from qzoom_swift.families import get_adapter
        from qzoom_swift.labels.attention import HeadSelection, eos_token_ids
        from qzoom_swift.labels.tristate import label_kwargs

        opts = self.opts
        self.model, self.processor, self.family = load_labelling_model(
            opts.model, opts.device, opts.dtype, opts.attn_implementation, self.local_rank)
        self.t_loaded = time.perf_counter()
        adapter = get_adapter(self.model)
        text_cfg = adapter.text_config(self.model)
        num_layers, hidden, num_heads = len(adapter.decoder_layers(self.model)), int(text_cfg.hidden_size), \
            int(text_cfg.num_attention_heads)
        self.selection, self.candidates = _resolve_selection(opts, self.family, num_layers, hidden, num_heads)
        if self.previous is not None and self.previous.get("head_selection"):
            self.selection = HeadSelection.from_dict(self.previous["head_selection"])
        if self.selection is None and self.part is not None:
            raise JobError("--heads auto chooses the layers on the first --calibration records, which one process "
                           "must see: start the job as one process (it stores the choice in job.json), stop it "
                           "once it has labelled them, then start the shards; or pass --heads LAYER:H,H")
        self.sink_method = _sink_method(opts, self.selection)
        self.grounding_prompt = opts.grounding_prompt == "on" or (opts.grounding_prompt == "auto" and
                                                                  opts.mode == "natural")
        if opts.grounding_prompt not in ("auto", "on", "off"):
            raise JobError(f"--grounding-prompt {opts.grounding_prompt!r}: choose from auto, on, off")
        if opts.grid not in GRIDS:
            raise JobError(f"--grid {opts.grid!r}: choose from {', '.join(GRIDS)}")
        if adapter.spec.fixed_resolution and opts.grid == "native":
            raise JobError(f"--grid native: {adapter.spec.title} encodes every image as a square padded with its "
                           "mean colour (image_aspect_ratio: pad), in training and at inference alike, so its labels "
                           "are made on that square: use --grid auto or --grid square")
        self.square = opts.grid == "square" or adapter.spec.fixed_resolution or (
            opts.grid == "auto" and (num_layers, hidden) in adapter.spec.known_branch_layers)
        self.patch_unit = adapter.patch_unit
        self.pad_fill = adapter.square_fill(self.processor)
        # Qwen: the released 24 x 24; a fixed-size family: its own square grid (LLaVA-1.5: 24 x 24 at 336 px)
        self.grid_side = (adapter.encoded_grid(self.model, {})[0] if adapter.spec.fixed_resolution
                          else RELEASED_GRID_SIDE)
        capped = (set_fixed_visual_tokens(self.processor, RELEASED_GRID_SIDE ** 2) if self.square
                  else set_max_visual_tokens(self.processor, opts.max_tokens))
        self.eos = eos_token_ids(self.model, self.processor.tokenizer)

        self.job = self.previous or {"version": JOB_VERSION, "settings": self.settings,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.job.update(family=self.family, num_layers=num_layers, hidden_size=hidden, num_heads=num_heads,
                        sink_filter=self.sink_method, grounding_prompt_used=self.grounding_prompt,
                        max_tokens_applied=capped, label_config=label_kwargs(self.label_cfg),
                        label_grid="square" if self.square else "native",
                        head_selection=None if self.selection is None else self.selection.to_dict(),
                        auto_candidates=self.candidates)
        self.write_job(self.job)

    def check_resume(self) -> None:
        """Output ids at line indices of this dataset whose content changed: the dataset was edited."""
        ids = {rid for _, rid, _ in self.records}
        indices = {i for i, _, _ in self.records}
        stale = [rid for rid in self.out.done if rid not in ids and int(rid.split("-", 1)[0]) in indices]
        if stale:
            raise JobError(f"the dataset changed since {self.root} was started (record {stale[0]} is no longer in "
                           "it): pass --overwrite to start again")

    # ------------------------------------------------------------------------------------------ blocks

    def process_block(self, block: Block) -> None:
        t0 = time.perf_counter()
        prepared = [(i, rid, rec, prepare_record(rec, self.base_dir, self.grounding_prompt))
                    for i, rid, rec in block]
        valid = [(rid, p) for _i, rid, _rec, p in prepared if isinstance(p, Prepared) and not self.is_rejected(rid)]
        self.timing["read_s"] += time.perf_counter() - t0
        results = self._answer(valid, {rid: i for i, rid, _rec, _p in prepared}) if valid else {}
        for i, rid, rec, p in prepared:
            if self.is_done(rid):
                continue
            kind, payload = self._outcome(i, rid, rec, p, results)
            if self.selection is not None:
                self._emit(kind, payload)
                continue
            if kind == "record":
                _rid, _rec, _answer, sample, grid = payload
                self.calibration.append((sample, grid))
            self.held.append((kind, payload))
        if self.selection is None and len(self.calibration) >= self.opts.calibration:
            self._choose_layers()
            self._flush_held()

    def finish(self) -> None:
        if self.selection is None:
            self._choose_layers()
            self._flush_held()

    def _answer(self, valid: list[tuple[str, Prepared]], index_of: dict[str, int]) -> dict[str, tuple]:
        """id -> (answer, attention sample, token grid) of the block's valid records, generated as one batch.

        Over-long prompts and records that fail inside the model are rejected (``LabelJob.guarded_results``);
        they are missing from the result.
        """
        from qzoom_swift.labels.jobs import model_context, text_tokens

        visual = int(self.opts.max_tokens or 0)  # 0: the processor's own cap, counted as text only
        tokens = [text_tokens(self.processor, p.messages) + visual for _, p in valid]

        def run(pos: list[int]) -> list[tuple]:
            return self._answer_batch([valid[k] for k in pos])

        results = self.guarded_results([(index_of[rid], rid) for rid, _ in valid], tokens,
                                       self.prompt_limit(model_context(self.model), visual), run)
        return {rid: r for (rid, _), r in zip(valid, results) if not isinstance(r, Reject)}

    def _answer_batch(self, valid: list[tuple[str, Prepared]]) -> list[tuple]:
        """(answer, attention sample, token grid) per record, generated as one batch."""
        from qzoom_swift.labels.attention import generate_with_attention, image_grids

        processor, model = self.processor, self.model
        t0 = time.perf_counter()
        texts = [processor.apply_chat_template(p.messages, add_generation_prompt=True) for _, p in valid]
        self.image_sizes.update({rid: p.image.size for rid, p in valid})
        images = [released_grid_image(p.image, self.patch_unit, self.grid_side, self.pad_fill) if self.square
                  else p.image for _, p in valid]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True).to(model.device)
        grids = image_grids(model, inputs)
        self.timing["preprocess_s"] += time.perf_counter() - t0
        sel = self.selection
        layers = self.candidates if sel is None else sel.layers
        norm_layers = self.candidates if sel is None else [_norm_layer(sel)]
        t0 = time.perf_counter()
        new_ids, samples = generate_with_attention(model, inputs, layers, norm_layers, self.eos,
                                                   self.opts.max_new_tokens, queries=self.opts.queries)
        self.timing["generate_s"] += time.perf_counter() - t0
        results = []
        for ids_row, sample, grid in zip(new_ids, samples, grids):
            row = ids_row.tolist()
            cut = next((k for k, t in enumerate(row) if t in self.eos), len(row))
            answer = processor.tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
            results.append((answer, sample, grid))
        return results

    @staticmethod
    def _outcome(i: int, rid: str, rec: Any, p: Prepared | Reject, results: dict[str, tuple]) -> tuple[str, tuple]:
        """("reject", (id, index, Reject)) or ("record", (id, record, answer, sample, grid))."""
        if isinstance(p, Reject):
            return "reject", (rid, i, p)
        answer, sample, grid = results[rid]
        if not answer:
            return "reject", (rid, i, Reject("empty_answer", "the model's answer is empty"))
        if sample.num_steps == 0:
            return "reject", (rid, i, Reject("no_decode_step", "the answer has no token after the first to read "
                                                               "attention from; raise --max-new-tokens"))
        return "record", (rid, rec, answer, sample, grid)

    # ------------------------------------------------------------------------------------------ output

    def _emit(self, kind: str, payload: tuple) -> None:
        t0 = time.perf_counter()
        if kind == "reject":
            rid, index, reject = payload
            self.write_reject(rid, index, reject)
            self.outcome["rejected"] += 1
        else:
            data = self._labelled_record(*payload)
            self.write_record(data)
            self.outcome["labelled" if data["qzoom_status"] == STATUS_OK else data["qzoom_status"]] += 1
        self.timing["write_s"] += time.perf_counter() - t0

    def _flush_held(self) -> None:
        for kind, payload in self.held:
            self._emit(kind, payload)
        self.held.clear()

    def _labelled_record(self, rid: str, rec: dict, answer: str, sample: Any, grid: tuple[int, int]) -> dict:
        """The output line: the input record plus the maps, the sink mask's size and the tri-state labels."""
        from qzoom_swift.labels.tristate import combine_sink_masks, label_kwargs, tristate_labels
        from qzoom_swift.roi import padding_cells

        sel = self.selection
        h, w = grid
        att = sample.head_mean(sel.grounding)
        if att.numel() != h * w:
            raise RuntimeError(f"record {rid}: {att.numel()} visual tokens for a {h}x{w} grid")
        att = att.view(h, w)
        sink_attn = sample.head_mean(sel.sink)
        sink_attn = None if sink_attn is None else sink_attn.view(h, w)
        norms = sample.norms.get(_norm_layer(sel))
        norms = None if norms is None else norms.view(h, w)
        mask = combine_sink_masks(self.sink_method, (h, w), sink_attn=sink_attn, norms=norms,
                                  sink_threshold=sel.sink_threshold, tau_norm=self.opts.tau_norm)
        known_bg = None
        if self.square:  # the padding of the released grid is known background
            if (h, w) != (self.grid_side, self.grid_side):
                raise RuntimeError(f"record {rid}: the square grid should be {self.grid_side}x{self.grid_side} "
                                   f"tokens, the processor gave {h}x{w}")
            known_bg = padding_cells(self.image_sizes.pop(rid), self.grid_side)
        res = tristate_labels(att, mask, known_bg=known_bg, **label_kwargs(self.label_cfg))
        data = {"qzoom_id": rid, "qzoom_status": res.status}
        data.update({k: v for k, v in rec.items() if not k.startswith("qzoom_")})
        data.update(qzoom_answer=answer, qzoom_attn=_grid_list(att, grid), qzoom_attn_grid=[h, w],
                    qzoom_sink_attn=None if sink_attn is None else _grid_list(sink_attn, grid),
                    qzoom_vis_norm=None if norms is None else _grid_list(norms, grid),
                    qzoom_sink_tokens=int(mask.sum()),
                    qzoom_box=None if res.box is None else [res.box.x0, res.box.y0, res.box.x1, res.box.y1],
                    qzoom_peak=float(f"{res.peak:.6g}"), qzoom_rpn_labels=res.as_list())
        if self.square:  # training pads the image the same way, so the labels land where they were made
            data["qzoom_pad_square"] = True
        return data

    def _choose_layers(self) -> None:
        """The auto head choice: the candidate layers whose (norm-filtered) attention is most concentrated."""
        from qzoom_swift.labels.attention import HeadSelection, rank_layers_by_concentration
        from qzoom_swift.labels.tristate import sink_mask_from_norms

        maps = []
        for sample, grid in self.calibration:
            per = {}
            for layer in self.candidates:
                m = sample.per_layer[layer].mean(dim=0)
                if layer in sample.norms:
                    m = m * ~sink_mask_from_norms(sample.norms[layer].view(grid), self.opts.tau_norm).flatten()
                per[layer] = m
            maps.append(per)
        ranking = rank_layers_by_concentration(maps) if maps else [(layer, 1.0) for layer in self.candidates]
        chosen = sorted(layer for layer, _ in ranking[: max(1, self.opts.top_k)])
        self.selection = HeadSelection({layer: None for layer in chosen}, {}, source="auto")
        self.job["head_selection"] = self.selection.to_dict()
        self.job["auto_ranking"] = [[layer, round(score, 6)] for layer, score in ranking]
        self.job["auto_calibration_samples"] = len(maps)
        self.write_job(self.job)

    def restore(self, job: dict) -> None:
        self.job, self.family, self.sink_method = job, job.get("family"), job.get("sink_filter")
        self.t_loaded = time.perf_counter()

    def summarize(self) -> dict:
        elapsed = self.elapsed()
        work_s = time.perf_counter() - self.t_loaded
        records, out = self.records, self.out
        statuses = Counter(out.done.get(rid) for _, rid, _ in records if rid in out.done)
        counts = {"labelled": statuses.get(STATUS_OK, 0), **{s: statuses.get(s, 0) for s in IGNORED_STATUSES},
                  "rejected": statuses.get(STATUS_REJECTED, 0)}
        processed = self.processed
        return {
            "dataset": self.opts.dataset,
            "output": str(self.root),
            "model": self.opts.model,
            "family": self.family,
            "head_selection": self.job.get("head_selection"),
            "sink_filter": self.sink_method,
            "label_config": self.job["label_config"],
            "records_total": len(records),
            "records_done": sum(counts.values()),
            "complete": sum(counts.values()) == len(records),
            "outcomes": counts,
            "ignored": sum(counts[s] for s in IGNORED_STATUSES),
            "rejects_by_reason": dict(sorted(out.reject_reasons.items())),
            "shards": [p.name for p in out.shards()],
            "this_run": {
                "resumed_from": self.done_before,
                "processed": processed,
                "outcomes": dict(self.outcome),
                "seconds": round(elapsed, 3),
                "model_load_s": round(self.t_loaded - self.t_start, 3),
                "samples_per_s": round(processed / work_s, 4) if processed and work_s > 0 else None,
                "timing_s": {k: round(v, 3) for k, v in sorted(self.timing.items())},
            },
            "settings": self.settings,
        }


def _norm_layer(selection) -> int:
    """Layer whose input hidden states give the norm sink test: the lowest grounding layer."""
    return min(selection.grounding)


def run_pseudo_labels(opts: PseudoLabelOptions) -> dict:
    """Run (or resume) a pseudo-label job; returns the summary (also written to ``summary.json``)."""
    return PseudoLabelJob(opts).run()


__all__ = [
    "GROUNDING_INSTRUCTION", "JobError", "OutputDir", "Prepared", "PseudoLabelJob", "PseudoLabelOptions",
    "REJECT_REASONS", "Reject",
    "load_labelling_model", "prepare_record", "read_dataset", "record_id", "run_pseudo_labels",
    "set_max_visual_tokens",
]
