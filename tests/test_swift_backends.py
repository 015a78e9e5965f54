"""The plugin's templates refuse ms-swift engines that never call ``template.generate`` (zoom would be off)."""

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
    with pytest.raises(ValueError, match="needs --infer_backend transformers") as exc:
        template.set_mode(backend)
    assert MODEL_TYPES[family] in str(exc.value) and backend in str(exc.value)
    assert template.mode != backend  # nothing half-set


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_and_transformers_modes_pass(templates, family):
    template = templates[family]
    for mode in ("train", "transformers"):
        template.set_mode(mode)
        assert template.mode == mode
