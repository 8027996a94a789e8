"""The pack's ComfyUI nodes (V3 schema), registered through one ComfyExtension."""

from comfy_api.latest import ComfyExtension, io


class TLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


NODE_LIST: list[type[io.ComfyNode]] = []

from .train import TLoRATrain  # noqa: E402

NODE_LIST.append(TLoRATrain)

from .loader import TLoRALoader  # noqa: E402
from .schedule_preview import TLoRASchedulePreview  # noqa: E402

NODE_LIST += [TLoRALoader, TLoRASchedulePreview]
