"""Quantized tiny bases as ComfyUI users get them, each beside its dequantized float twin.

:func:`load` writes a tiny model of a family (seeded float32 weights) as a checkpoint file in one
storage layout (:data:`LAYOUTS`) and loads that file through the loader a user runs: ComfyUI's own
``UNETLoader`` node (``comfy.sd.load_diffusion_model``, with its ``weight_dtype`` for classic fp8)
or ComfyUI-GGUF's ``UnetLoaderGGUF`` node, under inference mode as the executor runs nodes. The
MODEL is therefore built by ComfyUI's loader: its ops classes (``MixedPrecisionOps.Linear`` with
``QuantizedTensor`` weights, fp8 ``Linear``, GGUF layers with ``GGMLTensor`` weights), dtypes and
ModelPatcher class are what a user's are.

Detection. ComfyUI's model detection reads real-size shapes; where it cannot read a family's
tiny shapes (SDXL and Qwen-Image everywhere, FLUX and FLUX.2 on 0.3.75, which fix 24 / 48 heads),
only its answer (the unet config and model class) is supplied, by replacing
``detect_unet_config`` and ``model_config_from_unet_config`` for the duration of the load; every
other step (quantization metadata, scaled_fp8, dtypes, ops, weight loading) is ComfyUI's.
:attr:`QuantizedBase.detected` says which happened. FLUX and FLUX.2 use tiny configs with
128-wide heads, which 0.33's detection reads; SD3's tiny config is read by both.

Which layers are quantized: every Linear of ComfyUI's ops (:func:`quantizable_linears`); for
nvfp4 only those inside blocks (detection reads input widths from the embedders' stored shapes,
which nvfp4 halves). GGUF: 2-D Linear weights in the file's type where its blocks fit the rows,
else Q8_0 (``quantized_files.gguf_type_for``; the tiny SDXL / Qwen-Image / SD3 attention layers
are too narrow for Q4_K's 256-wide blocks); everything else F32.

The twin. :attr:`QuantizedBase.twin` is a float32 model of the same family and config whose every
parameter is the value the quantized model computes with: Linear weights dequantized as
``tlora_core.base_weight`` does it (ComfyUI's ``convert_weight`` / ``QuantizedTensor.dequantize``,
a GGUF layer's own ``get_weight`` without patches), everything else up-cast. On the CPU, where
ComfyUI multiplies these layouts in full precision (fp8, nvfp4 and mxfp8 are emulated, GGUF
dequantizes per forward), the quantized model's output equals the twin's bit for bit
(:attr:`Layout.inexact_on` lists the exceptions: int8 tensorwise, 0.3.75's legacy scaled fp8 layer).

Caching. Loaded bases are cached per (family, layout, seed) for the session: callers must not
patch them in place (``clone()`` first, as every ComfyUI node does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import quantized_files
import torch

import comfy_runtime
import family_configs

BOTH = ("0.3.75", "0.33.0")
ONLY_033 = ("0.33.0",)


@dataclass(frozen=True)
class Layout:
    """One way a quantized diffusion model reaches ComfyUI."""

    description: str
    runtimes: tuple[str, ...]          # the ComfyUI versions whose loaders read it
    loader: str = "unet"               # "unet": UNETLoader; "gguf": UnetLoaderGGUF
    weight_dtype: str = "default"      # UNETLoader's weight_dtype
    fmt: str | None = None             # mixed-precision format or GGUF type written
    spelling: str | None = None        # mixed-precision metadata spelling (quantized_files)
    inexact_on: tuple[str, ...] = ()   # versions whose CPU output is NOT the twin's bit for bit
    rounded: bool = True               # weights held in fewer than 16 bits

    def exact(self, version: str) -> bool:
        """Whether on ComfyUI ``version``'s CPU the output equals the float twin's bit for bit."""
        return version not in self.inexact_on


LAYOUTS: dict[str, Layout] = {
    "fp8_e4m3fn": Layout("full-precision file, Load Diffusion Model weight_dtype fp8_e4m3fn", BOTH,
                         weight_dtype="fp8_e4m3fn"),
    "fp8_e5m2": Layout("full-precision file, Load Diffusion Model weight_dtype fp8_e5m2", BOTH,
                       weight_dtype="fp8_e5m2"),
    "fp8_scaled_header": Layout("fp8 scaled, _quantization_metadata header", BOTH,
                                fmt="float8_e4m3fn", spelling="header"),
    "fp8_scaled_keys": Layout("fp8 scaled, .comfy_quant keys", ONLY_033, fmt="float8_e4m3fn", spelling="keys"),
    # 0.3.75 runs its own scaled_fp8 Linear, which multiplies the *input* by the scale when the
    # weight has at least as many elements (F.linear(x * s, W)): equal to F.linear(x, W * s) up to
    # float32 rounding only. 0.33 converts the file to its mixed-precision layer (exact).
    "fp8_scaled_legacy": Layout("fp8 scaled, legacy scaled_fp8 + .scale_weight", BOTH,
                                fmt="float8_e4m3fn", spelling="legacy", inexact_on=("0.3.75",)),
    "fp8_e5m2_scaled": Layout("fp8 e5m2 scaled, .comfy_quant keys", ONLY_033, fmt="float8_e5m2", spelling="keys"),
    # comfy_kitchen's CPU backend runs int8 natively: its quantized matmul also rounds the
    # activations, so outputs differ from the twin's by about as much as the weights' rounding does.
    "int8_tensorwise": Layout("int8 tensorwise, .comfy_quant keys", ONLY_033, fmt="int8_tensorwise",
                              spelling="keys", inexact_on=ONLY_033),
    "nvfp4": Layout("nvfp4, .comfy_quant keys", ONLY_033, fmt="nvfp4", spelling="keys"),
    "mxfp8": Layout("mxfp8, .comfy_quant keys", ONLY_033, fmt="mxfp8", spelling="keys"),
    "gguf_q8_0": Layout("GGUF Q8_0 (UnetLoaderGGUF)", BOTH, loader="gguf", fmt="Q8_0"),
    "gguf_q4_0": Layout("GGUF Q4_0 (UnetLoaderGGUF)", BOTH, loader="gguf", fmt="Q4_0"),
    "gguf_q4_k": Layout("GGUF Q4_K, Q8_0 where rows are not a multiple of 256 (UnetLoaderGGUF)", BOTH,
                        loader="gguf", fmt="Q4_K"),
    "gguf_bf16": Layout("GGUF BF16 (UnetLoaderGGUF)", BOTH, loader="gguf", fmt="BF16", rounded=False),
}


@dataclass(frozen=True)
class FixtureFamily:
    """A family's tiny config for the quantized fixtures."""

    config: dict[str, Any] | None      # None: family_configs.TINY's
    detected_on: tuple[str, ...]       # ComfyUI versions whose detection reads these tiny shapes
    gguf_arch: str                     # general.architecture in a GGUF file


# FLUX.1 with 128-wide heads (axes 16 + 56 + 56, as ComfyUI's detection fixes them): 0.33 detects
# hidden 256 -> 2 heads. Rows of 256 and 1280 let every Linear hold whole Q4_K blocks.
FLUX_CONFIG: dict[str, Any] = {
    **family_configs.TINY["flux"].config, "hidden_size": 256, "num_heads": 2, "axes_dim": [16, 56, 56],
}

# FLUX.2 the same way (axes 4 x 32; 0.3.75's detection fixes 48 heads); Klein is its variant without
# a guidance input. GGUF files of FLUX.2 carry the architecture "flux" (ComfyUI-GGUF's list).
FLUX2_WIDTHS: dict[str, Any] = {"hidden_size": 256, "num_heads": 2, "axes_dim": [32, 32, 32, 32]}

FAMILIES: dict[str, FixtureFamily] = {
    "flux": FixtureFamily(FLUX_CONFIG, ONLY_033, "flux"),
    "sdxl": FixtureFamily(None, (), "sdxl"),
    "qwen_image": FixtureFamily(None, (), "qwen_image"),
    "sd3": FixtureFamily(None, BOTH, "sd3"),
    "flux2": FixtureFamily({**family_configs.TINY["flux2"].config, **FLUX2_WIDTHS}, ONLY_033, "flux"),
    "flux2_klein": FixtureFamily({**family_configs.TINY["flux2_klein"].config, **FLUX2_WIDTHS}, ONLY_033, "flux"),
}
# What :func:`params` covers unless told otherwise; FLUX.2 (and Klein, which shares its layers) on
# request: WITH_FLUX2.
DEFAULT_FAMILIES = ("flux", "sdxl", "qwen_image", "sd3")
WITH_FLUX2 = (*DEFAULT_FAMILIES, "flux2")


@dataclass
class QuantizedBase:
    """A quantized tiny base as a user's loader returned it, with what to compare it against.

    ``model``: the ModelPatcher from ComfyUI's loader node (shared: clone before patching).
    ``twin``: float32 ModelPatcher holding exactly the weights ``model`` computes with.
    ``full``: float32 ModelPatcher holding the weights the file was written from (the "original").
    ``path``: the written checkpoint. ``detected``: ComfyUI's detection read the tiny shapes itself.
    ``storage``: for GGUF, the GGML type of each quantized Linear (module path -> type name).
    """

    family: str
    layout: str
    model: Any
    twin: Any
    full: Any
    path: Path
    detected: bool
    config: dict[str, Any]
    storage: dict[str, str] = field(default_factory=dict)


def fixture_config(family: str) -> dict[str, Any]:
    """The tiny unet config the fixtures build ``family`` with."""
    config = FAMILIES[family].config
    return dict(config if config is not None else family_configs.TINY[family].config)


def runs_here(family: str, layout: str, version: str | None = None) -> bool:
    """Whether this ComfyUI (or ``version``) loads ``layout`` and builds ``family``."""
    version = version or comfy_runtime.comfyui_version()
    return version in LAYOUTS[layout].runtimes and family_configs.runs_here(family, version)


def params(families: tuple[str, ...] = DEFAULT_FAMILIES, layouts: tuple[str, ...] = tuple(LAYOUTS),
           exact_only: bool = False, detected_only: bool = False) -> list:
    """``pytest.param((family, layout))`` for each pair, marked with the runtimes that load the layout
    (``tests/conftest.py`` deselects them elsewhere; ``exact_only``: and where its output is the
    twin's bit for bit; ``detected_only``: and whose detection reads the tiny family unaided), id
    ``family-layout``."""
    out = []
    for family in families:
        for layout in layouts:
            spec = LAYOUTS[layout]
            runtimes = tuple(v for v in spec.runtimes if v in family_configs.TINY[family].runtimes
                             and not (exact_only and v in spec.inexact_on)
                             and not (detected_only and v not in FAMILIES[family].detected_on))
            out.append(pytest.param((family, layout), id=f"{family}-{layout}",
                                    marks=pytest.mark.runtimes(*runtimes)))
    return out


# ---- the GGUF custom node --------------------------------------------------------------------


def gguf_pack_dir() -> Path | None:
    """ComfyUI-GGUF's folder: ``$TLORA_COMFYUI_GGUF`` when set (only that), else the one
    scripts/setup_runtime.sh unpacks beside the ComfyUI tree, else the ComfyUI's
    ``custom_nodes/ComfyUI-GGUF``; None when there is none."""
    root = comfy_runtime.comfyui_root()
    chosen = os.environ.get("TLORA_COMFYUI_GGUF")
    candidates = [chosen] if chosen is not None else [root.parent / "ComfyUI-GGUF",
                                                      root / "custom_nodes" / "ComfyUI-GGUF"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "nodes.py").is_file():
            return Path(candidate)
    return None


def require_gguf() -> None:
    """Skip (locally) or fail (CI) when ComfyUI-GGUF is not provisioned: CI always has
    ../shared/runtimes, a developer checkout may not."""
    if gguf_pack_dir() is not None:
        return
    why = ("ComfyUI-GGUF is not provisioned: scripts/setup_runtime.sh unpacks it from "
           "../shared/runtimes/ComfyUI-GGUF-795e451.tar.gz (or $TLORA_RUNTIMES/...), which this "
           "checkout does not have")
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(why + " (CI must have it)")
    pytest.skip(why)


@functools.cache
def gguf_loader_class():
    """ComfyUI-GGUF's UnetLoaderGGUF node class, its pack loaded once as a custom node."""
    require_gguf()
    comfy_runtime.init_nodes()
    import nodes

    if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
        if not asyncio.run(nodes.load_custom_node(str(gguf_pack_dir()))):
            raise RuntimeError(f"ComfyUI-GGUF at {gguf_pack_dir()} failed to load (see the log)")
    return nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]


# ---- writing and loading ---------------------------------------------------------------------


@functools.cache
def _model_folder() -> Path:
    """A session folder registered as one of ComfyUI's diffusion_models folders."""
    import folder_paths

    folder = Path(tempfile.mkdtemp(prefix="tlora-quantized-"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return folder


def quantizable_linears(diffusion_model: torch.nn.Module) -> list[str]:
    """Module paths of the Linear layers ComfyUI's ops create (the ones a quantized file stores
    quantized): every ``torch.nn.Linear`` with ComfyUI's cast machinery."""
    return [name for name, module in diffusion_model.named_modules()
            if isinstance(module, torch.nn.Linear) and hasattr(module, "comfy_cast_weights")]


def write(full, family: str, layout: str, path: Path) -> dict[str, str]:
    """Write ``full`` (a float32 ModelPatcher) as ``layout`` to ``path``; GGUF: returns the types."""
    spec = LAYOUTS[layout]
    dm = full.model.diffusion_model
    sd = {k: v.detach() for k, v in dm.state_dict().items()}
    linears = quantizable_linears(dm)
    if spec.fmt == "nvfp4":
        # nvfp4 stores two values per byte, and ComfyUI's detection reads input widths from the
        # stored shapes of the embedders (FLUX img_in: 64 inputs read as 32): only the blocks'
        # layers are quantized, the embedders and final layers stay full precision.
        linears = [name for name in linears if "block" in name]
    if spec.loader == "gguf":
        return quantized_files.write_gguf(sd, linears, spec.fmt, FAMILIES[family].gguf_arch, path)
    if spec.fmt is None:
        quantized_files.write_float(sd, path)
    else:
        quantized_files.write_mixed_precision(sd, linears, spec.fmt, spec.spelling, path)
    return {}


@contextlib.contextmanager
def _detection(family: str, config: dict[str, Any], detected: bool):
    """ComfyUI's detection as is (``detected``), or answering with the tiny config and class."""
    if detected:
        yield
        return
    import comfy.model_detection

    tiny = family_configs.TINY[family]
    with mock.patch.object(comfy.model_detection, "detect_unet_config",
                           lambda *a, **k: tiny.complete(dict(config))), \
            mock.patch.object(comfy.model_detection, "model_config_from_unet_config",
                              lambda *a, **k: comfy_runtime.family_model_config(family, config)):
        yield


def _load_file(family: str, layout: str, path: Path, detected: bool, config: dict[str, Any]):
    spec = LAYOUTS[layout]
    with torch.inference_mode(), _detection(family, config, detected):
        if spec.loader == "gguf":
            return gguf_loader_class()().load_unet(path.name)[0]
        import nodes

        return nodes.UNETLoader().load_unet(path.name, spec.weight_dtype)[0]


def float_twin(model, family: str, config: dict[str, Any]):
    """A float32 ModelPatcher of ``family`` / ``config`` whose parameters and buffers are the values
    ``model`` (a loaded, possibly quantized, ModelPatcher of the same shapes) computes with."""
    base_weight = importlib.import_module(f"{comfy_runtime.PACK_NAME}.tlora_core.base_weight")
    twin = comfy_runtime.build_model(family, config, seed=0)
    source = model.model.diffusion_model
    with torch.no_grad():
        for name, param in twin.model.diffusion_model.named_parameters():
            owner, _, attr = name.rpartition(".")
            value = base_weight.parameter_value(source.get_submodule(owner), attr)
            if value.shape != param.shape:
                raise AssertionError(f"{name}: the loaded model holds {tuple(value.shape)}, the twin "
                                     f"{tuple(param.shape)}")
            param.copy_(value)
            # As the weights a quantized layer computes with (fresh tensors): F.linear on a strided
            # input takes another matmul path for a weight that requires grad (0.3.75's FLUX feeds
            # such views), which rounds differently.
            param.requires_grad_(False)
        buffers = dict(source.named_buffers())
        for name, buffer in twin.model.diffusion_model.named_buffers():
            buffer.copy_(buffers[name].float())
    return twin


_CACHE: dict[tuple[str, str, int], QuantizedBase] = {}


def load(family: str, layout: str, seed: int = 0) -> QuantizedBase:
    """The tiny ``family`` model (seeded float32 weights, ``seed``) written as ``layout`` and loaded
    by ComfyUI's loader node, with its float twin and the full-precision original (cached: clone
    before patching). GGUF layouts skip or fail as :func:`require_gguf` says when ComfyUI-GGUF is
    absent; a layout this ComfyUI lacks raises ValueError (use :func:`params` to deselect)."""
    key = (family, layout, seed)
    if key in _CACHE:
        return _CACHE[key]
    version = comfy_runtime.comfyui_version()
    if not runs_here(family, layout, version):
        raise ValueError(f"ComfyUI {version} does not load {family} as {layout}")
    if LAYOUTS[layout].loader == "gguf":
        require_gguf()
    comfy_runtime.init_nodes()
    config = fixture_config(family)
    full = comfy_runtime.build_model(family, config, seed=seed)
    suffix = ".gguf" if LAYOUTS[layout].loader == "gguf" else ".safetensors"
    path = _model_folder() / f"{family}-{layout}-{seed}{suffix}"
    storage = write(full, family, layout, path)
    _invalidate_file_lists()
    detected = version in FAMILIES[family].detected_on
    model = _load_file(family, layout, path, detected, config)
    base = QuantizedBase(family, layout, model, float_twin(model, family, config), full, path,
                         detected, config, storage)
    _CACHE[key] = base
    return base


def _invalidate_file_lists() -> None:
    import folder_paths

    for name in ("diffusion_models", "unet", "unet_gguf"):
        folder_paths.filename_list_cache.pop(name, None)
