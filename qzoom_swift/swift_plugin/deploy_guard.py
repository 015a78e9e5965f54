"""What a ``swift deploy`` serving a ``qzoom_*`` template does per request: each request succeeds or fails on
its own, and the server reads only what the request carries.

ms-swift 4.6's deploy sets its engine ``strict``, so ``InferEngine._batch_encode`` re-raises the first
encoding error for every request batched with it (``--max_batch_size``): one corrupt image failed its
neighbours, with an error that named no request. Its media handling reads a server-side path named in a
request (``SafeMediaPath.check`` refuses nothing unless ``SWIFT_MEDIA_ALLOWED_DIRS`` is set) and downloads
http(s) URLs (``SafeUrlFetcher`` refuses private addresses only). For a Q-Zoom server both are refused by
default; ``QZOOM_ALLOWED_LOCAL_MEDIA_PATH`` (one folder, vLLM's ``--allowed-local-media-path``) and
``QZOOM_ALLOW_MEDIA_URLS`` relax that, read once when the server starts. A failed request's error keeps its
traceback as text only (``detach_traceback``): with its frames it kept the whole batch's inputs in memory.

All of it is installed from ``SwiftDeploy._register_app``, the first deploy method called after the plugin
is loaded (argument parsing loads it) and after the engine is built. ``swift infer``, training and
``qzoom eval`` never pass there, so their local paths keep working.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from qzoom_swift.swift_plugin.templates import ImageEntryError

_GUARD_FLAG = "__qzoom_deploy_guard__"
SEND_INSTEAD = "send the image itself (base64 or a data: URL)"


def image_entry(request, index: int) -> str:
    """Where image ``index`` of an ms-swift ``InferRequest`` sits in the request the client sent.

    ms-swift numbers the images of ``messages`` in order (entries of type ``image``/``image_url`` with a
    value); when the messages hold none, the images are the request's ``images`` list.
    """
    seen = 0
    for m, message in enumerate(getattr(request, "messages", None) or []):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for c, item in enumerate(content):
            if not isinstance(item, dict) or item.get("type") not in ("image", "image_url"):
                continue
            value = item.get(item["type"])
            if isinstance(value, dict):
                value = value.get("url")
            if not value:
                continue
            if seen == index:
                return f"messages[{m}].content[{c}]"
            seen += 1
    return f"images[{index}]"


def name_request_error(request, exc: Exception) -> Exception:
    """``exc`` with the failing image's entry in front of its message (other errors are returned as they are)."""
    if isinstance(exc, ImageEntryError):
        named = ValueError(f"{image_entry(request, exc.index)} (image): {exc}")
        named.__cause__ = exc
        return named
    return exc


def detach_traceback(exc: BaseException) -> None:
    """Replace the tracebacks of ``exc`` and its causes by a note with the same text.

    ms-swift's ``_batch_encode`` keeps each error in a list that is a local of a frame the error's traceback
    holds, and a traceback holds its frames' callers too (the engine's ``_infer`` with the batch's inputs): a
    reference cycle, through which a failed request kept its whole batch (pixel values, token ids) until Python's
    full collection, which a server holding millions of objects runs rarely. Under the soak the server's memory
    in use grew 0.2-0.3 MiB per request that way, without levelling off. The note keeps the server's log as it was: where the error
    was raised.
    """
    text = "".join(traceback.format_exception(exc)).rstrip()
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack += [e.__cause__, e.__context__]
    exc.add_note(f"raised while encoding:\n{text}")


def encode_independently(engine) -> None:
    """Make ``engine`` encode every request on its own: a failure is that request's answer, never its batch's.

    The transformers engine's worker already hands each request its own result, exceptions included, when
    ``_batch_encode`` reports errors instead of raising; deploy's ``strict`` only made one error everyone's.
    """
    original = engine._batch_encode
    if getattr(original, _GUARD_FLAG, False):
        return

    @functools.wraps(original)
    def _batch_encode(infer_requests, strict):
        batched, errors = original(infer_requests, strict=False)
        for _, e in errors:
            detach_traceback(e)
        return batched, [(i, name_request_error(infer_requests[i], e)) for i, e in errors]

    setattr(_batch_encode, _GUARD_FLAG, True)
    engine._batch_encode = _batch_encode


@dataclass(frozen=True)
class MediaPolicy:
    """What a Q-Zoom server reads on a client's behalf besides the bytes the request carries."""

    allowed_dir: Path | None = None
    """The resolved folder whose files a request may name (``QZOOM_ALLOWED_LOCAL_MEDIA_PATH``); None: no file."""
    allow_urls: bool = False
    """Fetch http(s) URLs (``QZOOM_ALLOW_MEDIA_URLS``); ms-swift's own address checks still apply."""

    @classmethod
    def from_env(cls) -> MediaPolicy:
        """The policy from the ``QZOOM_*`` settings; a folder that does not exist is refused by name."""
        from qzoom_swift.config import read_env

        env = read_env()
        folder = env.allowed_local_media_path
        if folder is not None and not folder.expanduser().is_dir():
            raise ValueError(f"QZOOM_ALLOWED_LOCAL_MEDIA_PATH={str(folder)!r} is not a folder: point it at the one "
                             "folder whose images clients may name, or unset it to refuse server-side paths")
        return cls(Path(os.path.realpath(folder.expanduser())) if folder is not None else None, env.allow_media_urls)

    def check_path(self, path: str) -> None:
        """Raise unless ``path`` (a server-side file named in a request) lies inside the allowed folder."""
        if str(path).strip().lower().startswith("file:"):
            raise ValueError(f"Refusing to read {path!r}: this Q-Zoom server reads no file:// URLs; {SEND_INSTEAD}"
                             + (f", or a plain path inside {self.allowed_dir}" if self.allowed_dir else ""))
        if self.allowed_dir is None:
            raise ValueError(
                f"Refusing to read the server-side file {path!r}: this Q-Zoom server reads no files named in a "
                f"request; {SEND_INSTEAD}, or start swift deploy with QZOOM_ALLOWED_LOCAL_MEDIA_PATH=<folder> to "
                "let requests name files inside that one folder")
        real = os.path.realpath(os.path.expanduser(path))  # neither `..` nor a symlink steps outside
        if real != str(self.allowed_dir) and not real.startswith(str(self.allowed_dir) + os.sep):
            raise ValueError(f"Refusing to read the server-side file {path!r}: it is outside "
                             f"QZOOM_ALLOWED_LOCAL_MEDIA_PATH={str(self.allowed_dir)!r}; {SEND_INSTEAD}")

    def check_url(self, url: str) -> None:
        """Raise unless URLs are allowed."""
        if not self.allow_urls:
            raise ValueError(
                f"Refusing to fetch {url!r}: this Q-Zoom server fetches no URLs on a client's behalf; {SEND_INSTEAD}, "
                "or start swift deploy with QZOOM_ALLOW_MEDIA_URLS=1 (ms-swift then still refuses private and "
                "loopback addresses unless SWIFT_ALLOW_INTERNAL_URL=1)")


_STOCK_CHECKS: dict[tuple[type, str], object] = {}


def install_media_policy(policy: MediaPolicy) -> None:
    """Put ``policy`` in front of ms-swift's own checks of request media (``SafeMediaPath``, ``SafeUrlFetcher``).

    Every place in ms-swift that reads a request's file or URL asks these two classes first (the request
    parser inlining a path as base64, deploy's media materialisation), so one check covers them all.
    Process-wide, which is this server's process; installing again replaces the policy.
    """
    from swift.utils import SafeMediaPath, SafeUrlFetcher

    for cls, name, check in ((SafeMediaPath, "check", policy.check_path),
                             (SafeUrlFetcher, "check_url", policy.check_url)):
        stock = _STOCK_CHECKS.setdefault((cls, name), cls.__dict__[name].__func__)

        def guarded(klass, value, *args, _stock=stock, _check=check, **kwargs):
            _check(value)
            return _stock(klass, value, *args, **kwargs)

        setattr(cls, name, classmethod(guarded))


def name_async_errors(engine) -> None:
    """ms-swift's vLLM engine encodes each request on its own, in ``infer_async``: name the failing image's entry
    there too (the transformers engine does it in ``_batch_encode``, ``encode_independently``)."""
    original = engine.infer_async
    if getattr(original, _GUARD_FLAG, False):
        return

    @functools.wraps(original)
    async def infer_async(infer_request, *args, **kwargs):
        try:
            return await original(infer_request, *args, **kwargs)
        except ImageEntryError as exc:
            named = name_request_error(infer_request, exc)
            detach_traceback(named)
            raise named from None

    setattr(infer_async, _GUARD_FLAG, True)
    engine.infer_async = infer_async


def _guarded_register_app(original):
    @functools.wraps(original)
    def _register_app(self):
        from qzoom_swift.swift_plugin.backends import qzoom_subject

        if qzoom_subject(self.args, getattr(self, "template", None)) is not None:
            if getattr(self.args, "infer_backend", None) == "vllm":
                name_async_errors(self.infer_engine)
            else:
                encode_independently(self.infer_engine)
            install_media_policy(MediaPolicy.from_env())
        return original(self)

    setattr(_register_app, _GUARD_FLAG, True)
    return _register_app


def install_deploy_guard() -> None:
    """Wrap ``SwiftDeploy._register_app`` when ``swift deploy`` is running (idempotent).

    The deploy module imports FastAPI and uvicorn, so it is wrapped only once something imported it: the
    ``swift deploy`` command (and ``swift eval``'s deploy) does so before it parses arguments, hence before
    this plugin loads.
    """
    module = sys.modules.get("swift.pipelines.infer.deploy")
    if module is not None and not getattr(module.SwiftDeploy._register_app, _GUARD_FLAG, False):
        module.SwiftDeploy._register_app = _guarded_register_app(module.SwiftDeploy._register_app)
