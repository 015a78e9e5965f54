"""Issue 29 items 1 and 8: a ``swift deploy`` of a ``qzoom_*`` template answers each request on its own (a corrupt
image fails only its request, naming the entry), and reads no server-side file or URL unless allowed.

The default refusals (no folder, no URLs) are checked on test_reliability's plain deploy (test_10); here one
server runs with a folder and URLs allowed, ``--max_batch_size 4``.
"""

from __future__ import annotations

import base64
import functools
import gc
import http.server
import io
import os
import threading
import time
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qzoom_swift.swift_plugin.deploy_guard import (
    MediaPolicy,
    encode_independently,
    image_entry,
    name_request_error,
)
from qzoom_swift.swift_plugin.templates import ImageEntryError
from qzoom_swift.testing.serving import (
    answer_text,
    chat_status,
    start_swift_deploy,
    stop_process_tree,
    wait_for_models,
)
from qzoom_swift.testing.soak import png_bytes


def _truncated_jpeg() -> bytes:
    """A JPEG cut at 60%: PIL opens it (the header is whole) and fails only when it decodes the pixels."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) * 6 // 10]


def _data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _content(url: str, question: str = "What colour is it?") -> list:
    return [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]


# ------------------------------------------------------------------------------------------ quick: pure parts


class _Request:
    def __init__(self, messages, images=()):
        self.messages, self.images = messages, list(images)


def test_image_entry_counts_the_images_of_the_messages_in_order():
    request = _Request([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "image", "image": ""},  # no value: ms-swift counts no image
                                     {"type": "image", "image": "y"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "z"}]}])
    assert [image_entry(request, i) for i in range(3)] == [
        "messages[1].content[1]", "messages[1].content[3]", "messages[2].content[0]"]
    assert image_entry(_Request([{"role": "user", "content": "<image><image>Hi"}], ["a", "b"]), 1) == "images[1]"


def test_an_image_error_is_named_by_its_entry_and_others_pass_through():
    request = _Request([{"role": "user", "content": _content("data:,")}])
    named = name_request_error(request, ImageEntryError(0, "image 0 (x) cannot be read: OSError: truncated"))
    assert str(named) == "messages[0].content[1] (image): image 0 (x) cannot be read: OSError: truncated"
    other = RuntimeError("boom")
    assert name_request_error(request, other) is other


def test_media_policy_allows_only_the_folder(tmp_path):
    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", inside / "link.png")
    policy = MediaPolicy(inside.resolve(), allow_urls=False)
    policy.check_path(str(inside / "a.png"))
    for path in (tmp_path / "secret.png", inside / ".." / "secret.png", inside / "link.png"):
        with pytest.raises(ValueError, match="outside QZOOM_ALLOWED_LOCAL_MEDIA_PATH"):
            policy.check_path(str(path))
    with pytest.raises(ValueError, match="reads no file:// URLs"):
        policy.check_path(f"file://{inside / 'a.png'}")
    with pytest.raises(ValueError, match="reads no files named in a request.*QZOOM_ALLOWED_LOCAL_MEDIA_PATH"):
        MediaPolicy().check_path(str(inside / "a.png"))
    with pytest.raises(ValueError, match="fetches no URLs.*QZOOM_ALLOW_MEDIA_URLS=1"):
        policy.check_url("http://127.0.0.1:1/a.png")
    MediaPolicy(allow_urls=True).check_url("http://127.0.0.1:1/a.png")


def test_media_policy_reads_its_settings_once_and_names_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QZOOM_ALLOWED_LOCAL_MEDIA_PATH", str(tmp_path))
    monkeypatch.setenv("QZOOM_ALLOW_MEDIA_URLS", "yes")
    assert MediaPolicy.from_env() == MediaPolicy(tmp_path.resolve(), True)
    monkeypatch.setenv("QZOOM_ALLOWED_LOCAL_MEDIA_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"QZOOM_ALLOWED_LOCAL_MEDIA_PATH='.*missing' is not a folder"):
        MediaPolicy.from_env()
    monkeypatch.delenv("QZOOM_ALLOWED_LOCAL_MEDIA_PATH")
    monkeypatch.setenv("QZOOM_ALLOW_MEDIA_URLS", "perhaps")
    with pytest.raises(ValueError, match="QZOOM_ALLOW_MEDIA_URLS='perhaps'"):
        MediaPolicy.from_env()
    monkeypatch.delenv("QZOOM_ALLOW_MEDIA_URLS")
    assert MediaPolicy.from_env() == MediaPolicy(None, False)


def test_swift_infer_keeps_reading_local_paths():
    """The policy is a deploy's only: loading the plugin outside ``swift deploy`` leaves ms-swift's checks alone."""
    from swift.utils import SafeMediaPath, SafeUrlFetcher

    from qzoom_swift.swift_plugin import register

    register()
    assert SafeMediaPath.check.__func__.__module__.startswith("swift.")
    assert SafeUrlFetcher.check_url.__func__.__module__.startswith("swift.")
    assert SafeMediaPath.check("/any/where.png") == "/any/where.png"


class _Encoded:
    """Stands for a request's encoded inputs; weakly referable, so the test sees when it is freed."""


class _Template:
    def __init__(self):
        self.encoded = []

    def encode(self, request, return_template_inputs=False):
        if request == "bad":
            raise ValueError("bad request")
        self.encoded.append(_Encoded())
        return self.encoded[-1]


def test_a_failed_request_does_not_keep_its_batch_alive_until_a_full_collection():
    """ms-swift's own ``_batch_encode`` keeps its errors in a local of a frame their traceback holds; the guard
    detaches the tracebacks, so the batch's encoded inputs are freed by reference counting, not by the cyclic GC."""
    from swift.infer_engine.infer_engine import InferEngine

    class Engine:
        _batch_encode = InferEngine._batch_encode

    def encode_and_drop(engine, strict: bool) -> list:
        engine.template = _Template()
        batched, errors = engine._batch_encode(["good", "bad", "good"], strict=strict)
        assert len(batched) == 2 and [i for i, _ in errors] == [1]
        logged = "".join(traceback.format_exception(errors[0][1]))
        assert "bad request" in logged and ", in encode\n" in logged, logged  # where it was raised: still logged
        refs = [weakref.ref(x) for x in batched]
        engine.template.encoded.clear()
        return refs

    gc.collect()
    gc.disable()
    try:
        stock = encode_and_drop(Engine(), strict=False)
        assert any(ref() is not None for ref in stock)  # the stock cycle: still alive before a collection
        guarded = Engine()
        encode_independently(guarded)
        assert all(ref() is None for ref in encode_and_drop(guarded, strict=True))  # as deploy asks
    finally:
        gc.enable()
        gc.collect()


# ------------------------------------------------------------------------------------ slow: swift deploy on loopback


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An allowed folder with one image, one image outside it, and a loopback HTTP server for the folder."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "green.png").write_bytes(png_bytes((30, 160, 60)))
    (root / "outside.png").write_bytes(png_bytes((30, 160, 60)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(allowed))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, allowed, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_dir, media, tmp_path_factory):
    root, allowed, _ = media
    work = tmp_path_factory.mktemp("deploy_guard")
    proc, base, log = start_swift_deploy(
        tiny_dir("qwen2_5_vl"), work, {"QZOOM_MODE": "always", "QZOOM_ROI_MIN_TOKENS": 16, "QZOOM_ROI_MAX_TOKENS": 64},
        "--max_batch_size", "4", "--max_new_tokens", "3",
        env_extra={"QZOOM_ALLOWED_LOCAL_MEDIA_PATH": str(allowed), "QZOOM_ALLOW_MEDIA_URLS": "1",
                   "SWIFT_ALLOW_INTERNAL_URL": "1"})
    try:
        name = wait_for_models(base, proc)
        assert name, f"swift deploy did not come up:\n{log.read_text(errors='replace')[-3000:]}"
        yield base, name, log
    finally:
        stop_process_tree(proc)


GOOD = [((200, 30, 30), "What colour is it?"), ((30, 160, 60), "Which colour is the shape?"),
        ((40, 40, 200), "Name the colour of the shape.")]


def _batch_sizes(log: Path) -> list[int]:
    return [len(line.split("qzoom: ", 1)[1].split("; ")) for line in log.read_text(errors="replace").splitlines()
            if "qzoom: " in line]


@pytest.mark.slow
def test_1_a_corrupt_image_fails_alone_in_a_batch_and_names_its_entry(server):
    base, name, log = server
    contents = [_content(_data_uri(png_bytes(colour)), question) for colour, question in GOOD]
    sequential = [chat_status(base, name, c) for c in contents]
    assert all(code == 200 for code, _ in sequential), sequential
    corrupt = _content(_data_uri(_truncated_jpeg(), "jpeg"))
    for _ in range(3):  # requests queued while the engine is busy form one batch; retry if they came apart
        calls = len(_batch_sizes(log))
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda c: chat_status(base, name, c), [corrupt, *contents]))
        (bad_code, bad), good = results[0], results[1:]
        assert [code for code, _ in good] == [200] * 3, good
        assert [answer_text(b) for _, b in good] == [answer_text(b) for _, b in sequential]
        assert bad_code == 400, bad
        assert bad["message"].startswith("messages[0].content[1] (image): image 0 (data URI with "), bad
        assert "image file is truncated" in bad["message"]
        time.sleep(0.5)
        sizes = _batch_sizes(log)[calls:]
        if max(sizes) == 3:  # the three good requests shared a batch, which the corrupt one had joined
            break
    assert max(sizes) == 3, f"the concurrent good requests never shared a batch: {sizes}"


@pytest.mark.slow
def test_8_a_permissive_server_reads_the_folder_and_urls_and_nothing_else(server, media):
    base, name, _ = server
    root, allowed, http_base = media
    png = png_bytes((30, 160, 60))
    code, reference = chat_status(base, name, _content(_data_uri(png)))
    assert code == 200, reference
    expected = answer_text(reference)
    for url in (base64.b64encode(png).decode(), str(allowed / "green.png"), f"{http_base}/green.png"):
        code, body = chat_status(base, name, _content(url))
        assert code == 200 and answer_text(body) == expected, (url[:80], body)
    code, body = chat_status(base, name, _content(str(root / "outside.png")))
    assert code in (400, 422) and "outside QZOOM_ALLOWED_LOCAL_MEDIA_PATH" in str(body), body
    code, body = chat_status(base, name, _content(f"file://{allowed / 'green.png'}"))
    assert code in (400, 422) and "reads no file:// URLs" in str(body), body
