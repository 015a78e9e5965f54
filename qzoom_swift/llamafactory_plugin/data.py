"""``qzoom lf-dataset``: a labelling job's output as a LLaMA-Factory dataset, in both of its forms.

LLaMA-Factory keeps only input_ids / attention_mask / labels / images on its normal data path, so Q-Zoom's
targets (``qzoom_gate``, ``qzoom_rpn_labels`` + ``qzoom_rpn_grid``, ``qzoom_roi``) reach ``forward`` only
through a pre-tokenized dataset (``tokenized_path`` + ``remove_unused_columns: false``) whose extra columns
have one length across rows. One export writes, under ``DIR``:

- ``NAME.json`` (ShareGPT: ``messages`` with ``<image>`` in the user turn, ``images``; the ``qzoom_*`` columns
  beside them) and ``dataset_info.json`` (its entry), for reading, eval and LLaMA-Factory's own loader;
- ``tokenized/``: the same rows tokenized in-process by LLaMA-Factory's own converter, template, mm_plugin and
  supervised processor (the tokens its trainer would build), plus the fixed-length ``qzoom_*`` columns;
- ``images/``: every image pre-resized to the grid it trains at (contract 4), so LLaMA-Factory's processing,
  with the manifest's ``image_max_pixels`` / ``image_min_pixels``, leaves it there. Stage 1 follows the
  ms-swift template's rule (``swift_plugin.templates._show_training_image``): the label map's grid, unless the
  row asks for its own budget. Stage 2 rows get two images, the source at its Post-SFT budget and the crop at
  the RoI budget (what ``post_sft.roi_training_sequence`` builds); ``llamafactory_plugin.post_sft`` turns
  LLaMA-Factory's positions of that layout into Q-Zoom's continuous RoI positions in ``forward``;
- ``rejects.jsonl`` (rows LLaMA-Factory would drop or cut, with the reason) and ``qzoom_lf_dataset.json``
  (the manifest: what was exported, and the settings a recipe must repeat).

The export is written into a staging folder and renamed into place: ``DIR`` is either absent, the previous
export, or the finished new one. A finished ``DIR`` is replaced only with ``force``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.fileio import write_json_atomic

MANIFEST_FILE = "qzoom_lf_dataset.json"
TOKENIZED_DIR = "tokenized"
IMAGES_DIR = "images"
REJECTS_FILE = "rejects.jsonl"
IGNORE = -100
DEFAULT_CUTOFF_LEN = 8192
"""Longest row in tokens (LLaMA-Factory's ``cutoff_len``); a longer row is rejected, never cut (cutting a
multimodal row drops image tokens)."""
DEFAULT_IMAGE_MAX_PIXELS = 4096 * 4096
"""LLaMA-Factory downsizes images above ``image_max_pixels`` (default 768 x 768, below a 1,280-token budget):
exported images are already at their grid, so the export and its recipes raise the bound out of the way."""
DEFAULT_IMAGE_MIN_PIXELS = 32 * 32
"""LLaMA-Factory's default; every exported image is larger (Qwen: >= 4 tokens = 56 x 56)."""

STAGE_OF_KIND = {"pseudo-labels": 1, "mine-hard": 2, "gate-labels": 3}
TRAIN_OF_STAGE = {1: "rpn", 2: None, 3: "gate"}
CONTRACT_COLUMNS = ("qzoom_gate", "qzoom_rpn_labels", "qzoom_rpn_grid", "qzoom_roi")
FIXED_LENGTHS = {"qzoom_rpn_grid": 2, "qzoom_roi": 6}
"""[rows, cols] of the label map; [x0, y0, x1, y1] grid box + [src_rows, src_cols]."""


class ExportError(RuntimeError):
    """A problem with the whole export (input, model, output folder); the message names it and the fix."""


@dataclass
class LFExportOptions:
    job: str
    model: str
    template: str
    out: str
    name: str | None = None
    force: bool = False
    cutoff_len: int = DEFAULT_CUTOFF_LEN
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
    image_min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS
    rpn_cells: int | None = None
    """Fixed length of ``qzoom_rpn_labels``; None = the largest map of the export."""
    roi_noise: float | None = None
    """Stage 2: chance of replacing a stored box by a random one (None = ``QZOOM_ROI_NOISE``, as ms-swift)."""
    seed: int = 0
    progress: bool = True


@dataclass
class Row:
    """One exported sample before tokenization: ShareGPT messages, images at their grid, the contract columns."""

    index: int
    rid: str
    messages: list[dict]
    images: list[Any]
    grids: list[tuple[int, int]]
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rejected:
    index: int
    rid: str
    reason: str
    detail: str


# ------------------------------------------------------------------------------------------ job output


HEAVY_COLUMNS = ("qzoom_attn", "qzoom_sink_attn", "qzoom_vis_norm")
"""Per-row maps a pseudo-label shard keeps for inspection; the export never needs them."""


def iter_rows(files: list[Path]):
    """The rows of the job's training files, one at a time, without the inspection maps (a large job stays small)."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    for key in HEAVY_COLUMNS:
                        row.pop(key, None)
                    yield row


def read_job(job_dir: Path) -> tuple[str, dict, list[Path]]:
    """(kind, job.json, the files of training rows) of a finished labelling job: what its ms-swift recipe trains on."""
    from qzoom_swift.labels.gate_job import GATE_TRAIN_FILE
    from qzoom_swift.labels.jobs import JOB_FILE, SUMMARY_FILE
    from qzoom_swift.labels.mining import POST_SFT_FILE

    job_path = job_dir / JOB_FILE
    if not job_path.is_file():
        raise ExportError(f"{job_dir} holds no {JOB_FILE}: pass the --out folder of `qzoom pseudo-labels`, "
                          "`qzoom gate-labels` or `qzoom mine-hard`")
    job = json.loads(job_path.read_text())
    kind = job.get("kind") or job.get("settings", {}).get("kind")
    if kind not in STAGE_OF_KIND:
        raise ExportError(f"{job_path}: job kind {kind!r} has no LLaMA-Factory export; expected one of "
                          f"{sorted(STAGE_OF_KIND)}")
    if kind == "pseudo-labels":
        files = sorted(job_dir.glob("shard-*.jsonl"))
        if not files or not (job_dir / SUMMARY_FILE).is_file():
            raise ExportError(f"{job_dir}: the pseudo-label job has not finished (no {SUMMARY_FILE}; a sharded job "
                              "writes it once every part is done): rerun its command to finish it (it resumes), "
                              "or `qzoom merge-shards` for a sharded one")
    else:
        name = GATE_TRAIN_FILE if kind == "gate-labels" else POST_SFT_FILE
        if not (job_dir / name).is_file():
            raise ExportError(f"{job_dir} has no {name}: the {kind} job writes it when it finishes; rerun its "
                              "command to finish it (it resumes)")
        files = [job_dir / name]
    return kind, job, files


def _job_base_dir(job: dict, job_dir: Path) -> Path:
    """The folder relative image paths of the job's records are resolved against (its dataset's folder)."""
    dataset = (job.get("settings") or {}).get("dataset") or (job.get("options") or {}).get("dataset")
    if isinstance(dataset, str):
        path = Path(os.path.expanduser(dataset))
        if path.is_file():
            return path.parent
        if path.is_dir():
            return path
    return job_dir


# ------------------------------------------------------------------------------------------ rows


def _sharegpt_messages(record: dict, answer: str | None, image_tags: int) -> list[dict] | str:
    """The record's chat as ShareGPT messages with ``image_tags`` ``<image>`` tags where its image is; or why not."""
    messages = [m for m in record.get("messages") or [] if isinstance(m, dict)]
    out: list[dict] = []
    tagged = False
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            return f"message content of role {role!r} is not text"
        if role == "user" and not tagged:
            if content.count("<image>") > 1:
                return f"{content.count('<image>')} <image> tags for one image"
            content = content.replace("<image>", "<image>" * image_tags) if "<image>" in content \
                else "<image>" * image_tags + content  # ms-swift puts an untagged image first
            tagged = True
        elif "<image>" in content:
            return f"an <image> tag outside the first user turn (role {role!r})"
        out.append({"role": role, "content": content})
    if not tagged:
        return "no user turn"
    if out[-1]["role"] != "assistant":
        if not answer:
            return "no assistant answer to train on"
        out.append({"role": "assistant", "content": str(answer)})
    return out


def _budget_tokens(kwargs: dict | None, unit: int) -> tuple[int, int] | None:
    """(min, max) visual tokens of a row's ``chat_template_kwargs`` pixel budget, or None without one."""
    kwargs = kwargs or {}
    if "min_pixels" not in kwargs and "max_pixels" not in kwargs:
        return None
    area = unit * unit
    lo = math.ceil(int(kwargs.get("min_pixels", area)) / area)
    hi = math.floor(int(kwargs.get("max_pixels", kwargs.get("min_pixels", area))) / area)
    return max(1, lo), max(1, lo, hi)


class RowBuilder:
    """Turns job records into :class:`Row` s for one model: images at their grid, the contract columns."""

    def __init__(self, kind: str, family: str, processor, model_config: dict, qzoom_config, roi_noise: float,
                 seed: int):
        from qzoom_swift.families import get_adapter

        self.kind, self.family, self.processor = kind, family, processor
        self.adapter = get_adapter(family)
        self.fixed = self.adapter.spec.fixed_resolution
        self.config, self.model_config = qzoom_config, model_config
        self.roi_noise, self.rng = roi_noise, random.Random(seed)

    # ---- images
    def _fixed_size(self) -> tuple[int, int]:
        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        if crop.get("height"):
            return int(crop["width"]), int(crop["height"])
        side = int((getattr(ip, "size", None) or {}).get("shortest_edge"))
        return side, side

    def _grid(self, image) -> tuple[int, int]:
        if self.fixed:
            side = math.isqrt(int(self.model_config.get("image_seq_length") or 576))
            return side, side
        unit = self.adapter.patch_unit
        return image.height // unit, image.width // unit

    def _final(self, image):
        """A fixed-size family's image at the processor's size (it would resize the padded square there)."""
        if self.fixed and image.size != self._fixed_size():
            return image.resize(self._fixed_size(), resample=3)
        return image

    def _at_budget(self, image, budget: tuple[int, int]):
        return self._final(self.adapter.resize_for_budget(image, budget[0], budget[1]))

    def _stage1_image(self, image, rec: dict):
        """The ms-swift template's rule (``adapter.stage1_image``): padded as labelled, at the label grid unless the
        row asks for its own budget (then training resamples the labels, ``training.resample_label_map``)."""
        pad = bool(rec.get("qzoom_pad_square"))
        budget = _budget_tokens(rec.get("chat_template_kwargs"), self.adapter.patch_unit)
        if budget is not None:
            return self._at_budget(self.adapter.stage1_image(image, self.processor, pad_square=pad), budget)
        labels = rec.get("qzoom_rpn_labels")
        grid = (len(labels), len(labels[0])) if labels else rec.get("qzoom_attn_grid")
        if not grid:
            raise ValueError("a stage-1 row needs qzoom_rpn_labels or qzoom_attn_grid (its label grid)")
        return self._final(self.adapter.stage1_image(image, self.processor, pad_square=pad,
                                                     grid_hw=tuple(int(v) for v in grid)))

    # ---- rows
    def build(self, index: int, rec: dict, base_dir: Path) -> Row | Rejected:
        from qzoom_swift.labels.jobs import Reject, prepare_record

        rid = str(rec.get("qzoom_id") or rec.get("qzoom_gate_meta", {}).get("id") or index)
        prepared = prepare_record(rec, base_dir, None, "a LLaMA-Factory export")
        if isinstance(prepared, Reject):
            return Rejected(index, rid, prepared.reason, prepared.detail)
        image = prepared.image
        stage = STAGE_OF_KIND[self.kind]
        messages = _sharegpt_messages(rec, rec.get("qzoom_answer"), 2 if stage == 2 else 1)
        if isinstance(messages, str):
            return Rejected(index, rid, "bad_messages", messages)
        try:
            if stage == 1:
                images, columns = [self._stage1_image(image, rec)], self._rpn_columns(rec)
            elif stage == 3:
                budget = _budget_tokens(rec.get("chat_template_kwargs"), self.adapter.patch_unit)
                shown = self.adapter.source_image(image, self.processor)
                images = [self._at_budget(shown, budget) if budget else self._final(shown)]
                columns = {"qzoom_gate": int(rec["qzoom_gate"])}
            else:
                images, columns = self._stage2(image, rec)
        except (ValueError, KeyError, TypeError) as exc:
            return Rejected(index, rid, "bad_row", f"{type(exc).__name__}: {exc}")
        return Row(index, rid, messages, images, [self._grid(im) for im in images], columns)

    def _rpn_columns(self, rec: dict) -> dict:
        labels = rec.get("qzoom_rpn_labels")
        if labels:
            grid = [len(labels), len(labels[0])]
            flat = [int(v) for r in labels for v in r]
            if any(len(r) != grid[1] for r in labels):
                raise ValueError("qzoom_rpn_labels rows differ in length")
        else:  # a sample ignored at labelling: no valid cell, still a branch-loss row (an exact zero)
            grid = [int(v) for v in rec["qzoom_attn_grid"]]
            flat = [IGNORE] * (grid[0] * grid[1])
        return {"qzoom_rpn_labels": flat, "qzoom_rpn_grid": grid}

    def _stage2(self, original, rec: dict) -> tuple[list, dict]:
        """[source at its Post-SFT budget, crop at the RoI budget] and ``qzoom_roi``, as Post-SFT builds them."""
        from qzoom_swift.post_sft import random_roi, roi_grid_box
        from qzoom_swift.roi import PixelBox, crop_image

        roi = rec.get("qzoom_roi")
        if not roi or not roi.get("box"):
            raise ValueError("the row has no stored qzoom_roi (mine-hard keeps only zoomed rows)")
        if self.roi_noise > 0 and self.rng.random() < self.roi_noise:
            roi = random_roi(self.rng)
        cfg = self.config
        budget = _budget_tokens(rec.get("chat_template_kwargs"), self.adapter.patch_unit) \
            or (cfg.low_min_tokens, cfg.low_max_tokens)
        source = self._at_budget(self.adapter.source_image(original, self.processor), budget)
        src_grid = self._grid(source)
        box = roi_grid_box(roi, src_grid)
        pixel_box = PixelBox.from_normalized(tuple(roi["box"]), *original.size)
        crop = self.adapter.prepare_crop(crop_image(original.convert("RGB"), pixel_box), self.processor,
                                         cfg.roi_min_tokens, cfg.roi_max_tokens)
        return [source, self._final(crop)], {"qzoom_roi": [box.x0, box.y0, box.x1, box.y1, *src_grid]}


# ------------------------------------------------------------------------------------------ LLaMA-Factory


class LFTokenizer:
    """LLaMA-Factory's own pipeline for one ShareGPT row: dataset_info entry -> converter -> supervised processor."""

    def __init__(self, model: str, template: str, dataset_dir: Path, name: str, image_max_pixels: int,
                 image_min_pixels: int):
        from transformers import HfArgumentParser

        from qzoom_swift.extras import require_extra

        require_extra("llamafactory", "qzoom lf-dataset")
        from llamafactory.data import get_template_and_fix_tokenizer
        from llamafactory.data.converter import get_dataset_converter
        from llamafactory.data.parser import get_dataset_list
        from llamafactory.data.processor import SupervisedDatasetProcessor
        from llamafactory.hparams import DataArguments, ModelArguments
        from llamafactory.model import load_tokenizer

        parser = HfArgumentParser((ModelArguments, DataArguments))
        model_args, data_args = parser.parse_dict({
            "model_name_or_path": model, "trust_remote_code": True, "template": template,
            "dataset": name, "dataset_dir": str(dataset_dir), "cutoff_len": 1 << 30,
            "image_max_pixels": image_max_pixels, "image_min_pixels": image_min_pixels})
        module = load_tokenizer(model_args)
        self.tokenizer, self.processor = module["tokenizer"], module["processor"]
        if self.processor is None:
            raise ExportError(f"{model}: LLaMA-Factory loads no multimodal processor from it")
        self.template = get_template_and_fix_tokenizer(self.tokenizer, data_args)
        attr = get_dataset_list([name], str(dataset_dir))[0]
        self.converter = get_dataset_converter(attr.formatting, attr, data_args)
        self.worker = SupervisedDatasetProcessor(template=self.template, tokenizer=self.tokenizer,
                                                 processor=self.processor, data_args=data_args)

    def encode(self, example: dict) -> dict | None:
        """LLaMA-Factory's tokenization of one row (None: it drops the row as malformed)."""
        aligned = self.converter(example)
        out = self.worker.preprocess_dataset({k: [v] for k, v in aligned.items()})
        if not out.get("input_ids"):
            return None
        return {k: v[0] for k, v in out.items()}


def _image_runs(ids: list[int], image_token: int) -> list[int]:
    runs, n = [], 0
    for t in ids:
        if t == image_token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs + ([n] if n else [])


def _check_grids(ids: list[int], image_token: int, grids: list[tuple[int, int]], fixed: bool) -> str | None:
    """Why LLaMA-Factory's tokens do not show the images at their grid (None when they do)."""
    want = [h * w for h, w in grids]
    runs = _image_runs(ids, image_token)
    ok = sum(runs) == sum(want) if fixed else runs == want
    if ok:
        return None
    return (f"LLaMA-Factory encoded the images as {runs} visual tokens, the training grids {grids} need {want}: the "
            "processor resized them (raise --image-max-pixels / lower --image-min-pixels, and the recipe's, or "
            "check the processor's own min/max pixels)")


# ------------------------------------------------------------------------------------------ fixed-length columns


def fixed_length_columns(rows: list[dict], lengths: dict[str, int] | None = None) -> dict[str, int]:
    """{column: length} of the ``qzoom_*`` list columns, padding ``qzoom_rpn_labels`` with -100 to one length.

    LLaMA-Factory's collator pads only its own columns; a ragged extra column crashes it with an unrelated
    message, so a column whose rows differ (or exceed ``lengths``) is refused here, naming the row and the fix.
    """
    lengths = dict(lengths or {})
    present = [c for c in CONTRACT_COLUMNS if any(c in r for r in rows)]
    for column in present:
        missing = [i for i, r in enumerate(rows) if column not in r]
        if missing:
            raise ValueError(f"column {column}: rows {missing[:5]} lack it while others have it; every row of one "
                             "pre-tokenized dataset carries the same qzoom_* columns (export one stage per dataset)")
        sizes = [len(r[column]) if isinstance(r[column], list) else None for r in rows]
        if column == "qzoom_gate":
            if any(s is not None for s in sizes):
                raise ValueError("column qzoom_gate must hold one int (0/1) per row")
            lengths[column] = 1  # a scalar: one value per row
            continue
        if None in sizes:
            raise ValueError(f"column {column}: row {sizes.index(None)} holds no list; {column} is a list per row")
        if column == "qzoom_rpn_labels":
            want = lengths.get(column) or max(sizes)
            over = [(i, s) for i, s in enumerate(sizes) if s > want]
            if over:
                raise ValueError(f"column qzoom_rpn_labels: row {over[0][0]} has {over[0][1]} cells, more than the "
                                 f"fixed length {want}: raise --rpn-cells to at least {max(s for _, s in over)} "
                                 "(or leave it out: the largest map sets it)")
            for r in rows:
                r[column] = list(r[column]) + [IGNORE] * (want - len(r[column]))
        else:
            want = FIXED_LENGTHS[column]
            bad = [k for k, s in enumerate(sizes) if s != want]
            if bad:
                raise ValueError(f"column {column}: row {bad[0]} has length {sizes[bad[0]]}, not {want}; LLaMA-Factory's "
                                 f"collator needs one length per extra column ({column}: {want})")
        lengths[column] = want
    return lengths


def check_tokenized(path: str | Path) -> dict[str, int]:
    """Check a pre-tokenized dataset (``tokenized_path``) before training: its ``qzoom_*`` columns have one length.

    What the export guarantees, checked on any saved dataset (one built by hand included); the error names the
    column and a row instead of the collator's tensor-conversion crash. Reads the Arrow lengths only (a fixed-size
    column is fixed by its type), so a large dataset is checked in moments. Returns {column: length}.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    splits = data.values() if isinstance(data, DatasetDict) else [data]
    out: dict[str, int] = {}
    for split in splits:
        for column in (c for c in split.column_names if c.startswith("qzoom_")):
            values = split.data.column(column)
            if values.null_count:
                row = values.is_null().to_pylist().index(True)
                raise ValueError(f"{path}: column {column} is empty at row {row}; every row needs a value (re-export "
                                 "with `qzoom lf-dataset`)")
            if pa.types.is_fixed_size_list(values.type):
                out[column] = values.type.list_size
                continue
            if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
                out[column] = 1  # one scalar per row
                continue
            lengths = pc.list_value_length(values)
            low, high = (v.as_py() for v in pc.min_max(lengths).values())
            if low != high:
                sizes = lengths.to_pylist()
                other = next(i for i, n in enumerate(sizes) if n != sizes[0])
                raise ValueError(f"{path}: column {column} is not fixed-length (row 0: {sizes[0]}, row {other}: "
                                 f"{sizes[other]}); LLaMA-Factory's collator would crash on it. Re-export with "
                                 "`qzoom lf-dataset`, which pads qzoom_rpn_labels with -100 to one length")
            out[column] = int(high or 0)
    return out


# ------------------------------------------------------------------------------------------ export


def _model_config(model: str) -> dict:
    path = Path(model) / "config.json"
    if not path.is_file():
        raise ExportError(f"--model {model}: no config.json there (pass a local model folder: the base model or "
                          "the one `qzoom lf-model` wrote)")
    return json.loads(path.read_text())


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_FILE).is_file():
            raise ExportError(f"--out {out} is not empty and holds no {MANIFEST_FILE} of an earlier export: choose "
                              "an empty or new folder")
        if not force:
            raise ExportError(f"--out {out} holds a finished export; pass --force to replace it, or choose another "
                              "--out")


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames only: at every moment ``out`` is the old or the new export."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _column_lengths(stage: int, files: list[Path], rpn_cells: int | None) -> tuple[dict[str, int], int]:
    """(the fixed length of each ``qzoom_*`` column, the number of rows), known before any row is tokenized."""
    cells, rows = [1], 0
    for rec in iter_rows(files):
        rows += 1
        labels, grid = rec.get("qzoom_rpn_labels"), rec.get("qzoom_attn_grid")
        if stage == 1 and labels:
            cells.append(len(labels) * len(labels[0]))
        elif stage == 1 and grid:
            cells.append(int(grid[0]) * int(grid[1]))
    if stage == 3:
        return {"qzoom_gate": 1}, rows
    if stage == 2:
        return {"qzoom_roi": FIXED_LENGTHS["qzoom_roi"]}, rows
    need = max(cells)
    if rpn_cells is not None and rpn_cells < need:
        raise ValueError(f"column qzoom_rpn_labels: a row has {need} cells, more than the fixed length {rpn_cells}: "
                         f"raise --rpn-cells to at least {need} (or leave it out: the largest map sets it)")
    return {"qzoom_rpn_labels": rpn_cells or need, "qzoom_rpn_grid": FIXED_LENGTHS["qzoom_rpn_grid"]}, rows


def _arrow_features(lengths: dict[str, int]):
    """The tokenized rows' schema: the qzoom_* columns as fixed-size lists (LLaMA-Factory's collator needs them)."""
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "attention_mask": Sequence(Value("int32")),
                     "labels": Sequence(Value("int32")), "images": Sequence(Value("string")),
                     "videos": Value("null"), "audios": Value("null"),
                     **{c: (Value("int32") if c == "qzoom_gate" else Sequence(Value("int32"), length=n))
                        for c, n in lengths.items()}})


def _manifest(opts: LFExportOptions, kind: str, job_dir: Path, out: Path, family: str, name: str, kept: int,
              rejects: list, lengths: dict[str, int], noise: float) -> dict[str, Any]:
    """What was exported, and the recipe keys a ``llamafactory-cli train`` run on it must repeat."""
    stage = STAGE_OF_KIND[kind]
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return {
        "format": 1, "kind": kind, "stage": stage, "qzoom_train": TRAIN_OF_STAGE[stage], "job": str(job_dir),
        "model": str(Path(opts.model).resolve()), "family": family, "template": opts.template, "name": name,
        "rows": kept, "rejected": len(rejects), "rejects": counts, "columns": lengths,
        "cutoff_len": opts.cutoff_len, "image_max_pixels": opts.image_max_pixels,
        "image_min_pixels": opts.image_min_pixels, "roi_noise": noise if stage == 2 else None,
        "recipe": {"dataset_dir": str(out), "dataset": name, "tokenized_path": str(out / TOKENIZED_DIR),
                   "remove_unused_columns": False, "template": opts.template, "cutoff_len": opts.cutoff_len,
                   "image_max_pixels": opts.image_max_pixels, "image_min_pixels": opts.image_min_pixels}}


def _write_rows(files: list, total: int, builder: RowBuilder, lf: LFTokenizer, opts: LFExportOptions,
                staging: Path, out: Path, name: str, image_token: int, lengths: dict[str, int], features, kind: str,
                base_dir: Path) -> tuple[int, list[Rejected]]:
    """Build, tokenize and write each row (ShareGPT file + Arrow file + rejects), one row in memory at a time."""
    from datasets.arrow_writer import ArrowWriter
    from tqdm import tqdm

    arrow_path = staging / "rows.arrow"
    rejects: list[Rejected] = []
    kept = 0
    writer = ArrowWriter(features=features, path=str(arrow_path))
    with open(staging / f"{name}.json", "w", encoding="utf-8") as shared, \
            open(staging / REJECTS_FILE, "w", encoding="utf-8") as rejected:
        shared.write("[")
        for index, rec in enumerate(tqdm(iter_rows(files), total=total, desc=f"lf-dataset {kind}", unit="row",
                                         disable=not opts.progress)):
            row = builder.build(index, rec, base_dir)
            if not isinstance(row, Rejected):
                paths = [f"{IMAGES_DIR}/{kept:06d}-{k}.png" for k in range(len(row.images))]
                for path, image in zip(paths, row.images):
                    image.convert("RGB").save(staging / path)
                example = {"messages": row.messages, "images": paths}
                row = _tokenized_row(lf, row, example, opts.cutoff_len, image_token, builder.fixed)
                if isinstance(row, Rejected):
                    for path in paths:
                        (staging / path).unlink()
            if isinstance(row, Rejected):
                rejects.append(row)
                rejected.write(json.dumps(row.__dict__, ensure_ascii=False) + "\n")
                continue
            encoded, columns = row
            fixed_length_columns([columns], lengths)  # pads qzoom_rpn_labels; refuses a wrong length
            shared.write(("," if kept else "") + "\n" + json.dumps({**example, **columns, "qzoom_id": encoded.pop(
                "qzoom_id")}, ensure_ascii=False))
            writer.write({**encoded, "images": [str(out / p) for p in example["images"]], "videos": None,
                          "audios": None, **columns})
            kept += 1
        shared.write("\n]\n")
    writer.finalize()
    writer.close()
    return kept, rejects


def export_lf_dataset(opts: LFExportOptions) -> dict[str, Any]:
    """Export one labelling job for ``llamafactory-cli train``; returns the manifest (also ``DIR/qzoom_lf_dataset.json``).

    Rows stream to disk (the ShareGPT file and an Arrow file), so a large job is never held in memory.
    """
    import datasets
    from datasets import Dataset, DatasetDict

    from qzoom_swift.config import QZoomConfig, effective_config, read_env
    from qzoom_swift.families.registry import family_for_model_type

    if not opts.progress:
        datasets.disable_progress_bars()
    job_dir, out = Path(opts.job).resolve(), Path(opts.out).resolve()
    kind, job, files = read_job(job_dir)
    stage = STAGE_OF_KIND[kind]
    name = opts.name or f"qzoom_stage{stage}"
    _prepare_out(out, opts.force)
    model_config = _model_config(opts.model)
    family = family_for_model_type(model_config.get("model_type"))
    if family is None:
        raise ExportError(f"--model {opts.model}: model_type {model_config.get('model_type')!r} is no Q-Zoom family")
    try:
        base = QZoomConfig.from_dict(model_config["qzoom_config"]) if model_config.get("qzoom_config") else None
        qz_config = effective_config(base)
    except ValueError as exc:
        raise ExportError(f"Q-Zoom settings of {opts.model}: {exc}") from exc
    noise = read_env().roi_noise if opts.roi_noise is None else float(opts.roi_noise)
    lengths, total = _column_lengths(stage, files, opts.rpn_cells)
    features = _arrow_features(lengths)

    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / IMAGES_DIR).mkdir(parents=True)
    arrow_path = staging / "rows.arrow"
    try:
        entry = {"file_name": f"{name}.json", "formatting": "sharegpt",
                 "columns": {"messages": "messages", "images": "images"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant", "system_tag": "system"}}
        write_json_atomic(staging / "dataset_info.json", {name: entry})
        lf = LFTokenizer(opts.model, opts.template, staging, name, opts.image_max_pixels, opts.image_min_pixels)
        builder = RowBuilder(kind, family, lf.processor, model_config, qz_config, noise, opts.seed)
        image_token = int(model_config.get("image_token_id", model_config.get("image_token_index", -1)))
        base_dir = _job_base_dir(job, job_dir)
        kept, rejects = _write_rows(files, total, builder, lf, opts, staging, out, name, image_token, lengths,
                                    features, kind, base_dir)
        if not kept:
            reasons = sorted({r.reason for r in rejects})
            raise ExportError(f"{job_dir}: no row could be exported ({len(rejects)} rejected: {reasons}); see the "
                              f"reasons in the rejects")
        train = Dataset.from_file(str(arrow_path))
        DatasetDict({"train": train}).save_to_disk(str(staging / TOKENIZED_DIR))
        del train
        arrow_path.unlink()
        manifest = _manifest(opts, kind, job_dir, out, family, name, kept, rejects, lengths, noise)
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _tokenized_row(lf: LFTokenizer, row: Row, example: dict, cutoff_len: int, image_token: int,
                   fixed: bool) -> tuple[dict, dict] | Rejected:
    """(LLaMA-Factory's tokens, the row's columns), or why LLaMA-Factory would drop or cut the row."""
    try:
        encoded = lf.encode(example)
    except Exception as exc:  # LLaMA-Factory's plugins raise ValueError, OSError, PIL errors...
        return Rejected(row.index, row.rid, "lf_error", f"{type(exc).__name__}: {str(exc)[:300]}")
    if encoded is None:
        return Rejected(row.index, row.rid, "lf_dropped", "LLaMA-Factory drops it (roles must alternate "
                        "user/assistant and end with one assistant turn)")
    n = len(encoded["input_ids"])
    if n > cutoff_len:
        return Rejected(row.index, row.rid, "too_long", f"{n} tokens > cutoff_len {cutoff_len}; LLaMA-Factory would "
                        "cut it (and its image tokens): raise --cutoff-len and the recipe's cutoff_len, or drop the row")
    bad_grid = _check_grids(encoded["input_ids"], image_token, row.grids, fixed)
    if bad_grid:
        return Rejected(row.index, row.rid, "grid_changed", bad_grid)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": encoded["labels"], "qzoom_id": row.rid}, dict(row.columns)
