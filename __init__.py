"""T-LoRA nodes for ComfyUI: registration only.

ComfyUI loads this package and calls ``comfy_entrypoint``. The ComfyUI import happens inside that
call, so ``tlora_core`` (pure torch) stays importable and testable without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import TLoRAExtension

    return TLoRAExtension()
