"""A LLaMA-Factory dataset (``dataset_info.json:NAME``) as the records the labelling jobs read.

``qzoom pseudo-labels / gate-labels / mine-hard --dataset data/dataset_info.json:NAME`` labels the data a
LLaMA-Factory user already has. The entry is read by LLaMA-Factory itself (``get_dataset_list``: formatting,
columns, tags) and each row goes through its own converter (sharegpt, alpaca, openai), so roles, the system
prompt and image paths (resolved against the ``dataset_info.json`` folder, its ``media_dir``) mean what they mean
to ``llamafactory-cli train``. The rows come back in ms-swift's record shape (``messages`` with system / user /
assistant turns, ``images``), which is what the jobs read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> list[dict]:
    """The raw rows of a local ``.json`` (a list, or one object per line) or ``.jsonl`` file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            pass  # LLaMA-Factory (datasets' json builder) also reads a .json holding one object per line
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_lf_records(info_path: Path, name: str) -> list[dict[str, Any]]:
    """ms-swift-shaped records of entry ``name`` of ``info_path``; a ValueError names what cannot be read."""
    from qzoom_swift.extras import require_extra

    require_extra("llamafactory", f"reading the LLaMA-Factory dataset {info_path}:{name}")
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    folder = Path(info_path).resolve().parent  # media paths resolve against it, as LLaMA-Factory's media_dir
    try:
        attr = get_dataset_list([name], str(folder))[0]
    except ValueError as exc:
        raise ValueError(f"{info_path}: {exc} (entries: {sorted(json.loads(info_path.read_text()))})") from exc
    if attr.load_from != "file":
        raise ValueError(f"{info_path}:{name} is a {attr.load_from} dataset; the labelling jobs read local files "
                         "(file_name) only: download it and point file_name at the file")
    if attr.formatting not in ("sharegpt", "alpaca", "openai") or attr.ranking:
        raise ValueError(f"{info_path}:{name}: formatting {attr.formatting!r}{' (ranking)' if attr.ranking else ''} "
                         "is not a supervised chat dataset (sharegpt, alpaca or openai)")
    data_file = folder / attr.dataset_name
    if not data_file.is_file():
        raise ValueError(f"{info_path}:{name}: file_name {attr.dataset_name} not found at {data_file} (a folder of "
                         "files is not read here: name one .json / .jsonl file)")
    data_args = DataArguments(dataset_dir=str(folder), media_dir=str(folder))
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    records = []
    for index, row in enumerate(read_rows(data_file)):
        try:
            aligned = converter(row)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{data_file} row {index}: not {attr.formatting} as {info_path}:{name} describes it "
                             f"({type(exc).__name__}: {exc})") from exc
        system = aligned.get("_system")
        messages = ([{"role": "system", "content": system}] if system else []) + list(aligned["_prompt"]) + \
            list(aligned["_response"])
        record: dict[str, Any] = {"messages": messages}
        if aligned.get("_images"):
            record["images"] = list(aligned["_images"])
        records.append(record)
    return records
