"""The family registry: the one list of model families Q-Zoom supports, and their plain facts.

Standard library only, so the CLI's ``--help``, ``QZoomConfig`` validation and the ms-swift registration
can name the families without importing torch. Behaviour that needs the model (how to run its layers,
encode a crop, place RoI positions) lives in the family adapters (``qzoom_swift.families.<family>``);
every other module asks this registry or the adapter instead of testing a family name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilySpec:
    """What Q-Zoom needs to know about a model family before loading a model."""

    name: str
    """Q-Zoom family name (``QZoomConfig.family``, ``--family``)."""
    title: str
    """Human name, for messages."""
    model_types: tuple[str, ...]
    """Hugging Face ``config.model_type`` values of this family."""
    patch_unit: int
    """Pixels per side of one merged visual token (resize rules and pixel boxes use it)."""
    fixed_resolution: bool
    """True when the processor encodes every image at one size, so token budgets do not apply."""
    swift_model_type: str
    """ms-swift's stock model type that the ``qzoom_*`` model type extends."""
    swift_template: str
    """ms-swift's stock template that the ``qzoom_*`` template extends."""
    swift_model_arch: str
    """ms-swift ``ModelArch`` name of the stock model."""
    adapter: str
    """``module:Class`` of the family adapter (imported on first use: it needs torch)."""
    llamafactory_template: str = ""
    """LLaMA-Factory's chat template of the family's base chat format (a recipe's ``template``; Qwen3-VL Instruct
    checkpoints use ``qwen3_vl_nothink``, LLaMA-Factory's own mapping for them)."""
    vllm_architecture: str | None = None
    vllm_image_embeds: bool = False
    """Whether the vLLM wing can hand vLLM the router's image features instead of the images
    (``QZoomVLLM(pass_embeddings=True)``); Qwen3-VL's carry DeepStack levels and LLaVA's another layout: not done."""
    """The Q-Zoom model class registered with vLLM (``vllm_plugin.models``); None when vLLM's stock model already
    places the crop at Q-Zoom's positions (sequential positions: the crop right after the source image)."""
    known_branch_layers: dict[tuple[int, int], int] = field(default_factory=dict)
    """B of the released checkpoints: (decoder layers, hidden size) -> B."""

    @property
    def qzoom_model_type(self) -> str:
        """The plugin's ms-swift model type (and template name) for this family."""
        return f"qzoom_{self.swift_model_type}"


RELEASED_PAD_FILL = (127, 127, 127)
"""The grey the released stage-1 labelling pads Qwen images with (``expand2square``, reference §2.1). LLaVA-1.5
pads with its processor's mean colour instead (``image_aspect_ratio: pad``, ``families.llava``)."""

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("qwen2_5_vl", "Qwen2.5-VL", ("qwen2_5_vl",), patch_unit=28, fixed_resolution=False,
                   swift_model_type="qwen2_5_vl", swift_template="qwen2_5_vl", swift_model_arch="qwen2_vl",
                   adapter="qzoom_swift.families.qwen:Qwen2_5VLAdapter", llamafactory_template="qwen2_vl",
                   vllm_architecture="QZoomQwen2_5_VLForConditionalGeneration", vllm_image_embeds=True,
                   known_branch_layers={(36, 2048): 24,  # Qwen2.5-VL-3B
                                        (28, 3584): 18}),  # Qwen2.5-VL-7B
        FamilySpec("qwen3_vl", "Qwen3-VL", ("qwen3_vl",), patch_unit=32, fixed_resolution=False,
                   swift_model_type="qwen3_vl", swift_template="qwen3_vl", swift_model_arch="qwen3_vl",
                   adapter="qzoom_swift.families.qwen:Qwen3VLAdapter", llamafactory_template="qwen3_vl",
                   vllm_architecture="QZoomQwen3VLForConditionalGeneration",
                   known_branch_layers={(36, 2560): 24}),  # Qwen3-VL-4B
        FamilySpec("llava", "LLaVA-1.5", ("llava",), patch_unit=14, fixed_resolution=True,
                   swift_model_type="llava1_5_hf", swift_template="llava1_5_hf", swift_model_arch="llava_hf",
                   adapter="qzoom_swift.families.llava:LlavaAdapter", llamafactory_template="llava",
                   known_branch_layers={(32, 4096): 15,  # LLaVA-1.5-7B
                                        (40, 5120): 15}),  # LLaVA-1.5-13B
    )
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def get_spec(family: str) -> FamilySpec:
    """The spec of a Q-Zoom family name; a clear error naming the supported ones."""
    spec = FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"unknown Q-Zoom family {family!r}; supported: {', '.join(FAMILY_NAMES)}")
    return spec


def family_for_model_type(model_type: str | None) -> str | None:
    """The Q-Zoom family of a Hugging Face ``model_type`` (None when unsupported)."""
    return next((spec.name for spec in FAMILIES.values() if model_type in spec.model_types), None)


def supported_model_types() -> str:
    """``qwen2_5_vl (qwen2_5_vl), ...`` for error messages."""
    return ", ".join(f"{spec.name} ({'/'.join(spec.model_types)})" for spec in FAMILIES.values())
