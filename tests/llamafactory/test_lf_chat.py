"""Zoom inference through LLaMA-Factory's HF engine (``ChatModel``, ``llamafactory-cli chat`` / ``api``), .venv-lf only.

The reference is ``QZoomModel.generate`` on the same model folder and the same original image, computed in the test.
The tolerance under test (``generation.py`` explains it): tokens identical in modes ``never`` and ``always`` when
LLaMA-Factory's processed view is the image itself (sides on the patch grid, within ``image_max_pixels``); when
LLaMA-Factory shrinks the image first, the same zoom grid and a box within one cell of the reference's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qzoom_swift.families.registry import FAMILY_NAMES, get_spec
from qzoom_swift.testing.serving import stop_process_tree

LF_CLI = Path(sys.executable).parent / "llamafactory-cli"
TEMPLATES = {name: get_spec(name).llamafactory_template for name in FAMILY_NAMES}
UNIT = {"qwen2_5_vl": 28, "qwen3_vl": 32}
"""Pixels per merged token (an exact grid image keeps its size through LLaMA-Factory and the processor)."""
LLAVA_SIDE = 224
"""The tiny LLaVA processor's square (336 at full size): LLaMA-Factory passes only this view."""
KNOBS = {"low_min_tokens": 16, "low_max_tokens": 32, "roi_min_tokens": 16, "roi_max_tokens": 48}
QUESTION = "What is in the picture?"
MAX_NEW = 6



@pytest.fixture(autouse=True)
def _restore_llamafactory_templates():
    """LLaMA-Factory writes a run's ``default_system`` into its global template object (template.py,
    get_template_and_fix_tokenizer): the LLaVA tests' empty system prompt would otherwise reach later tests in this
    process (the dataset export's LLaVA rows lost their system prompt that way)."""
    from llamafactory.data.template import TEMPLATES as LF_GLOBAL_TEMPLATES

    saved = {name: t.default_system for name, t in LF_GLOBAL_TEMPLATES.items()}
    yield
    for name, system in saved.items():
        LF_GLOBAL_TEMPLATES[name].default_system = system

def grid_image(family: str, cells: tuple[int, int] = (9, 12), seed: int = 0) -> Image.Image:
    """Random pixels on the family's exact grid (rows x cols cells; LLaVA: its processor's square)."""
    h, w = (LLAVA_SIDE, LLAVA_SIDE) if family == "llava" else (cells[0] * UNIT[family], cells[1] * UNIT[family])
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def lf_folder(tiny_dir, tmp_path_factory):
    """Factory: the ``qzoom lf-model`` folder of a tiny base (fresh branches, the test's budgets)."""
    from qzoom_swift.llamafactory_plugin.folder import write_model_folder

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = write_model_folder(tiny_dir(family), tmp_path_factory.mktemp(f"lf-{family}") / "model",
                                              qzoom_overrides=KNOBS)
        return made[family]

    return get


@pytest.fixture(scope="module")
def reference(lf_folder):
    """Factory: ``QZoomModel`` over the same folder, loaded by transformers alone (no LLaMA-Factory code)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.model import QZoomModel

    made = {}

    def get(family: str) -> QZoomModel:
        if family not in made:
            folder = lf_folder(family)
            model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
            made[family] = QZoomModel(model.eval(), AutoProcessor.from_pretrained(folder))
        return made[family]

    return get


def partial_box_tau(qm, image: Image.Image) -> float:
    """A tau_roi at the 90th percentile of the reference's blurred low-pass heatmap: the random tiny RPN's map is
    nearly flat, and the default threshold would box the whole image (no crop to compare)."""
    from qzoom_swift.config import effective_config
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.roi import heatmap_probabilities

    cfg = effective_config(qm.config)
    low = qm.adapter.resize_for_budget(image, cfg.low_min_tokens, cfg.low_max_tokens)
    state = qm.prefill(branches=("rpn",), **chat_inputs(qm.processor, [[low]], [QUESTION]))
    probs = heatmap_probabilities(state.heatmaps()[0].float(), cfg.blur_kernel, cfg.blur_sigma)
    return float(torch.quantile(probs.flatten(), 0.9))


def lf_args(folder: Path, family: str, **extra) -> dict:
    """LLaMA-Factory's inference arguments. LLaVA: its ``llava`` template adds a Vicuna system prompt the model's own
    chat template (QZoomModel's prompt) lacks; an empty ``default_system`` makes the two prompts the same."""
    own = {"default_system": ""} if family == "llava" else {}
    return {"model_name_or_path": str(folder), "template": TEMPLATES[family], "trust_remote_code": True,
            "infer_backend": "huggingface", "infer_dtype": "float32", "do_sample": False,
            "max_new_tokens": MAX_NEW, **own, **extra}


def user_turn(family: str) -> list[dict]:
    """The request's user turn, written as the model's chat template writes it (LLaVA: a newline after the image)."""
    return [{"role": "user", "content": "<image>" + ("\n" if family == "llava" else "") + QUESTION}]


class Recorder:
    """What LLaMA-Factory's engine got back from ``model.generate`` and what reached ``zoom_generate``."""

    def __init__(self, model, monkeypatch):
        import qzoom_swift.zoom as zoom

        self.outputs: list[tuple[int, torch.Tensor]] = []
        self.zoom_calls: list[tuple[torch.Tensor, Image.Image]] = []
        real_generate, real_zoom = model.generate, zoom.zoom_generate

        def generate(*args, **kwargs):
            out = real_generate(*args, **kwargs)
            if "inputs" in kwargs:  # the engine's call (zoom_generate's own decoding passes input_ids)
                self.outputs.append((int(kwargs["inputs"].shape[1]), out))
            return out

        def zoom_generate(model, processor, inputs, sources, *args, **kwargs):
            self.zoom_calls.append((inputs["input_ids"].clone(), sources[0][-1].copy()))
            return real_zoom(model, processor, inputs, sources, *args, **kwargs)

        monkeypatch.setattr(model, "generate", generate)
        monkeypatch.setattr(zoom, "zoom_generate", zoom_generate)

    def new_tokens(self) -> list[int]:
        prompt_length, out = self.outputs[-1]
        assert out.dim() == 2 and out.shape[0] == 1
        return out[0, prompt_length:].tolist()


def ask(chat, image: Image.Image, family: str) -> str:
    return chat.chat(user_turn(family), images=[image])[0].response_text


def test_pixels_round_trip(lf_folder):
    """The rebuilt image is the processor's input, pixel for pixel (float32), for the three layouts."""
    from transformers import AutoProcessor

    from qzoom_swift.families import get_adapter

    for family in FAMILY_NAMES:
        ip = AutoProcessor.from_pretrained(lf_folder(family)).image_processor
        images = [grid_image(family, (3, 5), seed=1), grid_image(family, (4, 2), seed=2)]
        out = ip(images=images, return_tensors="pt")
        rebuilt = get_adapter(family).decode_pixels(out["pixel_values"], out.get("image_grid_thw"), ip)
        assert len(rebuilt) == 2
        for a, b in zip(images, rebuilt):
            assert b.size == a.size and np.array_equal(np.asarray(a), np.asarray(b)), family


def test_patch_model_keeps_a_generation_mixin_generate(lf_folder):
    """Pinned LLaMA-Factory behaviour: patch_model keeps a generate defined in a class named *GenerationMixin* and
    replaces any other. If a release changes the rule, Q-Zoom would silently stop zooming in chat/api."""
    from llamafactory.hparams import ModelArguments
    from llamafactory.model.patcher import patch_model
    from transformers import AutoModelForImageTextToText, GenerationMixin

    from qzoom_swift.llamafactory_plugin.generation import QZoomGenerationMixin

    model = AutoModelForImageTextToText.from_pretrained(lf_folder("qwen2_5_vl"), trust_remote_code=True)
    args = ModelArguments(model_name_or_path=str(lf_folder("qwen2_5_vl")))
    patch_model(model, None, args, is_trainable=False, add_valuehead=False)
    assert model.generate.__func__ is QZoomGenerationMixin.generate

    class PlainZoom:  # the same behaviour, defined in a class whose name lacks "GenerationMixin"
        def generate(self, *args, **kwargs):
            return QZoomGenerationMixin.generate(self, *args, **kwargs)

    model.__class__ = type("Renamed", (PlainZoom, type(model)), {})
    patch_model(model, None, args, is_trainable=False, add_valuehead=False)
    assert model.generate.__func__ is GenerationMixin.generate  # replaced: the stock decoding, no zoom


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_chat_engine_gives_qzoom_model_tokens(family, lf_folder, reference, monkeypatch):
    """LLaMA-Factory's ChatModel (what chat/api/webchat run) answers with QZoomModel.generate's tokens in modes never,
    always and zoom (the gate deciding), from the same prompt ids and the same original image; streaming gives the
    same text."""
    from llamafactory.chat import ChatModel

    image, qm = grid_image(family), reference(family)
    monkeypatch.setenv("QZOOM_TAU_ROI", f"{partial_box_tau(qm, image):.6f}")
    monkeypatch.setenv("QZOOM_TAU_GATE", "0")  # mode zoom: the gate fires at any probability
    chat = ChatModel(lf_args(lf_folder(family), family))
    for model in (chat.engine.model, qm.model):  # a fresh folder records an untrained gate (mode zoom would not ask it)
        monkeypatch.setitem(model.qzoom_branch.qzoom_config.extra, "trained_branches", ["rpn", "gate"])
    rec = Recorder(chat.engine.model, monkeypatch)
    stats = {}
    for mode in ("never", "always", "zoom"):
        monkeypatch.setenv("QZOOM_MODE", mode)
        rec.zoom_calls.clear()
        text = ask(chat, image, family)
        stats[mode] = lf_stats = chat.engine.model.qzoom_last_stats[0]
        ref = qm.generate(image, QUESTION, max_new_tokens=MAX_NEW)[0]
        (lf_ids, lf_source), (ref_ids, ref_source) = rec.zoom_calls
        assert lf_ids.tolist() == ref_ids.tolist(), f"{family} {mode}: first-pass prompt ids differ"
        assert np.array_equal(np.asarray(lf_source), np.asarray(image)), "the crop source is not the original image"
        assert rec.new_tokens() == ref.token_ids, f"{family} {mode}"
        assert text == qm.processor.batch_decode([ref.token_ids], skip_special_tokens=True)[0]
        for key in ("zoomed", "reason", "gate_prob", "grid_box", "grid", "visual_tokens_low", "visual_tokens_roi",
                    "prompt_tokens"):
            assert lf_stats[key] == getattr(ref.stats, key), (family, mode, key)
    assert [stats[m]["reason"] for m in stats] == ["never", "forced", "gate"]
    rows, cols = stats["always"]["grid"]
    x0, y0, x1, y1 = stats["always"]["grid_box"]
    assert 0 < (x1 - x0) * (y1 - y0) < rows * cols, "mode always cut no partial crop"
    streamed = "".join(chat.stream_chat(user_turn(family), images=[image]))
    assert streamed == text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_refused_request_ends_the_stream(lf_folder):
    """A request Q-Zoom refuses (n=2 answers) raises in chat and ends a stream instead of leaving LLaMA-Factory's
    reader waiting on the streamer for ever (the engine runs generate in a thread and reads the streamer)."""
    from concurrent.futures import ThreadPoolExecutor

    from llamafactory.chat import ChatModel

    chat = ChatModel(lf_args(lf_folder("qwen2_5_vl"), "qwen2_5_vl"))
    image = grid_image("qwen2_5_vl")
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        chat.chat(user_turn("qwen2_5_vl"), images=[image], num_return_sequences=2)
    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(lambda: "".join(chat.stream_chat(user_turn("qwen2_5_vl"), images=[image],
                                                                num_return_sequences=2)))
        assert streamed.result(timeout=120) == ""  # ended (empty), not blocked
    for thread in threading.enumerate():  # the engine's generate thread raises after ending the stream: let it finish
        if thread is not threading.current_thread() and "generate" in thread.name:
            thread.join(timeout=60)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_chat_engine_on_a_shrunk_view_keeps_the_box(family, lf_folder, reference, monkeypatch):
    """image_max_pixels below the image: LLaMA-Factory halves it before Q-Zoom sees it. The zoom decision and grid
    are the reference's and the box is within one cell of it (the stated tolerance); tokens may differ."""
    from llamafactory.chat import ChatModel

    image, qm = grid_image(family, (18, 24), seed=3), reference(family)
    monkeypatch.setenv("QZOOM_TAU_ROI", f"{partial_box_tau(qm, image):.6f}")
    monkeypatch.setenv("QZOOM_MODE", "always")
    chat = ChatModel(lf_args(lf_folder(family), family, image_max_pixels=image.width * image.height // 4))
    rec = Recorder(chat.engine.model, monkeypatch)
    ask(chat, image, family)
    lf_stats = chat.engine.model.qzoom_last_stats[0]
    assert rec.zoom_calls[0][1].size == (image.width // 2, image.height // 2)  # the crop source is LF's view
    ref_answer = qm.generate(image, QUESTION, max_new_tokens=MAX_NEW)[0]
    ref = ref_answer.stats
    print(f"shrunk view {family}: box {lf_stats['grid_box']} vs {ref.grid_box} on {ref.grid}; tokens "
          f"{'equal' if rec.new_tokens() == ref_answer.token_ids else 'differ'}")
    assert lf_stats["zoomed"] and ref.zoomed and lf_stats["grid"] == ref.grid
    assert max(abs(a - b) for a, b in zip(lf_stats["grid_box"], ref.grid_box)) <= 1, (lf_stats["grid_box"], ref)


def cli_command(args: list[str]) -> tuple[dict, list[str]]:
    """Environment and command line of ``llamafactory-cli ARGS`` (offline, one thread, unbuffered logs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1"}
    env.pop("DISABLE_VERSION_CHECK", None)
    return env, [str(LF_CLI), *args]


def write_yaml(path: Path, args: dict) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in args.items()))
    return path


def test_cli_chat_answers_like_qzoom_model(lf_folder, reference, tmp_path):
    """``llamafactory-cli chat`` (terminal) loads the Q-Zoom class and answers; it reads text only (0.9.5's run_chat
    passes no image), so the reference is QZoomModel.generate without an image."""
    qm = reference("qwen2_5_vl")
    question = "Describe the weather."
    ref = qm.generate([], question, max_new_tokens=MAX_NEW)[0]
    env, cmd = cli_command(["chat", str(write_yaml(tmp_path / "chat.yaml", lf_args(lf_folder("qwen2_5_vl"), "qwen2_5_vl")))])
    with open(tmp_path / "stderr.log", "w") as err:  # stderr apart: transformers may log in mid-answer
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        try:
            proc.stdin.write(question + "\n")
            proc.stdin.flush()
            lines = []
            while not lines or "Assistant: " not in lines[-1]:
                lines.append(proc.stdout.readline())
                assert lines[-1], "".join(lines)[-2000:] + (tmp_path / "stderr.log").read_text()[-2000:]
            # LLaMA-Factory's stream thread may still be unwinding after the answer; exiting under it can abort the
            # process (seen with a stock model folder too), so give it a moment before `exit`
            time.sleep(1)
            out, _ = proc.communicate("exit\n", timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out[-2000:] + (tmp_path / "stderr.log").read_text()[-2000:]
    answer = lines[-1].split("Assistant: ", 1)[1].rstrip("\n")
    assert answer == ref.text and ref.token_ids, "".join(lines)[-2000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_request_with_an_image_gives_qzoom_model_tokens(lf_folder, reference, tmp_path, monkeypatch):
    """A loopback OpenAI-style request with a base64 image to ``llamafactory-cli api``: QZoomModel.generate's answer
    (text and token count) in mode always, and the decision in the server's log. The server stops in ``finally``."""
    family = "qwen2_5_vl"
    image, qm = grid_image(family), reference(family)
    tau = f"{partial_box_tau(qm, image):.6f}"
    monkeypatch.setenv("QZOOM_TAU_ROI", tau)
    monkeypatch.setenv("QZOOM_MODE", "always")
    ref = qm.generate(image, QUESTION, max_new_tokens=MAX_NEW)[0]
    port = free_port()
    env, cmd = cli_command(["api", str(write_yaml(tmp_path / "api.yaml", lf_args(lf_folder(family), family)))])
    env.update({"API_HOST": "127.0.0.1", "API_PORT": str(port), "QZOOM_MODE": "always", "QZOOM_TAU_ROI": tau})
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    body = {"model": "qzoom", "max_tokens": MAX_NEW, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}},
        {"type": "text", "text": QUESTION}]}]}
    log_path = tmp_path / "api.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the api server did not come up:\n" + log_path.read_text()[-3000:]
                    time.sleep(1)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(req, timeout=300).read())
        finally:
            stop_process_tree(server)
    assert reply["choices"][0]["message"]["content"] == ref.text
    assert reply["usage"]["completion_tokens"] == len(ref.token_ids)
    s = ref.stats
    line = f"zoom(forced) p=None box={list(s.grid_box)}/{list(s.grid)} read={s.prompt_tokens}"
    assert line in log_path.read_text(), log_path.read_text()[-3000:]
