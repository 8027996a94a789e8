"""The real ComfyUI runtime for tests, the demo and benchmarks: bootstrap, tiny models, sampling.

``bootstrap()`` puts the ComfyUI root first on ``sys.path`` (from ``COMFYUI_ROOT``, else the
runtime that ``scripts/setup_runtime.sh`` provisions in ``.runtime/0.3.75/ComfyUI``), forces CPU, and
imports the pack as the package ``comfyui_tlora`` so tests use the same module objects that the
nodes use. Tiny models of every family (configs in ``family_configs``) are built from ComfyUI's own
model classes with seeded weights; the real-size ones (each family file's ``real_config``) on
torch's meta device give real module names and shapes without memory.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

import comfy_compat
import family_configs

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_tlora"


def import_pack():
    """The repository imported as the package ``comfyui_tlora`` (idempotent)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


# The pack's family registry (pure torch: importable before ComfyUI is bootstrapped).
families = importlib.import_module(f"{import_pack().__name__}.tlora_core.families")

TINY_SDXL_CONFIG: dict[str, Any] = family_configs.TINY["sdxl"].config
TINY_FLUX_CONFIG: dict[str, Any] = family_configs.TINY["flux"].config
# The real-size configs come from the family files (e.g. SDXL as ComfyUI detects sd_xl_base_1.0,
# FLUX.1-dev with 19 double and 38 single blocks).
REAL_SDXL_CONFIG: dict[str, Any] = dict(families.get("sdxl").real_config)
REAL_FLUX_CONFIG: dict[str, Any] = dict(families.get("flux").real_config)

_BOOTSTRAPPED = False


def comfyui_root() -> Path:
    root = Path(os.environ.get("COMFYUI_ROOT") or REPO / ".runtime" / "0.3.75" / "ComfyUI")
    if not (root / "nodes.py").is_file():
        raise RuntimeError(
            f"No ComfyUI at {root}. Run scripts/setup_runtime.sh, or set COMFYUI_ROOT to a ComfyUI "
            "checkout.")
    return root


def comfyui_version() -> str:
    """The version of the ComfyUI at :func:`comfyui_root`, read from its ``comfyui_version.py``
    without importing ComfyUI (test collection uses it)."""
    import re

    text = (comfyui_root() / "comfyui_version.py").read_text(encoding="utf-8")
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    if match is None:
        raise RuntimeError(f"no __version__ in {comfyui_root() / 'comfyui_version.py'}")
    return match.group(1)


def family_spec(tiny_id: str):
    """The pack's registry entry of a tiny model's family (``tiny_id``: a family or a variant)."""
    return families.get(family_configs.registry_id(tiny_id))


def real_config(family: str, name: str | None = None) -> dict[str, Any]:
    """The family file's real config, or its other real config ``name`` (FLUX.2 Klein)."""
    spec = families.get(family)
    return dict(spec.real_config if name is None else spec.other_real_configs[name])


def _comfyui_first() -> None:
    """Put the ComfyUI root first on ``sys.path``, even when already listed: the repository's own
    ``nodes`` package must never shadow ComfyUI's nodes.py (a bench module imported by a test may
    have put the repository in front since the bootstrap)."""
    root = str(comfyui_root())
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)


def bootstrap(cpu: bool = True) -> None:
    """Make ComfyUI importable in this process, on the CPU unless ``cpu=False`` (device scripts
    under bench/; the first call decides, and on a GPU turns on ComfyUI's dynamic VRAM where it
    has one, see :func:`enable_dynamic_vram`), and import the pack."""
    global _BOOTSTRAPPED, DYNAMIC_VRAM
    if _BOOTSTRAPPED:
        return
    _comfyui_first()
    import comfy.options

    comfy.options.args_parsing = False
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_all_custom_nodes = False
    # Must come before `nodes`: it puts ComfyUI/comfy first on sys.path, after which a bare
    # `import utils` would find comfy/utils.py.
    import comfy.model_management  # noqa: F401
    import utils.extra_config  # noqa: F401

    comfy_compat.configure()
    import_pack()
    if not cpu:
        DYNAMIC_VRAM = enable_dynamic_vram()
    _BOOTSTRAPPED = True


DYNAMIC_VRAM = "off (CPU)"   # what enable_dynamic_vram() said, once bootstrap(cpu=False) ran


def enable_dynamic_vram() -> str:
    """Turn on ComfyUI's dynamic VRAM (0.33+: ``ModelPatcherDynamic`` behind comfy-aimdo) in this
    process as ComfyUI's main.py does at start-up: importing ComfyUI alone keeps the legacy patcher.
    Returns ``"on"`` or why it stays off."""
    import comfy.cli_args
    import comfy.model_management as mm
    import comfy.model_patcher

    args = comfy.cli_args.args
    if not hasattr(comfy.cli_args, "enables_dynamic_vram") or \
            not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "off: this ComfyUI has no dynamic VRAM"
    import comfy.memory_management

    if not comfy.cli_args.enables_dynamic_vram():
        return "off: disabled by ComfyUI's arguments"
    if not mm.is_nvidia():
        return "off: main.py enables it on NVIDIA GPUs here"
    if mm.torch_version_numeric < (2, 8):
        return "off: needs PyTorch 2.8+"
    import comfy_aimdo.control

    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
    try:
        loaded = comfy_aimdo.control.init(simple_vram_headroom=headroom,
                                          nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:   # older comfy-aimdo protocols, as main.py
        loaded = comfy_aimdo.control.init()
    devices = mm.get_all_torch_devices()
    try:
        ready = comfy_aimdo.control.init_devices(
            (d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
    except TypeError:
        ready = comfy_aimdo.control.init_devices(d.index for d in devices)
    if loaded is False or not ready:
        return "off: comfy-aimdo did not initialise"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "on"


def init_nodes() -> None:
    """Load ComfyUI's built-in extra nodes and register the pack's nodes (idempotent)."""
    bootstrap()
    if "nodes" not in sys.modules:
        _comfyui_first()
    import nodes

    if getattr(init_nodes, "_done", False):
        return
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    extension = asyncio.run(sys.modules[PACK_NAME].comfy_entrypoint())
    for node_cls in asyncio.run(extension.get_node_list()):
        schema = node_cls.GET_SCHEMA()
        nodes.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
        nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
    init_nodes._done = True


def _fill_seeded(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    # ComfyUI creates layers with uninitialised memory (comfy.ops.disable_weight_init).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("norm.weight", "scale")) or ".norm" in name and name.endswith("weight"):
                param.copy_(1.0 + std * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen))


def family_model_config(family: str, config: dict[str, Any] | None = None):
    """ComfyUI's model config object (``comfy.supported_models``) for ``family`` at ``config``
    (default: the tiny config), completed with what this runtime's model classes require."""
    bootstrap()
    import comfy.supported_models

    if family not in family_configs.TINY:
        raise ValueError(f"unknown model family {family!r}")
    tiny = family_configs.TINY[family]
    model_config = getattr(comfy.supported_models, tiny.supported_model)(
        tiny.complete(dict(config or tiny.config)))
    tiny.fix(model_config)
    return model_config


def build_model(family: str, config: dict[str, Any] | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A ComfyUI ModelPatcher around an SDXL or FLUX model built from ComfyUI's classes.

    ``config`` defaults to the tiny config of the family; weights are seeded random values unless
    ``device`` is ``"meta"`` (real-size shapes without memory).
    """
    bootstrap()
    import comfy.model_management
    import comfy.model_patcher

    model_config = family_model_config(family, config)
    model_config.set_inference_dtype(dtype, None)
    if str(device) == "meta":
        with torch.device("meta"):
            model = model_config.get_model({})
        return model
    model = model_config.get_model({})
    _fill_seeded(model.diffusion_model, seed)
    family_configs.TINY[family].after_build(model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def fake_conditioning(family: str, batch: int = 1, seed: int = 1, tokens: int = 8,
                      context_dim: int | None = None, pooled_dim: int = 32) -> list:
    """Conditioning in ComfyUI's format with random embeddings of the tiny models' widths
    (``context_dim`` None: the tiny config's ``context_width``)."""
    gen = torch.Generator().manual_seed(seed)
    tiny = family_configs.TINY[family]
    ctx = torch.randn(batch, tiny.fixed_tokens or tokens, context_dim or tiny.context_width, generator=gen)
    # A text encoder without a pooled vector gives None (0.3.75's Flux classes read the key).
    pooled = torch.randn(batch, pooled_dim, generator=gen) if family_spec(family).pooled_output else None
    extra = {"pooled_output": pooled, **tiny.cond_extra}
    return [[ctx, extra]]


def latent_channels(family: str) -> int:
    return family_spec(family).latent_channels


def latent_shape(family: str, batch: int, height: int, width: int | None = None) -> tuple[int, ...]:
    """The shape of a ``family`` LATENT's samples: (B, C, H, W), or (B, C, 1, H, W) for 5-D
    families (``Family.latent_ndim``: the Wan 2.1 VAE's one-frame latents)."""
    spec = family_spec(family)
    frames = (1,) * (spec.latent_ndim - 4)
    return (batch, spec.latent_channels, *frames, height, width or height)


def sample(model, family: str, steps: int = 4, seed: int = 0, size: int = 32, batch: int = 1,
           cfg: float = 1.0, sampler: str = "euler", scheduler: str = "normal",
           positive=None, negative=None, denoise: float = 1.0) -> torch.Tensor:
    """Run ComfyUI's own KSampler path (comfy.sample.sample) and return the latent."""
    bootstrap()
    import comfy.sample

    latent = torch.zeros(latent_shape(family, batch, size))
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = positive if positive is not None else fake_conditioning(family, seed=1)
    negative = negative if negative is not None else fake_conditioning(family, seed=2)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative,
                               latent, denoise=denoise, seed=seed, disable_pbar=True)


class _PromptServer:
    """The few attributes PromptExecutor uses of the server, recording what it is sent."""

    def __init__(self) -> None:
        self.client_id = "tests"
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))


def run_prompt(prompt: dict, outputs: list[str] | None = None) -> tuple[Any, _PromptServer]:
    """Validate and run an API-format prompt in ComfyUI's real PromptExecutor.

    Returns the executor (``.success``, ``.history_result``, ``.caches``) and the fake server with
    the messages it was sent. Raises AssertionError with ComfyUI's own report if validation fails.
    """
    init_nodes()
    import execution

    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    if not valid[0]:
        raise AssertionError(f"prompt failed validation: {valid[1]} {valid[3]}")
    server = _PromptServer()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                       cache_args=dict(comfy_compat.EXECUTOR_CACHE_ARGS))
    prompt_id = str(uuid.uuid4())
    executor.execute(prompt, prompt_id, {"client_id": "tests"}, outputs or valid[2])
    return executor, server


def node_output(executor, node_id: str, slot: int = 0):
    """The first value of output ``slot`` of node ``node_id`` after :func:`run_prompt`."""
    entry = comfy_compat.cached_output(executor, node_id)
    if entry is None:
        raise AssertionError(f"node {node_id} has no cached output (did it run?)")
    return entry.outputs[slot][0]


def load_bench(name: str):
    """The module ``bench/<name>.py`` by name (once), with ``sys.path`` as it was before: a bench
    script puts the repository first, whose ``nodes`` package would shadow ComfyUI's nodes.py."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # bench modules import each other by name
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module
