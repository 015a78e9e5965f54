"""Which ms-swift inference backends zoom, checked before any engine or server starts; vLLM's set-up.

Q-Zoom zooms inside the template: in ``generate`` on the transformers engine, in ``encode`` on the vLLM engine
(a front router decides each request before vLLM sees it: ``vllm_serving``). LMDeploy and SGLang use the template
to encode and generate on their own, so with them a ``qzoom_*`` model would silently answer from the
low-resolution pass. They set the template's mode only per request, and ``swift eval`` builds no engine in its
own process at all (it spawns ``swift deploy`` and waits for the port, forever if the server dies). So the plugin
wraps the two ms-swift entry points that see the arguments first: ``SwiftInfer.get_infer_engine`` (``swift
infer``, ``swift deploy``, the app; for vLLM it also loads the router and takes the branch checkpoint out of
vLLM's LoRA arguments) and ``SwiftEval.run``.
"""

from __future__ import annotations

import functools
import sys

from qzoom_swift.families.registry import FAMILIES

UNSUPPORTED_BACKENDS = ("lmdeploy", "sglang")
"""ms-swift inference engines that encode with the template but generate without it, and do not route."""
SUPPORTED_BACKENDS = ("transformers", "pt", "vllm")
"""The transformers engine (``pt`` is its ms-swift 3.x name, still accepted by ms-swift 4.6) and vLLM."""
QZOOM_NAMES = frozenset(spec.qzoom_model_type for spec in FAMILIES.values())
_GUARD_FLAG = "__qzoom_backend_guard__"


def backend_refusal(subject: str, backend: str) -> ValueError:
    """The one message for every refusal: what was asked, why it cannot zoom, the flag that fixes it."""
    return ValueError(
        f"{subject} needs --infer_backend transformers or vllm (got {backend}; `pt`, the ms-swift 3.x name of the "
        f"transformers engine, works too): Q-Zoom zooms inside the transformers engine's generate or in front of "
        f"vLLM, and the {backend} engine would answer from the low-resolution pass only. "
        "Use --infer_backend transformers (or pt) or vllm, or the stock model type and template without Q-Zoom.")


def qzoom_subject(args, template=None) -> str | None:
    """How the run asks for Q-Zoom (for the message), or None when it does not."""
    template_type = getattr(getattr(template, "template_meta", None), "template_type", None)
    if template_type in QZOOM_NAMES:  # the qzoom_* templates are registered under the model type names
        return f"the Q-Zoom template {template_type!r}"
    for flag in ("model_type", "template"):
        value = getattr(args, flag, None)
        if value in QZOOM_NAMES:
            return f"--{flag} {value} (Q-Zoom)"
    return None


def check_infer_backend(args, template=None, backend: str | None = None) -> None:
    """Raise the refusal when a Q-Zoom run asks for an engine other than transformers."""
    backend = backend or getattr(args, "infer_backend", None)
    if backend is None or backend in SUPPORTED_BACKENDS:
        return
    subject = qzoom_subject(args, template)
    if subject is not None:
        raise backend_refusal(subject, backend)


def _guarded_get_infer_engine(original):
    @functools.wraps(original)
    def get_infer_engine(args, template=None, **kwargs):
        backend = kwargs.get("infer_backend") or getattr(args, "infer_backend", None)
        check_infer_backend(args, template, backend)
        if backend != "vllm" or template is None or qzoom_subject(args, template) is None:
            return original(args, template, **kwargs)
        from qzoom_swift.swift_plugin.vllm_serving import attach_engine, prepare

        adapters = list(getattr(args, "adapters", None) or [])
        checkpoint = prepare(args, template)
        args.adapters = [a for a in adapters if checkpoint is None or a != checkpoint]  # not a LoRA for vLLM
        try:
            engine = original(args, template, **kwargs)
        finally:
            args.adapters = adapters
        attach_engine(engine, checkpoint)
        return engine

    setattr(get_infer_engine, _GUARD_FLAG, True)
    return staticmethod(get_infer_engine)


def check_swift_eval_runs() -> None:
    """``swift eval`` of ms-swift 4.6 asks evalscope for ``EvalType.SERVICE``, which evalscope 1.14 renamed.

    It would fail only after its deploy server loaded the model; say so first, with the routes that work.
    """
    from evalscope.constants import EvalType

    if not hasattr(EvalType, "SERVICE"):
        raise RuntimeError(
            "swift eval cannot run with this evalscope: ms-swift's eval pipeline uses EvalType.SERVICE, which "
            "this evalscope no longer has (it is EvalType.OPENAI_API). Evaluate Q-Zoom with `qzoom eval`, or "
            "start `swift deploy` and run `evalscope eval --eval-type openai_api --api-url http://HOST:PORT/v1`.")


def _guarded_eval_run(original):
    @functools.wraps(original)
    def run(self):
        if not getattr(self.args, "eval_url", None) and qzoom_subject(self.args) is not None:
            check_infer_backend(self.args)  # eval_url: nothing is deployed here
            check_swift_eval_runs()
        return original(self)

    setattr(run, _GUARD_FLAG, True)
    return run


def install_backend_guard() -> None:
    """Wrap ``SwiftInfer.get_infer_engine`` and, when ``swift eval`` is running, ``SwiftEval.run`` (idempotent).

    The eval pipeline module imports evalscope, so it is wrapped only once something imported it (the
    ``swift eval`` command does so before it parses arguments, hence before this plugin loads).
    """
    from swift.pipelines.infer.infer import SwiftInfer

    if not getattr(SwiftInfer.get_infer_engine, _GUARD_FLAG, False):
        SwiftInfer.get_infer_engine = _guarded_get_infer_engine(SwiftInfer.get_infer_engine)
    eval_module = sys.modules.get("swift.pipelines.eval.eval")
    if eval_module is not None and not getattr(eval_module.SwiftEval.run, _GUARD_FLAG, False):
        eval_module.SwiftEval.run = _guarded_eval_run(eval_module.SwiftEval.run)
