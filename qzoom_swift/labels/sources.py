"""``--dataset`` beyond one local jsonl: whatever ms-swift's own dataset loader accepts.

A local ``.jsonl``/``.json`` file never comes here (the jobs read it line by line, as before, so its ids and
resumes do not change). Anything else (a local dataset folder, ``path#N`` sub-sampling, ``path:subset``, a
hub id) goes through ``swift.dataset.load_dataset``, so ``--dataset`` means what it means to ``swift sft``.
The rows come back in ms-swift's standard shape; images may be ``{"bytes", "path"}`` dicts or PIL images,
and the jobs read image *paths*, so embedded bytes are written once into a cache folder of the job's output.
A LLaMA-Factory entry, ``path/to/dataset_info.json:NAME``, is read by LLaMA-Factory's own parser and converters
instead (``llamafactory_plugin.dataset_info``; no ms-swift needed).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from qzoom_swift.fileio import atomic_path
from qzoom_swift.hub import looks_like_hub_id

logger = logging.getLogger(__name__)

SAMPLE_SEED = 42
"""Seed of the ``path#N`` draw: ms-swift's default ``--data_seed``, so a rerun draws the same records."""
IMAGE_CACHE_DIR = "dataset-images"
"""Folder (in the job's output) of images that the dataset held as bytes, one file per content hash."""
_DROPPED_COLUMNS = ("dataset",)
"""Columns ms-swift adds for its own routing: not part of the record."""


class DatasetSourceError(RuntimeError):
    """A ``--dataset`` that ms-swift cannot load; the message names it."""


def is_local_file(spec: str) -> bool:
    """A plain local file: read by the jobs themselves, exactly as before."""
    return Path(os.path.expanduser(spec)).is_file()


LF_INFO_FILE = "dataset_info.json"


def lf_entry(spec: str) -> tuple[Path, str] | None:
    """(dataset_info.json path, entry name) of a ``path/to/dataset_info.json:NAME`` spec, else None."""
    path, sep, name = str(spec).rpartition(":")
    if sep and name and Path(path).name == LF_INFO_FILE:
        return Path(os.path.expanduser(path)), name
    return None


def _resolve_lf(spec: str) -> tuple[str, Path] | None:
    entry = lf_entry(spec)
    if entry is None:
        return None
    info, name = entry
    if not info.is_file():
        raise DatasetSourceError(f"dataset {spec}: {info} not found (a LLaMA-Factory dataset is given as "
                                 f"path/to/{LF_INFO_FILE}:NAME)")
    info = info.resolve()
    return f"{info}:{name}", info.parent


def resolve_source(spec: str) -> tuple[str, Path]:
    """(the spec with its local path made absolute, the folder relative image paths are resolved against).

    A local path part that does not exist and is no hub id (``owner/name``) is refused here, before any
    model is loaded; ms-swift's ``hf::``/``ms::`` prefixes, ``:subset`` and ``#N`` are kept as typed.
    """
    lf = _resolve_lf(spec)
    if lf is not None:
        return lf
    from qzoom_swift.extras import require_extra

    require_extra("swift", f"dataset {spec} (loaded through ms-swift's dataset loader; a plain local jsonl file "
                           "needs no extra)")
    from swift.dataset.dataset_syntax import DatasetSyntax

    try:
        syntax = DatasetSyntax.parse(os.path.expanduser(spec))
    except ValueError as exc:  # e.g. `path#abc`: ms-swift's int() error would not name the dataset
        raise DatasetSourceError(f"dataset {spec}: the part after '#' must be a whole number of records to draw "
                                 f"(ms-swift's path#N), e.g. {spec.rpartition('#')[0]}#100 ({exc})") from exc
    if syntax.dataset_sample is not None and syntax.dataset_sample < 1:
        raise DatasetSourceError(f"dataset {spec}: #{syntax.dataset_sample} draws no record; #N must be at least 1 "
                                 f"(or drop '#{syntax.dataset_sample}' to label every record: "
                                 f"{spec.rpartition('#')[0]})")
    local = Path(syntax.dataset)
    if local.exists():
        local = local.resolve()
        tail = (":" + "/".join(syntax.subsets) if syntax.subsets else "") + (
            f"#{syntax.dataset_sample}" if syntax.dataset_sample is not None else "")
        return str(local) + tail, local if local.is_dir() else local.parent
    if not looks_like_hub_id(syntax.dataset) or spec.startswith(("/", ".", "~")):
        raise DatasetSourceError(f"dataset {spec} not found (no such local file or folder, and not a hub id of "
                                 "the form owner/name)")
    return spec, Path.cwd()


def load_records(spec: str, cache_dir: Path, seed: int = SAMPLE_SEED) -> list[tuple[Any, Any]]:
    """(record, identity) per row, in the loaded order, through ``swift.dataset.load_dataset``.

    ``identity`` is the record with embedded images named by content hash instead of by cache path, so a
    record's id depends on the source only, not on where the job writes. ``#N`` is ms-swift's seeded draw; an
    ``N`` above the dataset's size is clamped to it (a warning says so): each record once, in the order of
    ``#<size>``, never ms-swift's repeated rows.
    """
    entry = lf_entry(spec)
    if entry is not None:
        from qzoom_swift.llamafactory_plugin.dataset_info import load_lf_records

        try:
            return [(record, record) for record in load_lf_records(*entry)]
        except ValueError as exc:
            raise DatasetSourceError(f"dataset {spec}: {exc}") from exc
    from swift.dataset.dataset_syntax import DatasetSyntax

    sample = DatasetSyntax.parse(spec).dataset_sample
    if sample is None:
        train = _load(spec, seed, shuffle=False)
    else:
        whole = spec.rpartition("#")[0]
        held = len(_load(whole, seed, shuffle=False))
        if sample > held > 0:  # ms-swift would repeat rows up to N: the same labels again, compute wasted
            logger.warning("dataset %s: #%d asks for more records than the %d it holds; labelling each of them "
                           "once, as %s#%d (ms-swift's own #N would repeat rows, duplicating labels)", spec, sample,
                           held, whole, held)
            spec = f"{whole}#{held}"
        train = _load(spec, seed, shuffle=True)  # ms-swift's seeded draw, as `swift sft` makes it
    out = []
    for row in train:
        record = {k: v for k, v in row.items() if k not in _DROPPED_COLUMNS and v is not None}
        identity = dict(record)
        if "images" in record:
            pairs = [_image_entry(entry, cache_dir) for entry in _as_list(record["images"])]
            record["images"] = [p for p, _ in pairs]
            identity["images"] = [i for _, i in pairs]
        out.append((record, identity))
    return out


def _load(spec: str, seed: int, shuffle: bool) -> Any:
    from swift.dataset import load_dataset

    try:
        train, _ = load_dataset([spec], seed=seed, shuffle=shuffle, num_proc=1)
    except Exception as exc:  # the hubs and `datasets` raise their own types (offline, not found, bad files)
        raise DatasetSourceError(
            f"cannot load dataset {spec!r} through ms-swift ({type(exc).__name__}: {str(exc)[:300]}). A hub id "
            "needs the network (or the hub's cache); offline, pass a local jsonl file or dataset folder") from exc
    return train


def _as_list(images: Any) -> list[Any]:
    return list(images) if isinstance(images, list | tuple) else [images]


def _image_entry(entry: Any, cache_dir: Path) -> tuple[Any, Any]:
    """(what ``prepare_record`` reads: a path, its identity); bytes and PIL images become cached files."""
    if isinstance(entry, dict):
        path, data = entry.get("path"), entry.get("bytes")
        if isinstance(path, str) and (data is None or Path(path).is_file()):
            return path, path
        if isinstance(data, bytes | bytearray):
            suffix = Path(path).suffix if isinstance(path, str) else ""
            return _cache_bytes(bytes(data), suffix or ".img", cache_dir)
        return entry, entry
    if hasattr(entry, "save") and hasattr(entry, "size"):  # a PIL image
        buf = io.BytesIO()
        entry.save(buf, format="PNG")
        return _cache_bytes(buf.getvalue(), ".png", cache_dir)
    return entry, entry


def _cache_bytes(data: bytes, suffix: str, cache_dir: Path) -> tuple[str, str]:
    """Write the image once (atomically) under its content hash; (its path, ``sha1:<hex>``)."""
    digest = hashlib.sha1(data).hexdigest()
    target = cache_dir / f"{digest}{suffix}"
    if not target.is_file():
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return str(target), f"sha1:{digest}"
