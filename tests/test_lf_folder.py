"""A `qzoom lf-model` folder on the newest transformers of the range (the main .venv, 5.19; no LLaMA-Factory here).

LLaMA-Factory 0.9.5 pins transformers 5.6.0 (tests/llamafactory/ run there), but the folder's remote-code class is
a plain transformers model that other tools load too: on 5.19 it must get the stock checkpoint key renames
(``families.compat.share_checkpoint_renames``), or a base folder with legacy tensor names loads as random weights.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.llamafactory_plugin.folder import write_model_folder


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_folder_loads_the_base_weights_and_generates_like_the_stock_model(tmp_path, tiny_dir, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationMixin

    base = tiny_dir(family)
    folder = write_model_folder(base, tmp_path / "lf", train="rpn")
    model, info = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True,
                                                              dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stock = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32).eval()
    image = Image.new("RGB", (224, 224), (230, 230, 230))
    image.paste((200, 20, 20), (56, 56, 140, 112))
    inputs = chat_inputs(AutoProcessor.from_pretrained(str(folder)), [[image]], ["What colour is the box?"])
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, stock(**inputs).logits)
    # transformers' own generate (the signature check of 5.19 included) through the class's forward
    ours = GenerationMixin.generate(model, **inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, stock.generate(**inputs, max_new_tokens=4, do_sample=False))
    model.save_pretrained(tmp_path / "saved")  # saved in the stock names, reloaded through the remote code
    again, info = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True,
                                                              dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
