"""Q-Zoom from Python, without ms-swift: load a model with a trained checkpoint and answer a question three
ways: gated zoom (the calibrated tau_gate), forced zoom, and low resolution only.

    MODEL=... CKPT=... IMAGE=photo.jpg QUESTION="What is the serial number?" python examples/python_api.py

Defaults: the real model on a GPU in bfloat16 and the checkpoint examples/stage3_gate.sh writes; on a CPU set
DEVICE=cpu DTYPE=float32.
"""

import os

from PIL import Image

from qzoom_swift import QZoomModel

MODEL = os.environ.get("MODEL", "Qwen/Qwen2.5-VL-7B-Instruct")
CKPT = os.environ.get("CKPT", "runs/stage3/qwen2_5_vl_7b/train/last-checkpoint")  # written by stage3_gate.sh
IMAGE = os.environ.get("IMAGE", "data/images/example.jpg")
QUESTION = os.environ.get("QUESTION", "What is written on the sign?")
DEVICE = os.environ.get("DEVICE", "cuda")
DTYPE = os.environ.get("DTYPE", "bfloat16")
MAX_NEW_TOKENS = int(os.environ.get("MAX_NEW_TOKENS", "32"))

qz = QZoomModel.from_pretrained(MODEL, checkpoint=CKPT, dtype=DTYPE, device_map=DEVICE)
image = Image.open(IMAGE).convert("RGB")
for mode in ("zoom", "always", "never"):
    answer = qz.generate([image], QUESTION, max_new_tokens=MAX_NEW_TOKENS, config_overrides={"mode": mode})[0]
    s = answer.stats
    print(f"{mode:>6}: {answer.text!r}  zoomed={s.zoomed} box={s.box} visual tokens={s.visual_tokens}")
