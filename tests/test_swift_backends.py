"""The plugin's templates refuse ms-swift engines that neither call ``template.generate`` nor route (zoom would be
off); vLLM routes in ``encode`` (served for real in tests/vllm_wing/test_swift_vllm.py)."""

from __future__ import annotations

import pytest

from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.swift_plugin import MODEL_TYPES
from qzoom_swift.swift_plugin.templates import UNSUPPORTED_BACKENDS


@pytest.fixture(scope="module")
def templates(tiny_dir):
    """One qzoom_* template per family, built the way ms-swift builds it (processor from the tiny model)."""
    from swift.model import get_model_processor
    from swift.template import get_template

    from qzoom_swift.swift_plugin import register

    register()
    out = {}
    for family in FAMILY_NAMES:
        _, processor = get_model_processor(str(tiny_dir(family)), model_type=MODEL_TYPES[family], load_model=False)
        out[family] = get_template(processor, template_type=MODEL_TYPES[family])
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("backend", UNSUPPORTED_BACKENDS)
def test_non_transformers_backends_are_refused_with_the_fix(templates, family, backend):
    template = templates[family]
    with pytest.raises(ValueError, match="needs --infer_backend transformers or vllm") as exc:
        template.set_mode(backend)
    assert MODEL_TYPES[family] in str(exc.value) and backend in str(exc.value)
    assert template.mode != backend  # nothing half-set


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_transformers_and_vllm_modes_pass(templates, family):
    template = templates[family]
    for mode in ("train", "vllm", "transformers"):
        template.set_mode(mode)
        assert template.mode == mode


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vllm_mode_names_the_qzoom_model_class_and_needs_its_router(templates, family):
    """The engine gets the family's registered class (LLaVA: the stock one); encoding without the router that
    ``swift infer/deploy`` loads says how to get one instead of serving without Q-Zoom."""
    from qzoom_swift.families.registry import FAMILIES

    template = templates[family]
    template.set_mode("vllm")
    try:
        arch = FAMILIES[family].vllm_architecture
        assert template.prepare_engine_kwargs() == ({} if arch is None else {"hf_overrides": {"architectures": [arch]}})
        with pytest.raises(RuntimeError, match="no front router.*--infer_backend vllm"):
            template.encode({"messages": [{"role": "user", "content": "hello"}]})
    finally:
        template.set_mode("transformers")


def test_vllm_takes_one_branch_checkpoint_and_refuses_a_lora_with_the_fix(tmp_path):
    from qzoom_swift.checkpoint import BRANCH_WEIGHTS_NAME, CONFIG_NAME
    from qzoom_swift.swift_plugin.vllm_serving import split_adapters

    branches, lora = tmp_path / "branches", tmp_path / "lora"
    for folder, files in ((branches, (BRANCH_WEIGHTS_NAME, CONFIG_NAME)), (lora, ("adapter_config.json",))):
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    assert split_adapters([str(branches)]) == str(branches)
    assert split_adapters([]) is None
    with pytest.raises(ValueError, match="Merge the LoRA first") as exc:
        split_adapters([str(branches), str(lora)])
    assert str(lora) in str(exc.value)
    with pytest.raises(ValueError, match="names 2 Q-Zoom branch checkpoints"):
        split_adapters([str(branches), str(branches)])


@pytest.fixture
def guarded():
    """ms-swift's infer and eval pipelines with the plugin's backend guard installed (as the plugin does)."""
    import swift.pipelines.eval.eval as eval_module
    from swift.pipelines.infer.infer import SwiftInfer

    from qzoom_swift.swift_plugin import register
    from qzoom_swift.swift_plugin.backends import install_backend_guard

    register()
    install_backend_guard()  # again: the eval module may have been imported after register() ran
    return SwiftInfer, eval_module


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("backend", UNSUPPORTED_BACKENDS)
def test_qzoom_runs_are_refused_before_any_engine_is_built(guarded, templates, family, backend):
    """swift infer/deploy reach get_infer_engine with the backend: refused there, before its module is imported."""
    import sys
    from types import SimpleNamespace

    swift_infer, _ = guarded
    engine_module = f"swift.infer_engine.{backend}_engine"
    was_imported = engine_module in sys.modules
    by_template = SimpleNamespace(infer_backend=backend, model_type=None, template=None)
    by_model_type = SimpleNamespace(infer_backend=backend, model_type=MODEL_TYPES[family], template=None)
    for args, template in ((by_template, templates[family]), (by_model_type, None)):
        with pytest.raises(ValueError, match="needs --infer_backend transformers") as exc:
            swift_infer.get_infer_engine(args, template)
        assert "`pt`" in str(exc.value) and backend in str(exc.value) and MODEL_TYPES[family] in str(exc.value)
    assert (engine_module in sys.modules) == was_imported  # nothing of the engine was even imported


def test_stock_runs_and_the_transformers_backend_pass_the_guard(templates):
    from types import SimpleNamespace

    from qzoom_swift.swift_plugin.backends import check_infer_backend

    for backend in UNSUPPORTED_BACKENDS:  # a stock model type is ms-swift's business
        check_infer_backend(SimpleNamespace(infer_backend=backend, model_type="qwen2_5_vl", template="qwen2_5_vl"))
    for backend in ("transformers", "pt"):
        for family, template in templates.items():
            check_infer_backend(SimpleNamespace(infer_backend=backend, model_type=MODEL_TYPES[family]), template)


@pytest.mark.parametrize("backend", UNSUPPORTED_BACKENDS)
def test_swift_eval_refuses_before_it_deploys(guarded, monkeypatch, backend):
    """swift eval spawns swift deploy and polls its port forever if it dies: refuse in the parent, first."""
    from types import SimpleNamespace

    _, eval_module = guarded

    def no_deploy(*args, **kwargs):
        raise AssertionError("swift eval started a deploy server for a refused backend")

    monkeypatch.setattr(eval_module, "run_deploy", no_deploy)
    pipeline = SimpleNamespace(args=SimpleNamespace(infer_backend=backend, model_type="qzoom_qwen2_5_vl",
                                                    template=None, eval_url=None))
    with pytest.raises(ValueError, match="needs --infer_backend transformers"):
        eval_module.SwiftEval.run(pipeline)


def test_the_guard_wraps_once(guarded):
    from qzoom_swift.swift_plugin.backends import install_backend_guard

    swift_infer, eval_module = guarded
    before = (swift_infer.__dict__["get_infer_engine"], eval_module.SwiftEval.run)
    install_backend_guard()
    assert (swift_infer.__dict__["get_infer_engine"], eval_module.SwiftEval.run) == before


def test_plugin_folder_shadows_nothing():
    """ms-swift puts the plugin's folder first on sys.path, spawned children too: `datasets.py` there broke them."""
    import importlib.util
    import sys
    from pathlib import Path

    from qzoom_swift.swift_plugin import PLUGIN_FILE

    folder = PLUGIN_FILE.parent.resolve()
    names = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != folder]
        clashes = [n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n) is not None]
    finally:
        sys.path[:] = saved
    assert clashes == [], f"modules in {folder} shadow installed or stdlib modules: {clashes}"


def test_swift_eval_says_why_it_cannot_run_with_this_evalscope(guarded, monkeypatch):
    """ms-swift 4.6's eval uses EvalType.SERVICE (gone in evalscope 1.14): refused before the deploy, with routes."""
    from types import SimpleNamespace

    from evalscope.constants import EvalType

    _, eval_module = guarded

    class Deployed(Exception):
        pass

    def deploy(*args, **kwargs):
        raise Deployed

    monkeypatch.setattr(eval_module, "run_deploy", deploy)
    pipeline = SimpleNamespace(args=SimpleNamespace(infer_backend="transformers", model_type="qzoom_qwen2_5_vl",
                                                    template=None, eval_url=None))
    monkeypatch.delattr(EvalType, "SERVICE", raising=False)
    with pytest.raises(RuntimeError, match="EvalType.SERVICE.*qzoom eval"):
        eval_module.SwiftEval.run(pipeline)
    monkeypatch.setattr(EvalType, "SERVICE", "openai_api", raising=False)
    with pytest.raises(Deployed):  # an evalscope that has it: swift eval goes on to deploy
        eval_module.SwiftEval.run(pipeline)


@pytest.mark.slow
def test_swift_infer_with_lmdeploy_or_sglang_stops_before_the_engine(tiny_dir, shape_dataset, tmp_path):
    """The real CLI: the refusal (not an import error of the absent backend) before the engine is built."""
    from qzoom_swift.bench.sft import run_swift_concurrently
    from qzoom_swift.swift_plugin import plugin_path

    commands = {backend: ["infer", "--external_plugins", plugin_path(), "--model", str(tiny_dir("qwen2_5_vl")),
                          "--model_type", "qzoom_qwen2_5_vl", "--infer_backend", backend,
                          "--val_dataset", str(shape_dataset), "--result_path", str(tmp_path / f"{backend}.jsonl")]
                for backend in ("lmdeploy", "sglang")}
    for backend, run in run_swift_concurrently(commands, tmp_path).items():
        log = run.log.read_text(errors="replace")
        assert run.returncode != 0
        assert "needs --infer_backend transformers" in log and f"got {backend}" in log, log[-3000:]
        assert f"No module named '{backend}'" not in log
