"""The pack's ComfyUI nodes (V3 schema), registered through one ComfyExtension."""

from comfy_api.latest import ComfyExtension, io

from .loader import TLoRALoader
from .schedule_preview import TLoRASchedulePreview
from .train import TLoRATrain

NODE_LIST: list[type[io.ComfyNode]] = [TLoRALoader, TLoRATrain, TLoRASchedulePreview]


class TLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)
