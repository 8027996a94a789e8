"""``TLoRAWeights``: a T-LoRA (or LoRA) file once read, mapped onto the diffusion model's modules.

Every reader (our own format, the reference code's SDXL/FLUX files, LyCORIS, plain LoRA) returns one
of these; the Loader and the Trainer consume it. Module paths are ComfyUI's names inside the
diffusion model (LDM names for SDXL such as ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``,
BFL names for FLUX such as ``double_blocks.0.img_attn.qkv``), without the ``diffusion_model.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .adapter import LowRankAdapter, RankSchedule


@dataclass
class TLoRAWeights:
    adapters: dict[str, list[LowRankAdapter]]
    architecture: str                      # a family id (tlora_core.families)
    variant: str                           # one of adapter.VARIANTS
    schedule: RankSchedule | None          # None: the file does not say; the caller must supply it
    source_format: str                     # "tlora" | "reference-sdxl" | "reference-flux" | "lycoris" | "lora"
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
