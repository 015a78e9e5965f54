"""The model class LLaMA-Factory loads: a stock VLM class that attaches, freezes and trains the Q-Zoom branches.

LLaMA-Factory has no tuner or loss hook, so the model itself carries what ``--tuner_type qzoom`` does for
ms-swift: a model folder written by ``qzoom lf-model`` names, in ``config.json``, a remote-code class
``QZoom<Stock>(QZoomGenerationMixin, QZoomLFModelMixin, <Stock>)`` (``folder.py``), and this mixin

- attaches the branches in ``__init__`` from ``config.qzoom_config`` (so ``from_pretrained`` loads them from the
  folder's ``qzoom_branch.*`` tensors and every checkpoint LLaMA-Factory saves keeps them);
- freezes everything but the branch ``config.qzoom_train`` names (``finetuning_type: full`` plus the three
  ``freeze_*`` flags then leaves that branch alone trainable: LLaMA-Factory never sets ``requires_grad`` back);
  without ``qzoom_train`` (stage 2, inference) only the branches are frozen;
- routes ``forward`` on the pre-tokenized batch columns ``qzoom_gate`` / ``qzoom_rpn_labels`` +
  ``qzoom_rpn_grid`` to the core's branch loss (``training.branch_training_step``), and on ``qzoom_roi`` to
  the stock forward with the zoomed layout's positions (``post_sft.zoomed_position_ids``).

The method itself (branches, prefill, losses) is the core's; nothing here imports ms-swift.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch

from qzoom_swift.branches import attach_branches, branch_parameters, get_branches
from qzoom_swift.config import BRANCH_NAMES, QZoomConfig
from qzoom_swift.losses import IGNORE_INDEX
from qzoom_swift.training import TARGET_KEYS, branch_training_step, set_trained_branches, trained_branches

QZOOM_CONFIG_KEY = "qzoom_config"
"""``config.json`` key holding ``QZoomConfig.to_dict()`` (where the branches sit, inference knobs)."""
QZOOM_TRAIN_KEY = "qzoom_train"
"""``config.json`` key naming the branch(es) to train: "rpn", "gate", "rpn,gate", or null."""
QZOOM_BASE_KEY = "qzoom_base_model"
"""``config.json`` key recording the base model folder the Q-Zoom folder was written from (provenance)."""
BATCH_COLUMNS = ("qzoom_gate", "qzoom_rpn_labels", "qzoom_rpn_grid", "qzoom_roi")
"""The per-sample columns a pre-tokenized dataset hands ``forward`` (every one of fixed length)."""
COLUMNS_FOR = {"gate": ("qzoom_gate",), "rpn": ("qzoom_rpn_labels", "qzoom_rpn_grid")}
DATASET_FIX = ("write the dataset with `qzoom lf-dataset` (a pre-tokenized dataset whose qzoom_* columns have one "
               "fixed length) and train on it with `tokenized_path: <its folder>` and `remove_unused_columns: false`")


def parse_train(value: Any) -> tuple[str, ...]:
    """``qzoom_train`` ("rpn", "gate", "rpn,gate", null) as a tuple of branch names; a bad value names the fix."""
    if value is None or value == "":
        return ()
    names = tuple(x.strip() for x in str(value).split(",") if x.strip()) if isinstance(value, str) else tuple(value)
    bad = [n for n in names if n not in BRANCH_NAMES]
    if bad or not names:
        raise ValueError(f"config.json {QZOOM_TRAIN_KEY}={value!r}: expected 'rpn' (stage 1), 'gate' (stage 3), "
                         "'rpn,gate' or null (rewrite the folder with `qzoom lf-model BASE --out DIR --train rpn`)")
    return names


def rpn_label_maps(labels: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor | None]:
    """One tri-state map [rows, cols] per sample from the flat, -100-padded ``qzoom_rpn_labels`` column.

    A grid of 0 cells means "no RPN supervision for this sample" (None). The padding must be -100 only: a
    label past ``rows * cols`` means the grid column does not belong to the labels.
    """
    labels = torch.as_tensor(labels)
    grids = torch.as_tensor(grids).long()
    if labels.dim() != 2 or grids.dim() != 2 or grids.shape[-1] != 2 or grids.shape[0] != labels.shape[0]:
        raise ValueError(f"qzoom_rpn_labels {tuple(labels.shape)} / qzoom_rpn_grid {tuple(grids.shape)}: expected "
                         f"[batch, cells] and [batch, 2] (rows, cols); {DATASET_FIX}")
    maps: list[torch.Tensor | None] = []
    for i, (rows, cols) in enumerate(grids.tolist()):
        n = rows * cols
        if rows < 0 or cols < 0 or n > labels.shape[1]:
            raise ValueError(f"sample {i} of the batch: qzoom_rpn_grid {[rows, cols]} does not fit the "
                             f"{labels.shape[1]} cells of qzoom_rpn_labels; {DATASET_FIX}")
        if bool((labels[i, n:] != IGNORE_INDEX).any()):
            raise ValueError(f"sample {i} of the batch: qzoom_rpn_labels holds labels past the {n} cells of its "
                             f"grid {[rows, cols]} (padding must be {IGNORE_INDEX}); {DATASET_FIX}")
        maps.append(labels[i, :n].view(rows, cols).long() if n else None)
    return maps


def text_free_position_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """LLaMA-Factory's collator prepends the text positions to Qwen's MRoPE ids ([4, B, S]); the core takes [3, B, S]."""
    if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids


def launched_train_args() -> dict[str, Any] | None:
    """The arguments of the ``llamafactory-cli train`` run this process is (None outside one).

    Read with LLaMA-Factory's own ``read_args`` (the YAML/JSON in ``sys.argv`` plus ``key=value`` overrides), the
    way its launcher reads them: the model is built after the dataset is loaded but before the collator first runs,
    so this is where a dataset the collator would crash on can be refused with a useful message.
    """
    if "llamafactory.hparams" not in sys.modules:
        return None
    from llamafactory.hparams.parser import read_args

    try:
        args = read_args()
    except Exception:  # not launched from a config file (a Python API call, a test): nothing to check
        return None
    if isinstance(args, dict):
        return args
    flags = {a.lstrip("-"): b for a, b in zip(args, args[1:]) if a.startswith("--")}
    return flags or None


def check_launch_dataset(which: tuple[str, ...], args: dict[str, Any] | None) -> None:
    """Refuse, before training, a run whose batches could not carry the columns the branch needs.

    LLaMA-Factory drops extra columns unless the dataset is pre-tokenized and ``remove_unused_columns`` is false,
    and its collator crashes on a column whose rows differ in length: both are checked here, naming the fix.
    """
    if not which or not args or str(args.get("do_train", False)).lower() not in ("true", "1"):
        return  # chat / api / export of a folder: no training batches
    need = [c for b in which for c in COLUMNS_FOR[b]]
    if str(args.get("remove_unused_columns", True)).lower() not in ("false", "0"):
        raise ValueError(f"training the {','.join(which)} branch needs the columns {need} in the batches: set "
                         "`remove_unused_columns: false` in the recipe (the trainer drops them otherwise)")
    path = args.get("tokenized_path")
    if not path or not Path(path).exists():
        raise ValueError(f"training the {','.join(which)} branch needs a pre-tokenized dataset carrying {need} "
                         f"(tokenized_path {path!r} does not exist); {DATASET_FIX}")
    from qzoom_swift.llamafactory_plugin.data import check_tokenized

    lengths = check_tokenized(path)  # one length per qzoom_* column, or an error naming the column and the fix
    missing = [c for c in need if c not in lengths]
    if missing:
        raise ValueError(f"{path}: training the {','.join(which)} branch needs the column(s) {missing}, which this "
                         f"dataset lacks; {DATASET_FIX}")


class QZoomLFModelMixin:
    """Mixed in before a stock ``*ForConditionalGeneration``; see the module docstring for what it adds."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        raw = getattr(config, QZOOM_CONFIG_KEY, None)
        if not isinstance(raw, dict):
            raise ValueError(f"{type(self).__name__}: config.json has no {QZOOM_CONFIG_KEY!r} mapping; write the model "
                             "folder with `qzoom lf-model BASE --out DIR`")
        attach_branches(self, QZoomConfig.from_dict(raw))
        which = parse_train(getattr(config, QZOOM_TRAIN_KEY, None))
        set_trained_branches(self, which or None)
        check_launch_dataset(which, launched_train_args())
        if which:
            # The branch loss is a per-batch mean: the trainer must average it over accumulation steps.
            self.accepts_loss_kwargs = False
        self.qzoom_freeze()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The stock loader, then the freezing again (loading may replace parameters after ``__init__``)."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).qzoom_freeze()  # (model, info) with output_loading_info
        return loaded

    def qzoom_freeze(self) -> None:
        """Training a branch: everything else frozen. Otherwise (stage 2, inference): the branches frozen."""
        which = trained_branches(self) or ()
        if which:
            self.requires_grad_(False)
            for _, param in branch_parameters(self, which):
                param.requires_grad_(True)
        else:
            get_branches(self).requires_grad_(False)

    def __init_subclass__(cls, **kwargs):
        """Give each concrete class the stock checkpoint names and a ``forward`` with its stock class's signature.

        transformers' ``generate`` checks model kwargs against ``inspect.signature(forward)``, and the trainer
        reads it too; ``functools.wraps`` makes the signature the stock one while the qzoom_* columns pass
        through ``**kwargs``.
        """
        super().__init_subclass__(**kwargs)
        stock_cls = next((c for c in cls.__mro__[1:] if c.__module__.startswith("transformers.models.")), None)
        model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
        if stock_cls is not None and model_type:
            from qzoom_swift.families.compat import share_checkpoint_renames

            # base folders keep the stock (often legacy) tensor names
            share_checkpoint_renames(cls.__name__, stock_cls.__name__, model_type)
        if "forward" in vars(cls):
            return
        stock = super().forward

        @functools.wraps(stock)
        def forward(self, *args, **kwargs):
            return self._qzoom_forward(stock, *args, **kwargs)

        cls.forward = forward

    def _qzoom_forward(self, stock, *args, **kwargs):
        columns = {key: kwargs.pop(key, None) for key in BATCH_COLUMNS}
        which = trained_branches(self) or ()
        targets = {key: columns[key] for key in TARGET_KEYS}
        if which and not args and any(v is not None for v in targets.values()):
            return self._qzoom_branch_step(which, columns, kwargs)
        if which and self.training and kwargs.get("labels") is not None:
            missing = [c for b in which for c in COLUMNS_FOR[b] if columns[c] is None]
            raise ValueError(f"training the {','.join(which)} branch needs the column(s) {missing} in every batch, "
                             f"and this batch has none; {DATASET_FIX}")
        if columns["qzoom_roi"] is not None:
            from qzoom_swift.llamafactory_plugin.post_sft import zoomed_position_ids

            kwargs["position_ids"] = zoomed_position_ids(self, kwargs.get("input_ids"), kwargs.get("image_grid_thw"),
                                                         columns["qzoom_roi"], kwargs.get("position_ids"))
        return stock(self, *args, **kwargs)

    def _qzoom_branch_step(self, which: tuple[str, ...], columns: dict, kwargs: dict):
        for name in which:
            missing = [c for c in COLUMNS_FOR[name] if columns[c] is None]
            if missing:
                raise ValueError(f"training the {name} branch needs the column(s) {missing}; {DATASET_FIX}")
        maps = None
        if "rpn" in which:
            maps = rpn_label_maps(columns["qzoom_rpn_labels"], columns["qzoom_rpn_grid"])
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        kwargs["position_ids"] = text_free_position_ids(kwargs.get("position_ids"))
        return branch_training_step(self, which, qzoom_gate=columns["qzoom_gate"], qzoom_rpn_labels=maps, **kwargs)


__all__ = ["BATCH_COLUMNS", "DATASET_FIX", "QZOOM_BASE_KEY", "QZOOM_CONFIG_KEY", "QZOOM_TRAIN_KEY",
           "QZoomLFModelMixin", "check_launch_dataset", "launched_train_args", "parse_train", "rpn_label_maps", "text_free_position_ids"]
