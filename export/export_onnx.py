#!/usr/bin/env python
"""Export a Q-Zoom checkpoint's gate and RPN as ONNX graphs: the same as ``qzoom export-onnx``.

    python export/export_onnx.py --checkpoint CKPT --model BASE_MODEL_DIR --out DIR [--precision fp32] [--opset 18]

The work is done by ``qzoom_swift.onnx`` (see export/README.md); this file only forwards its arguments.
"""

from __future__ import annotations

import sys

from qzoom_swift.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-onnx", *sys.argv[1:]]))
