"""``TLoRAWeights``: a T-LoRA (or LoRA) file once read, mapped onto the diffusion model's modules.

Every reader (our own format, the reference code's SDXL/FLUX files, LyCORIS, plain LoRA) returns one
of these; the Loader and the Trainer consume it. Module paths are ComfyUI's names inside the
diffusion model (LDM names for SDXL such as ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``,
BFL names for FLUX such as ``double_blocks.0.img_attn.qkv``), without the ``diffusion_model.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .adapter import LowRankAdapter, RankSchedule

ARCHITECTURES = ("sdxl", "flux")


@dataclass
class TLoRAWeights:
    adapters: dict[str, list[LowRankAdapter]]
    architecture: str                      # "sdxl" | "flux"
    variant: str                           # one of adapter.VARIANTS
    schedule: RankSchedule | None          # None: the file does not say; the caller must supply it
    source_format: str                     # "tlora" | "reference-sdxl" | "reference-flux" | "lycoris" | "lora"
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def with_schedule(self, min_rank: int | None = None, power: float | None = None) -> TLoRAWeights:
        """A copy whose masked adapters use ``min_rank`` / ``power`` instead of the file's values.

        Adapters without a schedule (plain LoRA, Ortho-LoRA without mask) stay unmasked. The rank
        of each adapter's schedule is kept (re-factored plain LoRAs can have a rank per layer).
        """
        def override(s: RankSchedule | None) -> RankSchedule | None:
            if s is None:
                return None
            return RankSchedule(s.rank, s.min_rank if min_rank is None else min(min_rank, s.rank),
                                s.power if power is None else power, s.T)

        adapters = {name: [replace(a, schedule=override(a.schedule), _device_copies={}) for a in group]
                    for name, group in self.adapters.items()}
        return replace(self, adapters=adapters, schedule=override(self.schedule))
