"""Resumable labelling/mining jobs over ms-swift datasets: record ids, record parsing and sharded output.

Every long job (stage-1 pseudo labels, stage-3 gate trajectories, stage-2 mining) reads an ms-swift jsonl,
writes one output line per record into ``shard-NNNNN.jsonl`` files (or a reject into ``rejects.jsonl``)
and must survive a crash: a record's id is its line index plus a hash of its content, each line is
written in one ``write``, flushed and fsynced, and on start the shards are scanned for finished ids and a
partial last line is cut off. A rerun of the same command continues without duplicates or gaps.

:class:`LabelJob` is the run loop they share (output dir, ``job.json``, resume scan, fixed blocks, progress,
summary); :class:`ReferenceJob` adds what the jobs that score answers against a reference have in common.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qzoom_swift.failures import (
    MAX_CONSECUTIVE_FAILURES,
    OOM_REASON,
    is_out_of_memory,
    model_failure_reason,
    release_memory,
)
from qzoom_swift.fileio import append_jsonl_line, write_json_atomic
from qzoom_swift.labels.sources import (
    IMAGE_CACHE_DIR,
    DatasetSourceError,
    is_local_file,
    load_records,
    resolve_source,
)

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
REJECTS_FILE = "rejects.jsonl"
SHARD_PATTERN = "shard-{:05d}.jsonl"
_SHARD_RE = re.compile(r"^shard-(?:(p\d+of\d+)-)?(\d{5})\.jsonl$")
_REJECTS_RE = re.compile(r"^rejects(?:-(p\d+of\d+))?\.jsonl$")
_PART_SUMMARY_RE = re.compile(r"^summary-(p\d+of\d+)\.json$")
_HEAD_RE = re.compile(r'^\{"qzoom_id": "([^"]+)", "qzoom_status": "([^"]+)"')
_REASON_RE = re.compile(r'"reason": "([^"]+)"')
STATUS_REJECTED = "rejected"
FINGERPRINT_KEY = "dataset_fingerprint"
"""``job.json`` key of the dataset's content fingerprint (:func:`file_fingerprint`)."""


class JobError(RuntimeError):
    """A problem with the whole job (settings, output directory, model): nothing per-record."""


@dataclass(kw_only=True)
class RunOptions:
    """What every job's options share: where the model runs, and which part of the records this process labels.

    ``num_shards`` / ``shard_index`` split a job over independent processes (a Slurm array, one per GPU);
    under ``torchrun --nproc_per_node N`` (or ms-swift's ``NPROC_PER_NODE=N``) they come from ``RANK`` and
    ``WORLD_SIZE``. None = one process labels everything.
    """

    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    num_shards: int | None = None
    shard_index: int | None = None


@dataclass(frozen=True)
class Part:
    """One process's share of a job: the blocks ``k`` with ``k % count == index`` (blocks of ``batch_size``).

    Whole blocks are assigned, so every batch is the batch an uninterrupted single process builds and a
    sharded run computes exactly its results.
    """

    index: int
    count: int

    @property
    def tag(self) -> str:
        """The file-name mark of this part's outputs (``shard-p1of4-00000.jsonl``, ``rejects-p1of4.jsonl``)."""
        return f"p{self.index}of{self.count}"

    def owns(self, block_number: int) -> bool:
        return block_number % self.count == self.index


def resolve_part(opts: Any) -> tuple[Part | None, int | None]:
    """(this process's part or None, the torchrun local rank or None): explicit flags first, then torchrun."""
    from qzoom_swift.config import read_launch_rank

    count, index = getattr(opts, "num_shards", None), getattr(opts, "shard_index", None)
    try:
        launch = read_launch_rank()
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    local_rank = launch.local_rank if launch else None
    if count is None and index is None:
        return (Part(launch.rank, launch.world_size) if launch else None), local_rank
    if count is None or index is None:
        raise JobError("--num-shards and --shard-index go together (e.g. --num-shards 8 --shard-index 3)")
    if count < 1 or not 0 <= index < count:
        raise JobError(f"--shard-index {index} --num-shards {count}: need 0 <= shard index < number of shards")
    return (Part(index, count) if count > 1 else None), local_rank


DEFAULT_TEXT_TOKENS = 4096
"""Default ``--max-prompt-tokens``: the job's visual budget plus this many text tokens (capped by the context)."""


def record_id(index: int, record_text: str) -> str:
    """``<line index>-<12 hex of sha1 of the record's canonical JSON>``: stable across reruns."""
    return f"{index}-{hashlib.sha1(record_text.encode('utf-8')).hexdigest()[:12]}"


def _canonical(record: Any) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def read_dataset(path: Path) -> list[tuple[int, str, Any]]:
    """(index, id, record or None for bad JSON) for every record of a jsonl file or a json list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read dataset {path}: {exc}") from exc
    out: list[tuple[int, str, Any]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError(f"dataset {path} is not valid JSON ({exc}); a .jsonl file holds one record per line") \
                from exc
        if not isinstance(data, list):
            raise JobError(f"{path}: a .json dataset must be a list of records")
        for i, rec in enumerate(data):
            out.append((i, record_id(i, _canonical(rec)), rec))
        return out
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append((i, record_id(i, _canonical(rec)), rec))
        except json.JSONDecodeError:
            out.append((i, record_id(i, line), None))
    return out


@dataclass
class Reject:
    reason: str
    detail: str


@dataclass
class Prepared:
    """A record ready for the model: chat messages (processor format) and the loaded image."""

    messages: list[dict]
    image: Any
    image_path: str


def _image_path(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
        return entry["path"]
    return None


def prepare_record(record: Any, base_dir: Path, rewrite_question: Callable[[str], str] | None = None,
                   what: str = "this job") -> Prepared | Reject:
    """Check one single-image record and build its chat prompt; a :class:`Reject` says what is wrong with it.

    ``rewrite_question`` may change the text after the image (the stage-1 grounding prompt does).
    """
    from PIL import Image

    if record is None:
        return Reject("bad_json", "the line is not valid JSON")
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return Reject("bad_messages", "expected an object with a 'messages' list (ms-swift format)")
    images = record.get("images") or []
    if isinstance(images, str | dict):
        images = [images]
    if not images:
        return Reject("no_image", "the record has no image")
    if len(images) > 1:
        return Reject("multi_image", f"{len(images)} images; {what} handles one image per record")
    messages = record["messages"]
    system = next((m.get("content") for m in messages[:1] if isinstance(m, dict) and m.get("role") == "system"),
                  None)
    user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None or not isinstance(user.get("content"), str) or not user["content"].strip():
        return Reject("no_question", "no user turn with text content")
    text = user["content"]
    tags = text.count("<image>")
    if tags > 1:
        return Reject("image_tag_mismatch", f"{tags} <image> tags for one image")
    before, after = text.split("<image>", 1) if tags == 1 else ("", text)
    if rewrite_question is not None:
        after = rewrite_question(after)
    raw_path = _image_path(images[0])
    if raw_path is None or raw_path.startswith(("http://", "https://", "data:")):
        return Reject("unsupported_image", f"image {str(images[0])[:80]!r}: only local file paths are supported")
    path = Path(os.path.expanduser(raw_path))
    if not path.is_absolute():
        path = base_dir / path if (base_dir / path).exists() else Path.cwd() / path
    if not path.is_file():
        return Reject("missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        if is_out_of_memory(exc):  # a sound image too large for this machine: not the file's fault
            return Reject(OOM_REASON, f"decoding image {path}: {type(exc).__name__}: {exc}")
        return Reject("unreadable_image", f"cannot read image {path}: {type(exc).__name__}: {exc}")
    content = []
    if before.strip():
        content.append({"type": "text", "text": before})
    content.append({"type": "image"})
    if after.strip():
        content.append({"type": "text", "text": after})
    chat = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if isinstance(system, str) else [])
    chat.append({"role": "user", "content": content})
    return Prepared(chat, image, str(path))


def _scan_jsonl(path: Path, repair: bool = True) -> list[tuple[str, str, str | None]]:
    """(id, status, reason) of every complete line; a partial or unparsable last line is cut off the file.

    ``repair=False`` reads another process's file: its last line may be in mid-write and is skipped, never cut.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    out = []
    good_end = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: the last line was cut in mid-write
        line = data[pos:nl].decode("utf-8", errors="replace")
        head = _HEAD_RE.match(line)
        if head is None or not line.endswith("}"):
            if repair and data.find(b"\n", nl + 1) >= 0:
                raise JobError(f"{path}: corrupted line in the middle of the file (byte {pos}); cannot resume, "
                               "use --overwrite to start again")
            break
        if nl + 1 >= len(data):  # last complete line: parse it fully, a crash can leave odd bytes
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
        reason = _REASON_RE.search(line[:400])
        out.append((head.group(1), head.group(2), reason.group(1) if reason else None))
        pos = good_end = nl + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return out


class OutputDir:
    """Shards + rejects of one job: resume scan, appends, shard rotation.

    With a :class:`Part`, this process appends only to its own files (``shard-p1of4-NNNNN.jsonl``,
    ``rejects-p1of4.jsonl``) but reads every part's, so ``done`` is the whole job's progress.
    """

    def __init__(self, root: Path, shard_size: int, part: Part | None = None):
        self.root = root
        self.shard_size = shard_size
        self.part = part
        self.done: dict[str, str] = {}  # id -> status
        self.reject_reasons: Counter = Counter()
        self._shard_f = None
        self._shard_index = 0
        self._shard_count = 0
        self._rejects_f = None

    @property
    def _tag(self) -> str | None:
        return self.part.tag if self.part else None

    def shards(self) -> list[Path]:
        """Every part's shard files (the job's output), in name order."""
        return sorted(p for p in self.root.iterdir() if _SHARD_RE.match(p.name))

    def rejects_files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if _REJECTS_RE.match(p.name))

    def _shard_name(self, index: int) -> str:
        return f"shard-{self._tag}-{index:05d}.jsonl" if self._tag else SHARD_PATTERN.format(index)

    def _rejects_name(self) -> str:
        return f"rejects-{self._tag}.jsonl" if self._tag else REJECTS_FILE

    def scan(self) -> None:
        """Read every part's shards and rejects; only this process's own files are repaired (cut)."""
        self.done, self.reject_reasons = {}, Counter()
        own_count = None
        for path in self.shards():
            mine = _SHARD_RE.match(path.name).group(1) == self._tag
            entries = _scan_jsonl(path, repair=mine)
            for rid, status, _ in entries:
                if rid in self.done:
                    raise JobError(f"{path}: record {rid} appears twice in the output; use --overwrite")
                self.done[rid] = status
            if mine:
                self._shard_index = int(_SHARD_RE.match(path.name).group(2))
                own_count = self._shard_count = len(entries)
        for path in self.rejects_files():
            for rid, _status, reason in _scan_jsonl(path, repair=_REJECTS_RE.match(path.name).group(1) == self._tag):
                self.done[rid] = STATUS_REJECTED
                self.reject_reasons[reason or "unknown"] += 1
        if own_count is not None and self._shard_count >= self.shard_size:
            self._shard_index, self._shard_count = self._shard_index + 1, 0

    def write_record(self, data: dict) -> None:
        if self._shard_f is None or self._shard_count >= self.shard_size:
            if self._shard_f is not None:
                self._shard_f.close()
                self._shard_index, self._shard_count = self._shard_index + 1, 0
            self._shard_f = open(self.root / self._shard_name(self._shard_index), "a", encoding="utf-8")
        append_jsonl_line(self._shard_f, data)
        self._shard_count += 1
        self.done[data["qzoom_id"]] = data["qzoom_status"]

    def write_reject(self, rid: str, index: int, reject: Reject) -> None:
        if self._rejects_f is None:
            self._rejects_f = open(self.root / self._rejects_name(), "a", encoding="utf-8")
        append_jsonl_line(self._rejects_f, {"qzoom_id": rid, "qzoom_status": STATUS_REJECTED, "reason": reject.reason,
                                      "index": index, "detail": reject.detail})
        self.done[rid] = STATUS_REJECTED
        self.reject_reasons[reject.reason] += 1

    def close(self) -> None:
        for f in (self._shard_f, self._rejects_f):
            if f is not None:
                f.close()
        self._shard_f = self._rejects_f = None


def _is_job_output(name: str) -> bool:
    """A file every job writes (any part's shards, rejects and summaries, job.json, temporaries)."""
    return (name in (JOB_FILE, SUMMARY_FILE) or name.endswith(".tmp") or bool(
        _SHARD_RE.match(name) or _REJECTS_RE.match(name) or _PART_SUMMARY_RE.match(name)))


def prepare_out_dir(out: str | Path, overwrite: bool, settings: dict, resume_keys: tuple[str, ...],
                    job_name: str, own_files: tuple[str, ...] = (),
                    dataset: Path | None = None, part: Part | None = None) -> tuple[Path, dict | None]:
    """Create/validate the output dir; returns (dir, the previous job.json when resuming).

    A non-empty directory that is not a job of this kind is never touched without ``overwrite``; a job
    with other settings (``resume_keys``) is not resumed. ``own_files`` are the job's other outputs
    (e.g. ``gate_train.jsonl``), which ``overwrite`` deletes too. ``dataset`` is the job's input file: an
    earlier job with the same content fingerprint read the same dataset, wherever it was. A ``part`` of a
    sharded job never deletes (the other parts write beside it) and tolerates their files appearing.
    """
    root = Path(out)
    if overwrite and part is not None:
        raise JobError(f"--overwrite with several shards would delete the other processes' output while they "
                       f"write it: delete {root} first (or start a new --out), then start the shards without "
                       "--overwrite")
    if root.exists() and not root.is_dir():
        raise JobError(f"output {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    entries = [p for p in root.iterdir() if not p.name.endswith(".tmp")]
    job_path = root / JOB_FILE
    if overwrite:
        for p in root.iterdir():
            if p.name in own_files or (_is_job_output(p.name) and p.is_file()):
                p.unlink()
            elif p.name == IMAGE_CACHE_DIR and p.is_dir():
                shutil.rmtree(p)
        leftover = [p.name for p in root.iterdir()]
        if leftover:
            raise JobError(f"--overwrite removed this job's files from {root}, but it also holds {leftover[:5]}: "
                           "choose an empty or new output directory")
        return root, None
    if not entries or (part is not None and not job_path.is_file() and
                       all(_is_job_output(p.name) or p.name == IMAGE_CACHE_DIR for p in entries)):
        return root, None  # new, or another part of this job is starting beside this one
    if not job_path.is_file():
        raise JobError(f"output directory {root} is not empty and holds no {JOB_FILE} of a {job_name} job: "
                       "pass --overwrite to start a new job there (its shards, rejects and summary are deleted), "
                       "or choose another --out")
    try:
        previous = json.loads(job_path.read_text())
    except json.JSONDecodeError as exc:
        raise JobError(f"{job_path} is not valid JSON ({exc}): restore it, or choose another --out") from exc
    same_content = dataset is not None and previous.get(FINGERPRINT_KEY) == file_fingerprint(dataset)
    diff = settings_diff(previous.get("settings", {}), settings, resume_keys, same_content)
    if diff:
        shown = "; ".join(f"{k}: earlier {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise JobError(f"{root} holds a {job_name} job with different settings ({shown}). To continue it, rerun "
                       "with the earlier values; to keep it and start a new job, choose another --out. Only if its "
                       "results are no longer wanted, --overwrite deletes them and starts again here")
    return root, previous


PATH_SETTINGS = ("dataset", "model", "checkpoint", "judge_model")
"""Settings that name files or folders: equal when they resolve to the same place, however they were typed."""


def _same_path(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return Path(os.path.expanduser(a)).resolve() == Path(os.path.expanduser(b)).resolve()
    except (OSError, RuntimeError):
        return False


def settings_diff(old: dict, new: dict, keys: tuple[str, ...], same_dataset_content: bool = False) -> dict:
    """``{key: (earlier, now)}`` for the resume settings that really differ.

    Paths are compared resolved (jobs written before paths were stored resolved recorded them as typed); a
    dataset at another path with the same content fingerprint is the same dataset.
    """
    diff = {}
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, list) and isinstance(b, tuple) or isinstance(a, tuple) and isinstance(b, list):
            a, b = list(a), list(b)
        if a == b or (k in PATH_SETTINGS and _same_path(a, b)) or (k == "dataset" and same_dataset_content):
            continue
        diff[k] = (old.get(k), new.get(k))
    return diff


def file_fingerprint(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes (a dataset's identity, wherever it is stored)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def text_tokens(processor: Any, messages: list[dict]) -> int:
    """Tokens of a prepared chat prompt without its visual tokens (each image placeholder counts as written)."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def model_context(model: Any) -> int | None:
    """The language model's context length (``max_position_embeddings``), or None when it does not say."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def question_text(messages: list[dict]) -> str:
    """The text of the user turn of a prepared chat (image parts dropped): what a judge reads."""
    user = next(m for m in messages if m["role"] == "user")
    return " ".join(part["text"].strip() for part in user["content"] if part.get("type") == "text").strip()


def assistant_answer(record: dict, default: Any = None) -> Any:
    """The content of the record's last assistant turn (the reference answer); ``default`` without one."""
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return message.get("content")
    return default


Block = list[tuple[int, str, Any]]
"""A fixed run of ``batch_size`` input records: (line index, id, record or None)."""


class LabelJob:
    """The run loop of a resumable job; subclasses fill in the hooks.

    The loop is shared so every job resumes the same way: the output directory is checked before the
    (slow) model load, finished ids are scanned once, and records are cut into fixed blocks of
    ``batch_size`` *input* records, so a resumed run batches (and pads) exactly as an uninterrupted one
    and computes the same answers; a block cut by a crash is recomputed whole, only its missing lines are
    written. Hooks: :meth:`configure` (check options, find the dataset; the resume settings),
    :meth:`setup` (load the model, :meth:`write_job`), :meth:`check_resume`, :meth:`process_block` (one
    block with unfinished records), :meth:`finish` (after the last block) and :meth:`summarize`.
    """

    job_name = "labelling"
    """How ``prepare_out_dir``'s messages name the job (``a pseudo-label job``)."""
    kind = "labelling"
    """The subcommand, recorded in ``job.json`` (``qzoom merge-shards`` finds the job's code by it)."""
    progress_desc = "records"
    progress_unit = "rec"
    own_files: tuple[str, ...] = ()
    """The job's outputs besides shards, rejects, job.json and summary.json (deleted by ``--overwrite``)."""

    def __init__(self, opts: Any):
        self.opts = opts
        self.t_start = time.perf_counter()
        self.dataset = Path(opts.dataset)
        self.base_dir = self.dataset.parent
        """Where relative image paths are looked up: the dataset file's folder, or the dataset folder."""
        self.root = Path(opts.out)
        self.settings: dict = {}
        self.previous: dict | None = None
        self.records: Block = []
        self.out = OutputDir(self.root, opts.shard_size)
        self.done_before = 0
        self.processed = 0
        self.consecutive_failures = 0
        self.bar: Any = None
        self.part: Part | None = None
        self.local_rank: int | None = None
        self.t_ready = self.t_start

    # ----------------------------------------------------------------------------------------- hooks

    def configure(self) -> dict:
        """Check the options and find the dataset (:meth:`find_dataset`); returns the job's settings."""
        raise NotImplementedError

    def setup(self) -> None:
        """Load what the job runs (model, judge) and write ``job.json`` (:meth:`write_job`)."""
        raise NotImplementedError

    def check_resume(self) -> None:
        """Refuse to continue earlier output that does not fit the records (after the scan); default: accept."""

    def process_block(self, block: Block) -> None:
        """Compute one block (at least one record not done) and write its unfinished records."""
        raise NotImplementedError

    def finish(self) -> None:
        """Write whatever the blocks held back (after the last block, before the output is closed)."""

    def summarize(self) -> dict:
        """The summary (written to ``summary.json`` and returned)."""
        raise NotImplementedError

    def restore(self, job: dict) -> None:
        """Set what :meth:`summarize` needs from ``job.json`` instead of a loaded model (``qzoom merge-shards``)."""

    # ----------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        """Run (or resume) the job; returns the summary, also written to ``summary.json``.

        A part of a sharded job labels its own blocks, writes ``summary-pIofN.json``, and merges the whole
        job's ``summary.json`` (and the job's other outputs) when it finds every part done.
        """
        self.t_start = time.perf_counter()
        self.part, self.local_rank = resolve_part(self.opts)
        self.settings = self.configure()
        self.root, self.previous = prepare_out_dir(self.opts.out, self.opts.overwrite, self.settings,
                                                   self.opts.RESUME_KEYS, self.job_name, self.own_files,
                                                   self.dataset if self.dataset.is_file() else None, self.part)
        try:
            self.setup()
            self.records = self.read_records()[: self.opts.limit]
        except BaseException:
            if self.previous is None and self.part is None:  # a failed start leaves nothing to refuse a rerun
                (self.root / JOB_FILE).unlink(missing_ok=True)
                shutil.rmtree(self.root / IMAGE_CACHE_DIR, ignore_errors=True)
            raise
        self.t_ready = time.perf_counter()
        self.out = OutputDir(self.root, self.opts.shard_size, self.part)
        self.out.scan()
        self.check_resume()
        blocks = self.own_blocks()
        self.done_before = sum(1 for block in blocks for _, rid, _ in block if self.is_done(rid))
        self.bar = self._progress_bar(sum(len(block) for block in blocks))
        try:
            for block in blocks:
                if not all(self.is_done(rid) for _, rid, _ in block):
                    self.process_block(block)
            self.finish()
        finally:
            self.out.close()
            self.bar.close()
        if self.part is not None:
            return self._finish_part(blocks)
        summary = self.summarize()
        summary["labelling_s"] = self.labelling_seconds()
        write_json_atomic(self.root / SUMMARY_FILE, summary)
        return summary

    def labelling_seconds(self) -> float:
        """This run's time after the model load and dataset read (what sharding divides)."""
        return round(time.perf_counter() - self.t_ready, 3)

    def own_blocks(self) -> list[Block]:
        """The fixed blocks of ``batch_size`` input records this process labels (all of them without a part)."""
        bs = self.opts.batch_size
        blocks = [self.records[start:start + bs] for start in range(0, len(self.records), bs)]
        return [b for number, b in enumerate(blocks) if self.part is None or self.part.owns(number)]

    def _finish_part(self, blocks: list[Block]) -> dict:
        """This part's summary; the merged job summary too when a fresh scan finds every part done."""
        mine = [rid for block in blocks for _, rid, _ in block]
        part = {"part": self.part.tag, "shard_index": self.part.index, "num_shards": self.part.count,
                "records": len(mine), "records_done": sum(1 for rid in mine if self.is_done(rid)),
                "resumed_from": self.done_before, "processed": self.processed,
                "seconds": round(self.elapsed(), 3), "labelling_s": self.labelling_seconds()}
        write_json_atomic(self.root / f"summary-{self.part.tag}.json", part)
        merged = self.merge_if_complete()
        return merged if merged is not None else {**part, "complete": False, "output": str(self.root)}

    def merge_if_complete(self) -> dict | None:
        """The job's ``summary.json`` (and other outputs) once every record is done by some part, else None."""
        self.out = OutputDir(self.root, self.opts.shard_size, self.part)
        self.out.scan()
        missing = [rid for _, rid, _ in self.records if not self.is_done(rid)]
        if missing:
            return None
        summary = self.summarize()
        summary["parts"] = [json.loads(p.read_text()) for p in sorted(self.root.glob("summary-p*of*.json"))]
        write_json_atomic(self.root / SUMMARY_FILE, summary)
        return summary

    def _progress_bar(self, total: int):
        from tqdm import tqdm

        desc = self.progress_desc + (f" [{self.part.tag}]" if self.part is not None else "")
        return tqdm(total=total, initial=self.done_before, desc=desc,
                    unit=self.progress_unit, dynamic_ncols=True, disable=not self.opts.progress)

    # ----------------------------------------------------------------------------------------- helpers

    def find_dataset(self, absolute: bool = True) -> Path:
        """The dataset file, resolved (also into ``opts.dataset``, so ``job.json`` records where it really is).

        ``jobs/x.jsonl`` and its absolute path are then one setting, and a resume is not refused over how the
        path was typed. A JobError when there is no such file. Anything else ms-swift loads (a dataset folder,
        ``path#N``, a hub id) is resolved by :func:`sources.resolve_source` and read through ms-swift.
        """
        if not is_local_file(str(self.opts.dataset)):
            try:
                spec, self.base_dir = resolve_source(str(self.opts.dataset))
            except DatasetSourceError as exc:
                raise JobError(str(exc)) from exc
            self.dataset = Path(spec)  # never a file: no content fingerprint, the spec itself is the setting
            self.opts.dataset = spec
            return self.dataset
        dataset = Path(os.path.expanduser(str(self.opts.dataset)))
        if absolute:
            dataset = dataset.resolve()
        if not dataset.is_file():
            raise JobError(f"dataset {dataset} not found")
        self.dataset, self.base_dir = dataset, dataset.parent
        if absolute:
            self.opts.dataset = str(dataset)
        return dataset

    def merge(self) -> dict:
        """``qzoom merge-shards``: the job's ``summary.json`` and other outputs from every part's files.

        No model is loaded (:meth:`restore` reads what the summary needs from ``job.json``); a job with
        records still missing is an error that says how many, and which parts have not finished.
        """
        self.t_start = time.perf_counter()
        self.settings = self.configure()
        self.root = Path(self.opts.out)
        self.restore(json.loads((self.root / JOB_FILE).read_text()))
        self.records = self.read_records()[: self.opts.limit]
        merged = self.merge_if_complete()
        if merged is not None:
            return merged
        missing = [n for n, (_, rid, _) in enumerate(self.records) if not self.is_done(rid)]
        counts = {int(m.group(1)) for p in self.root.iterdir()
                  if (m := re.match(r"^(?:shard|rejects|summary)-p\d+of(\d+)", p.name))}
        blocks = sorted({n // self.opts.batch_size for n in missing})
        where = (f"shards {sorted({b % c for b in blocks for c in counts})} of {sorted(counts)}" if counts
                 else f"blocks {blocks[:8]}")
        raise JobError(f"{len(missing)} of {len(self.records)} records are not done yet ({where}): start or resume "
                       "those shards (rerun their command), then merge again")

    def read_records(self) -> Block:
        """(index, id, record) of the dataset: a local file line by line, anything else through ms-swift."""
        if self.dataset.is_file():
            return read_dataset(self.dataset)
        try:
            rows = load_records(str(self.opts.dataset), self.root / IMAGE_CACHE_DIR)
        except DatasetSourceError as exc:
            raise JobError(str(exc)) from exc
        return [(i, record_id(i, _canonical(identity)), rec) for i, (rec, identity) in enumerate(rows)]

    def write_job(self, job: dict) -> None:
        """Write ``job.json``, with the dataset's content fingerprint (a moved, unchanged dataset still resumes).

        It also keeps the job's kind and every option, so ``qzoom merge-shards`` can rebuild the job.
        """
        from dataclasses import asdict, is_dataclass

        job.setdefault("kind", self.kind)
        if is_dataclass(self.opts):
            job["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.opts).items()
                              if k not in ("overwrite", "num_shards", "shard_index")}
        if self.dataset.is_file():
            job.setdefault(FINGERPRINT_KEY, file_fingerprint(self.dataset))
        write_json_atomic(self.root / JOB_FILE, job)

    def model_device(self) -> str:
        """``--device`` made concrete (under torchrun, auto is this process's GPU, ``cuda:LOCAL_RANK``)."""
        from qzoom_swift.loading import ModelLoadError, resolve_device

        try:
            return resolve_device(self.opts.device, self.local_rank)
        except ModelLoadError as exc:
            raise JobError(str(exc)) from exc

    def is_done(self, rid: str) -> bool:
        return rid in self.out.done

    def is_rejected(self, rid: str) -> bool:
        """A record rejected by this or an earlier run: it never enters a model batch again."""
        return self.out.done.get(rid) == STATUS_REJECTED

    # ----------------------------------------------------------------------------------------- model guard

    def prompt_limit(self, context: int | None, visual_tokens: int) -> int:
        """``--max-prompt-tokens``, or by default the visual budget plus DEFAULT_TEXT_TOKENS, within the context."""
        limit = getattr(self.opts, "max_prompt_tokens", None)
        if limit:
            return int(limit)
        auto = int(visual_tokens) + DEFAULT_TEXT_TOKENS
        return min(auto, int(context)) if context else auto

    def guarded_results(self, items: list[tuple[int, str]], prompt_tokens: list[int], limit: int,
                        run: Callable[[list[int]], list[Any]]) -> list[Any]:
        """``run`` over the items that fit, batched; a Reject (written) for each item that is too long or fails.

        ``items`` are (line index, id), ``prompt_tokens`` their (upper-bound) prompt lengths, checked before
        any forward pass: one over-long record would otherwise cost memory quadratic in its length (eager
        attention) and kill every resume. ``run(positions)`` returns one result per position; when the batch
        raises (out of memory included), the items run one by one and the one that still fails is rejected
        with the error, while the others are answered.
        """
        out: list[Any] = [None] * len(items)
        fit = []
        for k, ((index, rid), n) in enumerate(zip(items, prompt_tokens)):
            if n > limit:
                out[k] = self._reject_once(rid, index, Reject(
                    "prompt_too_long", f"{n} prompt tokens (text + visual budget) > the limit {limit} "
                    "(--max-prompt-tokens)"))
            else:
                fit.append(k)
        if not fit:
            return out
        try:
            for k, result in zip(fit, run(fit)):
                out[k] = result
            self.consecutive_failures = 0
            return out
        except Exception as exc:  # any failure inside the model is this batch's, not the job's
            if len(fit) == 1:
                out[fit[0]] = self._model_failure(items[fit[0]], exc)
                return out
            release_memory()
        for k in fit:
            try:
                out[k] = run([k])[0]
                self.consecutive_failures = 0
            except Exception as exc:
                out[k] = self._model_failure(items[k], exc)
        return out

    def _model_failure(self, item: tuple[int, str], exc: Exception) -> Reject:
        """The reject of a record that failed inside the model; a model that fails on every record stops the job."""
        release_memory()
        index, rid = item
        self.consecutive_failures += 1
        if self.consecutive_failures > MAX_CONSECUTIVE_FAILURES:
            raise JobError(f"the model failed on {self.consecutive_failures} records in a row (last: line {index}: "
                           f"{type(exc).__name__}: {exc}); this is not one bad record, stopping") from exc
        reason = model_failure_reason(exc)
        return self._reject_once(rid, index, Reject(reason, f"{type(exc).__name__}: {str(exc)[:500]}"))

    def _reject_once(self, rid: str, index: int, reject: Reject) -> Reject:
        if not self.is_done(rid):
            self.write_reject(rid, index, reject)
        return reject

    def write_record(self, data: dict) -> None:
        self.out.write_record(data)
        self.processed += 1
        self.bar.update(1)

    def write_reject(self, rid: str, index: int, reject: Reject) -> None:
        self.out.write_reject(rid, index, reject)
        self.processed += 1
        self.bar.update(1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


class ReferenceJob(LabelJob):
    """A job that scores the model's answers against each record's reference answer (gate-labels, mine-hard)."""

    purpose = "this job"
    """How a multi-image reject names the job (``... handles one image per record``)."""
    no_reference = "no assistant answer to score against"
    """The detail of a ``no_ground_truth`` reject."""

    def reference(self, record: dict) -> Any:
        """The record's reference answer (its last assistant turn), or None/empty when it has none."""
        return assistant_answer(record)

    def scorable(self, block: Block) -> list[tuple[int, str, Any, Prepared, Any]]:
        """(index, id, record, prepared, reference) of the block's usable records; the others are rejected.

        Finished records stay in the list (the batch must be the one an uninterrupted run builds); a
        reject is written only for a record that is not done.
        """
        ready = []
        for i, rid, rec in block:
            if self.is_rejected(rid):
                continue  # rejected earlier (e.g. it failed inside the model): never run again
            prepared = prepare_record(rec, self.base_dir, None, self.purpose)
            gt = self.reference(rec) if isinstance(rec, dict) else None
            if isinstance(prepared, Reject) or not gt:
                if not self.is_done(rid):
                    self.write_reject(rid, i, prepared if isinstance(prepared, Reject) else
                                      Reject("no_ground_truth", self.no_reference))
                continue
            ready.append((i, rid, rec, prepared, gt))
        return ready

    def load_judge(self) -> Any:
        """The LLM judge of ``--judge-model`` (loaded through ms-swift), or None to use the rule matcher."""
        if not self.opts.judge_model:
            return None
        from qzoom_swift.labels.judge import LLMJudge

        return LLMJudge(self.opts.judge_model, self.opts.judge_model_type,
                        max_batch_size=getattr(self.opts, "judge_batch_size", 8))
