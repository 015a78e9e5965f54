"""One model loader for every command: ``--device``, ``--dtype`` and ``--attn-implementation`` mean the same
everywhere, are resolved once and are logged once.

Why one home: the labelling jobs run 7B models on GPUs for hours; a loader that forgets the device (fp32 on
the CPU) or the attention implementation (eager where sdpa would do) costs the user a day. The jobs that
read attention weights (stage-1 pseudo labels) need eager attention in the language model and say so when
they override the user's choice; the others default to sdpa.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEVICE_HELP = ("auto (cuda:LOCAL_RANK under torchrun, else cuda if available, else cpu) | cpu | cuda | cuda:N "
               "(default: auto)")
DTYPE_HELP = "auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32 (default: auto)"
ATTENTION_HELP = ("auto | eager | sdpa | flash_attention_2 (auto: sdpa, or eager in the language model for "
                  "jobs that read attention weights; flash_attention_2 needs the flash-attn package and a GPU)")
DTYPES = ("bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "eager", "sdpa", "flash_attention_2")
EAGER_TEXT = {"text_config": "eager", "vision_config": "sdpa"}
"""Eager attention where weights are read (the language model); the vision tower keeps sdpa (cheaper, equal)."""


class ModelLoadError(ValueError):
    """A device / dtype / attention choice that cannot work here, or a model that cannot be read."""


@dataclass(frozen=True)
class LoadSettings:
    """What the user asked for (the strings of the three flags)."""

    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadSettings:
        return cls(getattr(args, "device", "auto") or "auto", getattr(args, "dtype", "auto") or "auto",
                   getattr(args, "attn_implementation", "auto") or "auto")


@dataclass(frozen=True)
class ResolvedLoad:
    """What the loader will do: a concrete device, torch dtype and transformers attention setting."""

    device: str
    dtype: Any  # torch.dtype
    attn_implementation: str | dict
    note: str = ""
    """Why the attention differs from the request (e.g. forced eager), logged with the choice."""

    def describe(self) -> str:
        attn = self.attn_implementation
        attn = attn if isinstance(attn, str) else ", ".join(f"{k.split('_')[0]} {v}" for k, v in attn.items())
        dtype = str(self.dtype).replace("torch.", "")
        return f"device {self.device}, dtype {dtype}, attention {attn}" + (f" ({self.note})" if self.note else "")


def add_model_args(parser: argparse.ArgumentParser, *, reads_attention: bool = False,
                   fixed_defaults: tuple[str, str, str] | None = None) -> None:
    """The three loader flags, the same names and help on every subcommand.

    ``fixed_defaults`` = (device, dtype, why) for a command whose output depends on the precision it reads
    (``export-onnx`` exports from float32 weights on the CPU unless asked otherwise).
    """
    device_help, dtype_help, device_default, dtype_default = DEVICE_HELP, DTYPE_HELP, "auto", "auto"
    if fixed_defaults is not None:
        device_default, dtype_default, why = fixed_defaults
        device_help = DEVICE_HELP.replace("(default: auto)", f"(default: {device_default}: {why})")
        dtype_help = DTYPE_HELP.replace("(default: auto)", f"(default: {dtype_default}: {why})")
    parser.add_argument("--device", default=device_default, help=device_help)
    parser.add_argument("--dtype", default=dtype_default, choices=("auto", *DTYPES), help=dtype_help)
    help_text = ATTENTION_HELP + (". This job reads attention weights: the language model always runs eager"
                                  if reads_attention else "")
    parser.add_argument("--attn-implementation", default="auto", choices=ATTENTIONS, help=help_text)


def resolve_device(device: str | None, local_rank: int | None = None) -> str:
    """A concrete torch device string; a CUDA device that is not there is an error naming the fix."""
    import torch

    device = (device or "auto").strip()
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{local_rank}" if local_rank is not None else "cuda"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: no CUDA device is visible here; use --device cpu (or auto)")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                 f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return device
    raise ModelLoadError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: Any, device: str) -> Any:
    """A torch dtype; ``auto`` is bfloat16 on a GPU and float32 on the CPU (bf16 matmuls are slow there)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or "auto").replace("torch.", "")
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_attention(requested: str | dict | None, device: str, dtype: Any,
                      reads_attention: bool = False) -> tuple[str | dict, str]:
    """(transformers ``attn_implementation``, note). Jobs that read attention weights get eager, said aloud."""
    import torch

    if isinstance(requested, dict):
        return requested, ""
    requested = requested or "auto"
    if requested not in ATTENTIONS:
        raise ModelLoadError(f"--attn-implementation {requested!r}: use {', '.join(ATTENTIONS)}")
    if reads_attention:
        note = "" if requested in ("auto", "eager") else \
            f"--attn-implementation {requested} ignored in the language model: this job reads attention weights"
        return dict(EAGER_TEXT), note or "this job reads attention weights"
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError("--attn-implementation flash_attention_2 needs the flash-attn package "
                                 "(pip install flash-attn --no-build-isolation); or use sdpa")
        if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
            raise ModelLoadError("--attn-implementation flash_attention_2 runs on a GPU in bfloat16/float16; "
                                 f"here the model would be on {device} in {str(dtype).replace('torch.', '')}: "
                                 "use sdpa")
    return ("sdpa" if requested == "auto" else requested), ""


def resolve_load(settings: LoadSettings, *, reads_attention: bool = False,
                 local_rank: int | None = None) -> ResolvedLoad:
    """The settings made concrete, checked before anything large is read from disk."""
    device = resolve_device(settings.device, local_rank)
    dtype = resolve_dtype(settings.dtype, device)
    attention, note = resolve_attention(settings.attn_implementation, device, dtype, reads_attention)
    return ResolvedLoad(device, dtype, attention, note)


def load_model(model_dir: str, settings: LoadSettings | ResolvedLoad | None = None, *,
               reads_attention: bool = False, local_rank: int | None = None, processor: bool = True,
               what: str = "model") -> tuple[Any, Any]:
    """(model in eval mode on its device, processor or None), loaded as ``settings`` ask; logs the choice once.

    The weights go straight to a GPU (``device_map``), never through a float32 copy on the CPU.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    resolved = settings if isinstance(settings, ResolvedLoad) else \
        resolve_load(settings or LoadSettings(), reads_attention=reads_attention, local_rank=local_rank)
    kwargs: dict[str, Any] = {"dtype": resolved.dtype, "attn_implementation": resolved.attn_implementation}
    if resolved.device.startswith("cuda"):
        kwargs["device_map"] = resolved.device
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the {what} {model_dir}: {exc}") from exc
    model = model.to(resolved.device).eval()
    logger.info("%s %s: %s", what, model_dir, resolved.describe())
    proc = AutoProcessor.from_pretrained(str(model_dir)) if processor else None
    return model, proc


def loaded_settings(model: Any) -> tuple[str, Any]:
    """(device, dtype) a loaded model really has: what tests and the logged line check against."""
    param = next(model.parameters())
    return str(param.device), param.dtype
