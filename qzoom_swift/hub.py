"""``--checkpoint`` as a local folder or a model-hub id, fetched through ms-swift's own download helper.

A branch checkpoint is a few MB of ``qzoom_branch.safetensors`` + ``qzoom_config.json``, published like any
model repo; ms-swift's ``safe_snapshot_download`` already knows the hubs (ModelScope by default, Hugging Face
with ``USE_HF=1``), their caches, tokens and offline modes, so ``--checkpoint owner/name`` means what
``--model owner/name`` means to ``swift``. Standard library only at import (``qzoom`` stays fast).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``owner/name``: one slash, no path syntax. Deeper relative paths are always local folders."""


class CheckpointNotFoundError(FileNotFoundError):
    """A ``--checkpoint`` that is neither a local folder nor downloadable; the message names it."""


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` whose ``owner`` is not a local folder (``runs/x`` with a ``runs/`` here is a path typo)."""
    return bool(HUB_ID.match(text)) and not Path(text.split("/", 1)[0]).is_dir()


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """The local folder of a checkpoint: ``path_or_id`` itself, or its hub snapshot (downloaded once, cached)."""
    text = os.fspath(path_or_id)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if not looks_like_hub_id(text):
        raise CheckpointNotFoundError(f"checkpoint {text} does not exist (not a folder here, and not a hub id "
                                      "of the form owner/name)")
    from qzoom_swift.extras import require_extra

    require_extra("swift", f"checkpoint {text!r} (a hub id: downloaded through ms-swift; or pass a local folder)")
    try:
        from swift.utils import safe_snapshot_download

        return Path(safe_snapshot_download(text))
    except Exception as exc:  # the hubs raise their own error types (network, offline, not found, auth)
        raise CheckpointNotFoundError(
            f"checkpoint {text!r} is not a local folder and could not be downloaded from the model hub "
            f"({type(exc).__name__}: {str(exc)[:300]}). Offline, download it where the hub is reachable "
            f"(`modelscope download --model {text} --local_dir DIR`, or `huggingface-cli download {text} "
            "--local-dir DIR` with USE_HF=1) and pass --checkpoint DIR") from exc
