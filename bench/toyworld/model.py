"""The toy base model: ComfyUI's own SDXL UNet class at small widths, as a ModelPatcher.

1.9 M parameters: 32 base channels, three levels (16, 8, 4 pixels), cross-attention on the two
coarser levels with 16-channel heads, the toy text encoder's 32-wide context and pooled output.
Its sampling is SDXL's (epsilon prediction, ComfyUI's discrete 1000-step table), so T-LoRA's rank
schedule runs on the same timestep rule as on a real SDXL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import text

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "base_sdxl_toy.safetensors"

UNET_CONFIG: dict[str, Any] = {
    "model_channels": 32, "in_channels": 4, "out_channels": 4,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2],
    "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": text.WIDTH, "adm_in_channels": text.WIDTH + 6 * 256,
    "use_linear_in_transformer": True, "num_classes": "sequential", "legacy": False,
    "use_spatial_transformer": True, "image_size": 16, "use_checkpoint": False,
    "use_temporal_attention": False, "use_temporal_resblock": False, "num_head_channels": 16,
}


def base_model(seed: int = 0):
    """The SDXL BaseModel of ``UNET_CONFIG`` (fp32, CPU) with seeded initial weights."""
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(UNET_CONFIG))
    config.unet_config["num_head_channels"] = UNET_CONFIG["num_head_channels"]
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            # ComfyUI leaves layers uninitialised; a plain scaled init is enough for a toy.
            if param.ndim == 1:
                param.copy_(torch.ones_like(param) if "norm" in name else torch.zeros_like(param))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in ** 0.5)
    return model


def patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def load_base(path: Path = WEIGHTS):
    """The shipped (or a regenerated) toy base model as a ComfyUI MODEL (ModelPatcher), fp32."""
    import safetensors.torch

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `scripts/toyworld_pretrain.sh` to make it")
    model = base_model()
    state = {k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()}
    model.diffusion_model.load_state_dict(state, strict=True)
    return patcher(model)
