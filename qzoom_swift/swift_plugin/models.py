"""``qzoom_*`` model types: the stock ms-swift loaders, plus the Q-Zoom branches attached after loading."""

from __future__ import annotations

import dataclasses

from qzoom_swift.families.registry import FAMILIES


def _qzoom_loader(base_loader: type) -> type:
    class QZoomLoader(base_loader):
        """Loads the stock model, then attaches the branches (configured by ``QZOOM_*`` variables)."""

        def get_model(self, model_dir, *args, **kwargs):
            from qzoom_swift.branches import attach_branches, mark_trained_branches
            from qzoom_swift.config import effective_config, read_env

            env = read_env()
            model = super().get_model(model_dir, *args, **kwargs)
            # QZOOM_ATTACH=0: no branches (Post-SFT trains the LLM on stored RoIs and never runs them; under
            # ZeRO-3 the partitioned layers could not be copied anyway). Re-attach with --adapters later.
            if env.attach:
                attach_branches(model, effective_config())
                # Fresh copies of base layers: recorded as untrained, so mode zoom falls back to never until
                # --adapters loads a checkpoint (which brings its own record; the tuner extends it when training).
                mark_trained_branches(model, ())
                check_router(model, branch_layout=False)  # before serving: --adapters may still change B and R
            return model

    QZoomLoader.__name__ = QZoomLoader.__qualname__ = f"QZoom{base_loader.__name__}"
    return QZoomLoader


def check_router(model, branch_layout: bool = True) -> None:
    """Build the router ``QZOOM_ROUTER`` asks for and check it against ``model`` now, at start-up.

    A wrong ONNX directory, precision, provider or graph otherwise passed start-up and failed every request
    (``swift deploy`` answered HTTP 400 while reporting healthy). ``branch_layout=False`` skips B and R,
    which a checkpoint loaded afterwards (``--adapters``) may still change; the tuner checks them then.
    """
    from swift.utils import get_logger

    from qzoom_swift.onnx.router import OnnxRouterError, model_signature, router_from_env

    router = router_from_env(log=get_logger().info)  # the one log line of the (cached) router is written here
    if router is None:
        return
    if branch_layout:
        router.check_model(model)
        return
    have, meta = model_signature(model), router.metadata["gate"]
    wrong = [k for k in ("family", "hidden_size", "num_hidden_layers") if meta.get(k) != have.get(k)]
    if wrong:
        raise OnnxRouterError(
            f"QZOOM_ONNX_DIR {router.onnx_dir}: the graphs were exported from another model than {type(model).__name__} "
            f"(mismatch in {', '.join(wrong)}: graphs {[meta.get(k) for k in wrong]}, model {[have[k] for k in wrong]})")


def register_models() -> None:
    from swift.model import MODEL_MAPPING, Model, ModelGroup, register_model

    for spec in FAMILIES.values():
        base = MODEL_MAPPING[spec.swift_model_type]
        meta = dataclasses.replace(
            base,
            model_type=spec.qzoom_model_type,
            model_groups=[ModelGroup([Model()])],
            loader=_qzoom_loader(base.loader),
            template=spec.qzoom_model_type,
            model_arch=spec.swift_model_arch,
            architectures=[],  # never auto-selected: Q-Zoom is asked for with --model_type
            is_multimodal=True,
        )
        globals()[meta.loader.__name__] = meta.loader  # importable by name: swift eval pickles the model meta
        register_model(meta, exist_ok=True)


def __getattr__(name: str):
    """Loader classes exist once ``register_models`` ran; a spawned process unpickles them before that.

    ``swift eval`` hands its arguments (model meta included) to a ``spawn``ed ``swift deploy`` process,
    which looks the loader up here before it re-imports the plugin.
    """
    if name.startswith("QZoom") and name.endswith("Loader"):
        register_models()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
