"""``QZoomModel``: the plain-Python entry point (no ms-swift needed).

It holds a stock transformers model with the branches attached, its processor and the family adapter,
and exposes one prefill that yields the gate probability, the heatmaps and the KV cache together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qzoom_swift.branches import attach_branches, require_branches
from qzoom_swift.checkpoint import is_branch_checkpoint, load_branch_checkpoint, save_branch_checkpoint
from qzoom_swift.config import BRANCH_WEIGHTS_NAME, QZoomConfig, effective_config
from qzoom_swift.families import FamilyAdapter, get_adapter
from qzoom_swift.prefill import BranchPrefill, continue_prefill, prefill
from qzoom_swift.zoom import ZoomStats

SWIFT_ARGS_NAME = "args.json"
PLUGIN_FILE = Path(__file__).resolve().parent / "swift_plugin" / "plugin.py"
"""``qzoom plugin-path`` (located here without importing the plugin package, which imports the jobs)."""


def write_swift_adapter_args(directory: str | os.PathLike, family: str, base_model: str | None = None) -> Path | None:
    """ms-swift's ``args.json`` for a branch checkpoint written outside ``swift sft`` (kept if one exists).

    ``swift infer/deploy --adapters DIR`` takes a folder as an adapter only for its own tuners or when the
    folder's ``args.json`` names the tuner; this one names ``qzoom``, the Q-Zoom model type and template,
    the plugin file and the base model (each used only when not given on the command line).
    """
    from importlib import metadata

    from qzoom_swift.families.registry import get_spec
    from qzoom_swift.fileio import write_json_atomic

    path = Path(directory) / SWIFT_ARGS_NAME
    if path.exists():
        return None
    try:
        version = metadata.version("ms-swift")
    except metadata.PackageNotFoundError:
        version = None
    qzoom_type = get_spec(family).qzoom_model_type
    args = {"tuner_type": "qzoom", "model_type": qzoom_type, "template": qzoom_type,
            "external_plugins": [str(PLUGIN_FILE)], "swift_version": version}
    if base_model:
        args["model"] = str(base_model)
    return write_json_atomic(path, args)


@dataclass
class ZoomAnswer:
    text: str
    stats: ZoomStats
    token_ids: list[int] | None = None
    """The generated tokens (exact output-token counts for throughput reports)."""


class QZoomModel:
    """A base VLM with Q-Zoom branches. ``model`` stays a stock transformers model (its forward is untouched)."""

    def __init__(self, model: nn.Module, processor=None, config: QZoomConfig | None = None):
        self.model = model
        self.processor = processor
        self.adapter: FamilyAdapter = get_adapter(model)
        attach_branches(model, config)

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike | nn.Module, config: QZoomConfig | None = None, *,
                        checkpoint: str | os.PathLike | None = None, processor=None,
                        dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
                        device: str | None = None, device_map=None,
                        config_overrides: dict | None = None) -> QZoomModel:
        """Load a base model (hub id or local dir, or an already loaded model) and attach the branches.

        ``checkpoint`` is a Q-Zoom branch checkpoint directory (``qzoom_branch.safetensors`` +
        ``qzoom_config.json``) or its hub id; without it the branches are fresh copies of the base layers.
        ``device`` / ``dtype`` / ``attn_implementation`` mean what the CLI flags mean (``qzoom_swift.loading``:
        auto = the GPU in bfloat16 when there is one, else the CPU in float32; sdpa); ``device_map`` is the
        older spelling of ``device``.
        """
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            from qzoom_swift.loading import LoadSettings, load_model

            path = str(model_or_path)
            if is_branch_checkpoint(path):
                raise ValueError(
                    f"{path} is a Q-Zoom branch checkpoint, not a base model: pass the base model as the first "
                    "argument and this directory as checkpoint=..."
                )
            if device is None and isinstance(device_map, str | torch.device):
                device = str(device_map)
            settings = LoadSettings(device or "auto", dtype or "auto", attn_implementation or "auto")
            model, loaded_processor = load_model(path, settings, processor=processor is None)
            processor = processor if processor is not None else loaded_processor
        model.eval()
        if checkpoint is not None:
            from qzoom_swift.hub import resolve_checkpoint

            checkpoint = resolve_checkpoint(checkpoint)  # a local folder, or a hub id (ms-swift's download)
            if not (Path(checkpoint) / BRANCH_WEIGHTS_NAME).is_file():
                raise FileNotFoundError(f"checkpoint {checkpoint} has no {BRANCH_WEIGHTS_NAME}")
            load_branch_checkpoint(model, checkpoint, config_overrides)
            return cls(model, processor)
        if config_overrides:
            config = (config or QZoomConfig()).with_overrides(config_overrides)
        return cls(model, processor, config)

    @property
    def config(self) -> QZoomConfig:
        return require_branches(self.model).qzoom_config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefill(self, branches: tuple[str, ...] = ("gate", "rpn"), **inputs) -> BranchPrefill:
        """One prefill through layer B: gate logits, RPN token scores and the [0, B) KV cache."""
        with torch.no_grad():
            return prefill(self.model, branches=branches, **inputs)

    def continue_prefill(self, state: BranchPrefill, last_only: bool = False) -> torch.Tensor:
        """Layers [B, L) of the same prompt (direct answer); logits [B, S, vocab] (or [B, 1, vocab])."""
        return continue_prefill(self.model, state, last_only)

    def generate(self, images, questions: str | list[str], *, config_overrides: dict | None = None,
                 max_new_tokens: int = 64, **generate_kwargs) -> list[ZoomAnswer]:
        """Answer image questions with Q-Zoom (gated zoom by default; ``config_overrides={"mode": ...}``).

        ``images`` is the image(s) of one question, or one entry per question; an image is a PIL image or
        the path of an image file. Images are encoded at the config's low budget for pass 1; crops come from
        these full-resolution originals. Errors name the sample (and the file) they come from.
        """
        if self.processor is None:
            raise ValueError("QZoomModel.generate needs a processor: pass processor=... to from_pretrained")
        from qzoom_swift.inputs import chat_inputs, sample_images
        from qzoom_swift.zoom import zoom_generate

        images, questions = sample_images(images, questions)
        cfg = effective_config(self.config, config_overrides)  # checkpoint < QZOOM_* environment < this call
        low = [[self._low_image(img, cfg, i, j) for j, img in enumerate(sample)] for i, sample in enumerate(images)]
        inputs = chat_inputs(self.processor, low, questions)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        generate_kwargs.setdefault("do_sample", False)
        out = zoom_generate(self.model, self.processor, inputs, images, cfg, max_new_tokens=max_new_tokens,
                            **generate_kwargs)
        texts = self.processor.batch_decode([g.tolist() for g in out.generated], skip_special_tokens=True)
        return [ZoomAnswer(text, st, g.tolist()) for text, st, g in zip(texts, out.stats, out.generated)]

    def _low_image(self, image, cfg: QZoomConfig, sample: int, index: int):
        """``image`` resized to the first pass's budget; an image the family cannot encode names its sample."""
        try:
            return self.adapter.resize_for_budget(image, cfg.low_min_tokens, cfg.low_max_tokens, what="input image")
        except ValueError as exc:
            from qzoom_swift.inputs import SOURCE_KEY

            name = image.info.get(SOURCE_KEY) or "(in memory)"
            raise ValueError(f"sample {sample} image {index} {name}: {exc}") from exc

    def save_branches(self, directory: str | os.PathLike) -> Path:
        """The branch checkpoint, plus the ``args.json`` by which ``swift infer --adapters DIR`` recognises it."""
        out = save_branch_checkpoint(self.model, directory)
        write_swift_adapter_args(out, self.config.family, getattr(self.model.config, "_name_or_path", None))
        return out

    def load_branches(self, directory: str | os.PathLike, config_overrides: dict | None = None) -> QZoomConfig:
        return load_branch_checkpoint(self.model, directory, config_overrides)
