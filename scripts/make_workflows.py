#!/usr/bin/env python
"""Generate the example workflows in ``workflows/`` from the node schemas.

Run after changing a node's inputs:  .runtime/0.3.75/venv/bin/python scripts/make_workflows.py
(``--check`` only reports whether the committed files are up to date). The schemas come from the
real ComfyUI runtime in-process (built-in nodes + this pack), nothing is read from the network, and
every default not stated here is the node's own, so the files cannot drift from the nodes.
Settings follow the paper and the reference code (see README "Recommended settings").

Up to date means the same meaning (``stale``: node types, titles, positions, sizes, sockets, links,
widget values by name), not the same text: newer ComfyUI declares outputs that 0.3.75 lacks (0.33's
SaveImage / PreviewImage / PreviewAny), which both frontends add to a file that lacks them, while
an output a file has and its server lacks stays on the node. So the files are generated on the
oldest supported runtime (0.3.75), and a file whose meaning is unchanged is left as it is
(``--force`` rewrites every file). The FLUX.2 Klein workflow too: 0.3.75 has every node it uses,
though it cannot load Klein (the workflow's tests run where Klein loads, see
tests/workflow_tools.workflow_runtimes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

from workflow_graph import Graph, Node  # noqa: E402
from workflow_tools import meaning_differences  # noqa: E402

import comfy_runtime  # noqa: E402

WORKFLOWS_DIR = REPO / "workflows"
log = logging.getLogger("make_workflows")

TOKEN = "sks dog"  # the reference template "a photo of {token} {class}"
TRAIN_PROMPT = f"a photo of {TOKEN}"
CONCEPT_IMAGE = "sks_dog.png"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FLUX_UNET, FLUX_CLIP_L, FLUX_T5, FLUX_VAE = ("flux1-dev.safetensors", "clip_l.safetensors",
                                             "t5xxl_fp16.safetensors", "ae.safetensors")
SDXL_LORA, FLUX_LORA = "tlora/sks_dog_sdxl", "tlora/sks_dog_flux"
# Qwen-Image as ComfyUI's own Qwen-Image template loads it (Comfy-Org's split files).
QWEN_UNET, QWEN_CLIP, QWEN_VAE = ("qwen_image_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                  "qwen_image_vae.safetensors")
QWEN_LORA = "tlora/sks_dog_qwen_image"
NO_PREVIEW_FILE = "(none: use rank below)"

# Paper Appendix A (live_set), with V* = the token.
PROMPTS = {
    "sdxl_train": ["a {} in a purple wizard outfit", "a {} with the Eiffel Tower in the background",
                   "a {} riding a bike", "a {} wearing a pirate hat exploring a sandy beach at the "
                   "sunset with a boat floating in the background"],
    "sdxl_generate": ["a {} dressed as a ballerina", "a {} on top of green grass with sunflowers around it",
                      "a {} skateboarding", "a {} dressed in a superhero cape, soaring through the "
                      "skies above a bustling city during a sunset"],
    "flux_train": ["a {} in a doctor outfit", "a {} with a mountain in the background", "a {} swimming",
                   "a {} wearing a tuxedo performing on a stage in the spotlight"],
    "flux_generate": ["a {} wearing a green bow tie", "a {} with a tree and autumn leaves in the background",
                      "a {} sleeping", "a {} wearing a space helmet, among stars in a cosmic landscape "
                      "during a starry night"],
    "qwen_image_train": ["a {} with the Sydney Opera House in the background", "a {} riding a surfboard",
                         "a {} in a superhero suit", "a {} in a wizards robe in a magical forest at "
                         "midnight, accented with purples and sparkling silver tones"],
    "compare": ["a {} with a sunset and palm trees in the background", "a {} lying in the bed",
                "a {} in a wizards robe in a magical forest at midnight, accented with purples and "
                "sparkling silver tones"],
}

# SDXL: T-LoRA (Ortho init + mask), rank 64, min_rank 32 (50%), 800 AdamW steps at 1e-4 (paper
# Appendix B); inference 25 steps, CFG 5, zero negative (the reference inference script).
SDXL_TRAIN = {"variant": "T-LoRA", "rank": 64, "min_rank": 32, "schedule_power": 1.0, "steps": 800,
              "learning_rate": 1e-4, "batch_size": 1, "seed": 0, "target_layers": "attention",
              "training_dtype": "bf16", "gradient_checkpointing": True, "save_every": 200}
SDXL_SAMPLE = {"steps": 25, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
# FLUX.1-dev: Vanilla T-LoRA (the reference trains FLUX only so), rank 32, min_rank 16 (the
# paper's 50%; the reference script uses 1), guidance 1 in training; inference 28 steps,
# guidance 3.5, CFG 1.
FLUX_TRAIN = {"variant": "Vanilla T-LoRA", "rank": 32, "min_rank": 16, "schedule_power": 1.0,
              "steps": 1000, "learning_rate": 1e-4, "batch_size": 1, "seed": 0,
              "target_layers": "attention", "training_dtype": "bf16", "gradient_checkpointing": True,
              "save_every": 200}
FLUX_SAMPLE = {"steps": 28, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
# Qwen-Image: T-LoRA (the pack's Qwen-Image recipe: rank 16, min_rank 8, lr 1e-4 AdamW; not the
# paper's, which has none for it), 1000 steps; inference as ComfyUI's Qwen-Image template: shift
# 3.1 (ModelSamplingAuraFlow), 20 steps, real CFG 2.5 with an empty negative prompt, 1328 x 1328.
QWEN_TRAIN = {"variant": "T-LoRA", "rank": 16, "min_rank": 8, "schedule_power": 1.0, "steps": 1000,
              "learning_rate": 1e-4, "batch_size": 1, "seed": 0, "target_layers": "attention",
              "training_dtype": "bf16", "gradient_checkpointing": True, "save_every": 200}
QWEN_SAMPLE = {"steps": 20, "cfg": 2.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
QWEN_SHIFT, QWEN_SIZE = 3.1, 1328

# Z-Image Turbo, wired as ComfyUI's Z-Image template: Load Diffusion Model, CLIPLoader "lumina2"
# with Qwen3-4B, the FLUX.1 VAE, ModelSamplingAuraFlow shift 3, an all-zero negative, 9 steps
# res_multistep / simple at CFG 1. Training: the family's T-LoRA at rank 32, min_rank 16 (no paper
# recipe exists for Z-Image; common Z-Image LoRA trainers start at rank 16-32, lr 1e-4).
ZIMAGE_UNET, QWEN3_4B, ZIMAGE_VAE = "z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"
ZIMAGE_LORA, ZIMAGE_SHIFT = "tlora/sks_dog_zimage", 3.0
ZIMAGE_TRAIN = {**SDXL_TRAIN, "rank": 32, "min_rank": 16, "steps": 1000}
ZIMAGE_SAMPLE = {"steps": 9, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple", "denoise": 1.0}
PROMPTS["zimage_train"] = ["a {} sitting on the chair", "a {} with the Sydney Opera House in the background",
                           "a {} riding a surfboard", "a {} dressed in a superhero cape, soaring through "
                           "the skies above a bustling city during a sunset"]
# FLUX.2 Klein 4B base (ComfyUI 0.33+: older ComfyUI cannot load Klein), wired as ComfyUI's Klein
# template: Load Diffusion Model, CLIPLoader "flux2" with Qwen3-4B, the FLUX.2 VAE, no guidance
# node (Klein has no guidance input), CFGGuider 5 with an empty-prompt negative, Flux2Scheduler
# 20 steps, euler, EmptyFlux2LatentImage. Training: Vanilla T-LoRA (the reference's FLUX recipe)
# at rank 32, min_rank 16: Klein 4B is an eighth of FLUX.2 dev.
KLEIN_UNET, KLEIN_VAE, KLEIN_LORA = "flux-2-klein-base-4b.safetensors", "flux2-vae.safetensors", "tlora/sks_dog_klein"
KLEIN_TRAIN = {**FLUX_TRAIN}
KLEIN_SAMPLE = {"steps": 20, "cfg": 5.0, "sampler_name": "euler"}
PROMPTS["klein_train"] = ["a red {}", "a {} jumping with a parachute", "a {} running on a treadmill",
                          "a {} in a wizards robe in a magical forest at midnight, accented with purples "
                          "and sparkling silver tones"]

NOTE_TRAIN = """## T-LoRA: train on one image, then generate

1. **Load Image**: upload one photo of your subject (`{image}` is a placeholder). It is centre-cropped to 1024 x 1024.
2. **Training prompt**: `{train_prompt}`: a rare token plus the class. Use the same token in the prompts on the right.
3. **T-LoRA Train** uses the paper's settings: {summary}. It saves `{lora}.safetensors` in your `loras` folder (and every 200 steps) and outputs the model with it applied.
4. The samplers on the right use that model with prompts from the paper's evaluation set.

To reuse the file later, open the matching *generate* workflow. Lower `steps` for a quick try."""

NOTE_TRAIN_QWEN_IMAGE = """## T-LoRA on Qwen-Image: train on one image, then generate

1. **Load Image**: upload one photo of your subject (`{image}` is a placeholder). It is centre-cropped to 1024 x 1024 and encoded by the Qwen-Image VAE.
2. **Training prompt**: `{train_prompt}`: a rare token plus the class. Use the same token in the prompts on the right.
3. **T-LoRA Train** uses the pack's Qwen-Image recipe (not from the paper, which has none for Qwen-Image): {summary}. It saves `{lora}.safetensors` in your `loras` folder (and every 200 steps) and outputs the model with it applied.
4. The samplers on the right use that model as ComfyUI's Qwen-Image template does (shift {shift}, CFG {cfg}, empty negative prompt) with prompts from the paper's evaluation set.

To reuse the file later, put **T-LoRA Loader** after *ModelSamplingAuraFlow*. Lower `steps` for a quick try."""

NOTE_ZIMAGE = """

Z-Image Turbo is step-distilled: a T-LoRA trained on it may drift from its 9-step look. Where you have the base Z-Image, train on it (same wiring)."""

NOTE_KLEIN = """

Needs **ComfyUI 0.33 or newer** (older versions cannot load FLUX.2 Klein). Train the base Klein, not the 4-step distilled one."""

NOTE_GENERATE = """## Generate with a saved T-LoRA

**T-LoRA Loader** applies the file with its per-step rank mask: few ranks at high noise (less copying of the training photo's pose and background), all ranks at the end (detail). The stock *Load LoRA* node would apply it at full rank on every step.

- `lora_name`: the file *T-LoRA Train* saved (here `{lora}.safetensors`), a reference-code file or a LyCORIS T-LoRA.
- `min_rank` -1 / `schedule_power` 0 read the values stored in the file.
- **T-LoRA Schedule Preview** draws the active rank at each of the sampler's steps."""

NOTE_COMPARE = """## Plain LoRA vs T-LoRA on the same image

Both trainers see the same latents, prompt and seed; only the method differs: **LoRA** (500 steps, the paper's baseline) and **T-LoRA** (Ortho init + timestep rank mask, 800 steps, min_rank = rank / 2).

Each row of the saved grid is one prompt with the same sampler seed: left LoRA, right T-LoRA. T-LoRA should follow the prompt's background and pose more often, where LoRA tends to repeat the training photo."""


def object_info() -> dict[str, dict]:
    """What the server's /object_info returns, computed in-process (no network)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ComfyUI reports optional built-in nodes it cannot import
    try:
        comfy_runtime.init_nodes()
    finally:
        root.setLevel(level)
    import nodes

    out = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            out[name] = cls.GET_NODE_INFO_V1()
            continue
        types = cls.INPUT_TYPES()
        out[name] = {"input": types, "input_order": {key: list(value) for key, value in types.items()},
                     "output": list(cls.RETURN_TYPES),
                     "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}
    return out


def _prompts(key: str) -> list[str]:
    return [template.format(TOKEN) for template in PROMPTS[key]]


# Column x positions; every block below is placed on this grid so nothing overlaps.
COL_A, COL_B, COL_C, COL_D, COL_E = 0, 380, 760, 1200, 1660
ROW = 300  # vertical pitch of one prompt row (a KSampler is 264 high)
KLEIN_ROW = 340  # a CFGGuider (124) above a SamplerCustomAdvanced (140), each with its title
TRAIN_GAP = 60  # vertical space below a T-LoRA Train node (its height follows its inputs)


def _concept_latent(g: Graph, vae: tuple[Node, str | int], image_pos: tuple[float, float],
                    scale_pos: tuple[float, float]) -> Node:
    """LoadImage -> centre crop to 1024 -> VAEEncode; returns the VAEEncode node."""
    image = g.node("LoadImage", image_pos, {"image": CONCEPT_IMAGE}, title="Concept image (one photo)")
    image.height = 320
    scale = g.node("ImageScale", scale_pos, {"upscale_method": "lanczos", "width": 1024, "height": 1024,
                                             "crop": "center"}, title="Centre crop 1024")
    encode = g.node("VAEEncode", (scale_pos[0], scale_pos[1] + 190), width=220)
    g.link(image, "IMAGE", scale, "image")
    g.link(scale, "IMAGE", encode, "pixels")
    g.link(vae[0], vae[1], encode, "vae")
    return encode


def _negative_and_latent(g: Graph, clip, x: float, y: float, flux: bool) -> tuple[Node, Node]:
    """The reference samples with an all-zero negative (diffusers' SDXL default) at 1024 x 1024."""
    source = g.node("CLIPTextEncode", (x, y), {"text": ""}, title="Empty prompt", width=300)
    g.link(clip[0], clip[1], source, "clip")
    negative = g.node("ConditioningZeroOut", (x, y + 200), width=300)
    g.link(source, "CONDITIONING", negative, "conditioning")
    latent = g.node("EmptySD3LatentImage" if flux else "EmptyLatentImage", (x, y + 290),
                    {"width": 1024, "height": 1024, "batch_size": 1}, width=300)
    return negative, latent


def _sampler(g: Graph, model, positive: Node, negative: Node, latent: Node, vae, sample: dict, seed: int,
             pos: tuple[float, float], decode_pos: tuple[float, float], title: str) -> Node:
    sampler = g.node("KSampler", pos, {"seed": seed, **sample}, title=title, width=270)
    g.link(model[0], model[1], sampler, "model")
    g.link(positive, "CONDITIONING", sampler, "positive")
    g.link(negative, "CONDITIONING", sampler, "negative")
    g.link(latent, "LATENT", sampler, "latent_image")
    decode = g.node("VAEDecode", decode_pos, width=200)
    g.link(sampler, "LATENT", decode, "samples")
    g.link(vae[0], vae[1], decode, "vae")
    return decode


def _prompt(g: Graph, clip, text: str, pos: tuple[float, float], title: str, flux: bool,
            guidance: float = 3.5) -> Node:
    encode = g.node("CLIPTextEncode", pos, {"text": text}, title=title, width=300)
    g.link(clip[0], clip[1], encode, "clip")
    if not flux:
        return encode
    guided = g.node("FluxGuidance", (pos[0], pos[1] + 180), {"guidance": guidance}, width=300)
    guided.height = 60
    encode.height = 150
    g.link(encode, "CONDITIONING", guided, "conditioning")
    return guided


def _sample_column(g: Graph, model, clip, vae, prompts: list[str], sample: dict, x: float, y: float,
                   flux: bool, filename_prefix: str) -> None:
    """One prompt -> sampler -> decode row per prompt, all images batched into one SaveImage."""
    negative, latent = _negative_and_latent(g, clip, x, y, flux)
    pitch = ROW + (50 if flux else 0)
    decoded = []
    for row, text in enumerate(prompts):
        top = y + 460 + row * pitch
        positive = _prompt(g, clip, text, (x, top), f"Prompt {row + 1}", flux)
        decoded.append(_sampler(g, model, positive, negative, latent, vae, sample, 0, (x + 340, top),
                                (x + 650, top), f"Sample {row + 1}"))
    _save_batch(g, decoded, x, y, pitch, filename_prefix)


def _save_batch(g: Graph, decoded: list[Node], x: float, y: float, pitch: float, filename_prefix: str) -> None:
    """The images of a sample column (one decode node per prompt row, ``pitch`` apart from
    ``y + 460``) batched into one SaveImage right of the rows."""
    batch = decoded[0]
    for index, decode in enumerate(decoded[1:], start=1):
        # 250 wide: ComfyUI 0.33 deprecates ImageBatch (its successor does not exist in 0.3.75) and
        # the 1.49 frontend widens the node for its "(DEPRECATED)" title (to 235 px).
        joined = g.node("ImageBatch", (x + 880, y + 460 + index * pitch - 60), width=250)
        g.link(batch, "IMAGE", joined, "image1")
        g.link(decode, "IMAGE", joined, "image2")
        batch = joined
    save = g.node("SaveImage", (x + 1160, y + 460), {"filename_prefix": filename_prefix}, width=520)
    save.height = 560
    g.link(batch, "IMAGE", save, "images")


def _sdxl_loaders(g: Graph) -> tuple[tuple, tuple, tuple]:
    ckpt = g.node("CheckpointLoaderSimple", (COL_A, 340), {"ckpt_name": SDXL_CHECKPOINT}, width=340)
    return (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE")


def _flux_loaders(g: Graph) -> tuple[tuple, tuple, tuple]:
    unet = g.node("UNETLoader", (COL_A, 340), {"unet_name": FLUX_UNET, "weight_dtype": "default"}, width=340)
    clip = g.node("DualCLIPLoader", (COL_A, 480), {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5,
                                                    "type": "flux"}, width=340)
    vae = g.node("VAELoader", (COL_A, 670), {"vae_name": FLUX_VAE}, width=340)
    return (unet, "MODEL"), (clip, "CLIP"), (vae, "VAE")


def _training_inputs(g: Graph, clip, vae, flux: bool) -> tuple[Node, Node]:
    """Training prompt (FLUX: with guidance 1, as the reference trains) and the concept latent."""
    prompt = g.node("CLIPTextEncode", (COL_B, 340), {"text": TRAIN_PROMPT}, title="Training prompt", width=340)
    g.link(clip[0], clip[1], prompt, "clip")
    positive, below = prompt, 540
    if flux:
        positive = g.node("FluxGuidance", (COL_B, 540), {"guidance": 1.0}, title="Training guidance",
                          width=320)
        g.link(prompt, "CONDITIONING", positive, "conditioning")
        below = 660
    image_y = 790 if flux else 500
    latent = _concept_latent(g, vae, (COL_A, image_y), (COL_B, below))
    return positive, latent


def _trainer(g: Graph, model, latent: Node, positive: Node, settings: dict, file_name: str,
             pos: tuple[float, float], title: str) -> Node:
    train = g.node("TLoRATrain", pos, {**settings, "file_name": file_name}, title=title, width=400)
    g.link(model[0], model[1], train, "model")
    g.link(latent, "LATENT", train, "latents")
    g.link(positive, "CONDITIONING", train, "positive")
    return train


def _train_outputs(g: Graph, train: Node, x: float, y: float, label: str = "Loss curve") -> None:
    loss = g.node("PreviewImage", (x, y), title=label, width=380)
    loss.height = 300
    g.link(train, "loss_curve", loss, "images")
    saved = g.node("PreviewAny", (x, y + 330), title="Saved as", width=380)
    saved.height = 130  # room for 0.33's extra output and preview-mode toggle (1.49 grows it to 122)
    g.link(train, "file_name", saved, "source")


def _summary(settings: dict) -> str:
    return (f"{settings['variant']}, rank {settings['rank']}, min_rank {settings['min_rank']}, "
            f"{settings['steps']} steps, learning rate {settings['learning_rate']:g}")


def _schedule_preview(g: Graph, model, sample: dict, pos: tuple[float, float],
                      image_pos: tuple[float, float], lora_name: str | None, rank: int, min_rank: int) -> None:
    values = {"steps": sample["steps"], "scheduler": sample["scheduler"], "denoise": sample["denoise"],
              "lora_name": lora_name or NO_PREVIEW_FILE, "rank": rank, "min_rank": min_rank}
    preview = g.node("TLoRASchedulePreview", pos, values, width=360)
    g.link(model[0], model[1], preview, "model")
    shown = g.node("PreviewImage", image_pos, title="Active rank per step", width=420)
    shown.height = 260
    g.link(preview, "IMAGE", shown, "images")


def _train_and_generate(info: dict, flux: bool) -> dict:
    settings, sample, lora = (FLUX_TRAIN, FLUX_SAMPLE, FLUX_LORA) if flux else (SDXL_TRAIN, SDXL_SAMPLE, SDXL_LORA)
    g = Graph(info)
    g.note(NOTE_TRAIN.format(image=CONCEPT_IMAGE, train_prompt=TRAIN_PROMPT, summary=_summary(settings),
                             lora=lora), (COL_A, 0), width=720, height=300)
    model, clip, vae = _flux_loaders(g) if flux else _sdxl_loaders(g)
    positive, latent = _training_inputs(g, clip, vae, flux)
    train = _trainer(g, model, latent, positive, settings, lora, (COL_C, 0), "T-LoRA Train")
    _train_outputs(g, train, COL_D, 0)
    _schedule_preview(g, model, sample, (COL_C, train.height + TRAIN_GAP), (COL_D, 500), None,
                      settings["rank"], settings["min_rank"])
    family = "flux" if flux else "sdxl"
    _sample_column(g, (train, "model"), clip, vae, _prompts(f"{family}_train"), sample, COL_E, 0, flux,
                   f"tlora/{family}_trained")
    return g.build()


def _generate(info: dict, flux: bool) -> dict:
    sample, lora, rank = (FLUX_SAMPLE, FLUX_LORA, 32) if flux else (SDXL_SAMPLE, SDXL_LORA, 64)
    g = Graph(info)
    g.note(NOTE_GENERATE.format(lora=lora), (COL_A, 0), width=720, height=300)
    model, clip, vae = _flux_loaders(g) if flux else _sdxl_loaders(g)
    top = 790 if flux else 500
    loader = g.node("TLoRALoader", (COL_A, top), {"lora_name": f"{lora}.safetensors"}, width=360)
    g.link(model[0], model[1], loader, "model")
    _schedule_preview(g, model, sample, (COL_A, top + 220), (COL_A, top + 490), f"{lora}.safetensors", rank, -1)
    family = "flux" if flux else "sdxl"
    _sample_column(g, (loader, "MODEL"), clip, vae, _prompts(f"{family}_generate"), sample, COL_C, 0, flux,
                   f"tlora/{family}")
    return g.build()


def sdxl_train_and_generate(info: dict) -> dict:
    return _train_and_generate(info, flux=False)


def flux_train_and_generate(info: dict) -> dict:
    return _train_and_generate(info, flux=True)


def sdxl_generate(info: dict) -> dict:
    return _generate(info, flux=False)


def flux_generate(info: dict) -> dict:
    return _generate(info, flux=True)


def _single_encoder_loaders(g: Graph, unet: str, clip: str, clip_type: str, vae: str) -> tuple[tuple, tuple, tuple]:
    """Load Diffusion Model, Load CLIP (one text encoder of ``clip_type``) and Load VAE, stacked."""
    model = g.node("UNETLoader", (COL_A, 340), {"unet_name": unet, "weight_dtype": "default"}, width=340)
    encoder = g.node("CLIPLoader", (COL_A, 480), {"clip_name": clip, "type": clip_type}, width=340)
    decoder = g.node("VAELoader", (COL_A, 650), {"vae_name": vae}, width=340)
    return (model, "MODEL"), (encoder, "CLIP"), (decoder, "VAE")


def _plain_training_inputs(g: Graph, clip, vae, image_y: float) -> tuple[Node, Node]:
    """The training prompt (no guidance node) and the concept latent, the photo at ``image_y``."""
    prompt = g.node("CLIPTextEncode", (COL_B, 340), {"text": TRAIN_PROMPT}, title="Training prompt", width=340)
    g.link(clip[0], clip[1], prompt, "clip")
    return prompt, _concept_latent(g, vae, (COL_A, image_y), (COL_B, 540))


def _shifted_training(g: Graph, files: tuple[str, str, str, str], shift: float, settings: dict, sample: dict,
                      lora: str) -> tuple[Node, tuple, tuple]:
    """Load Diffusion Model -> ModelSamplingAuraFlow (the shift every sampler of the graph reads;
    the trainer's noise levels do not change with it), one text encoder, the VAE, the training
    prompt and photo, T-LoRA Train with its outputs and a Schedule Preview: ``(train, clip, vae)``.
    ``files``: (diffusion model, text encoder, CLIPLoader type, VAE)."""
    unet, clip, vae = _single_encoder_loaders(g, *files)
    shifted = g.node("ModelSamplingAuraFlow", (COL_A, 770), {"shift": shift}, width=340)
    g.link(unet[0], unet[1], shifted, "model")
    model = (shifted, "MODEL")
    positive, latent = _plain_training_inputs(g, clip, vae, 890)
    train = _trainer(g, model, latent, positive, settings, lora, (COL_C, 0), "T-LoRA Train")
    _train_outputs(g, train, COL_D, 0)
    _schedule_preview(g, model, sample, (COL_C, train.height + TRAIN_GAP), (COL_D, 500), None,
                      settings["rank"], settings["min_rank"])
    return train, clip, vae


def zimage_train_and_generate(info: dict) -> dict:
    g = Graph(info)
    g.note(NOTE_TRAIN.format(image=CONCEPT_IMAGE, train_prompt=TRAIN_PROMPT, summary=_summary(ZIMAGE_TRAIN),
                             lora=ZIMAGE_LORA) + NOTE_ZIMAGE, (COL_A, 0), width=720, height=300)
    train, clip, vae = _shifted_training(g, (ZIMAGE_UNET, QWEN3_4B, "lumina2", ZIMAGE_VAE), ZIMAGE_SHIFT,
                                         ZIMAGE_TRAIN, ZIMAGE_SAMPLE, ZIMAGE_LORA)
    x = COL_E
    negative, empty = _negative_and_latent(g, clip, x, 0, flux=True)   # EmptySD3LatentImage: 16 channels
    decoded = []
    for row, text in enumerate(_prompts("zimage_train")):
        top = 460 + row * ROW
        positive = _prompt(g, clip, text, (x, top), f"Prompt {row + 1}", flux=False)
        decoded.append(_sampler(g, (train, "model"), positive, negative, empty, vae, ZIMAGE_SAMPLE, 0,
                                (x + 340, top), (x + 650, top), f"Sample {row + 1}"))
    _save_batch(g, decoded, x, 0, ROW, "tlora/zimage_trained")
    return g.build()


def _klein_sample_column(g: Graph, model, clip, vae, prompts: list[str], x: float, y: float,
                         filename_prefix: str) -> None:
    """Klein's sampling: per prompt a CFGGuider and SamplerCustomAdvanced sharing one negative,
    noise, sampler, Flux2Scheduler sigmas and empty latent."""
    empty_prompt = g.node("CLIPTextEncode", (x, y), {"text": ""}, title="Negative (empty prompt)", width=300)
    g.link(clip[0], clip[1], empty_prompt, "clip")
    latent = g.node("EmptyFlux2LatentImage", (x, y + 200), {"width": 1024, "height": 1024, "batch_size": 1},
                    width=300)
    sigmas = g.node("Flux2Scheduler", (x + 340, y), {"steps": KLEIN_SAMPLE["steps"], "width": 1024,
                                                     "height": 1024}, width=270)
    sampler = g.node("KSamplerSelect", (x + 340, y + 170), {"sampler_name": KLEIN_SAMPLE["sampler_name"]},
                     width=270)
    noise = g.node("RandomNoise", (x + 340, y + 290), {"noise_seed": 0}, width=270)
    noise.height = 110   # room for the seed's "control after generate" widget
    decoded = []
    for row, text in enumerate(prompts):
        top = y + 460 + row * KLEIN_ROW
        positive = _prompt(g, clip, text, (x, top), f"Prompt {row + 1}", flux=False)
        guider = g.node("CFGGuider", (x + 340, top), {"cfg": KLEIN_SAMPLE["cfg"]}, title=f"Guider {row + 1}",
                        width=270)
        g.link(model[0], model[1], guider, "model")
        g.link(positive, "CONDITIONING", guider, "positive")
        g.link(empty_prompt, "CONDITIONING", guider, "negative")
        run = g.node("SamplerCustomAdvanced", (x + 340, top + 160), title=f"Sample {row + 1}", width=270)
        g.link(noise, "NOISE", run, "noise")
        g.link(guider, "GUIDER", run, "guider")
        g.link(sampler, "SAMPLER", run, "sampler")
        g.link(sigmas, "SIGMAS", run, "sigmas")
        g.link(latent, "LATENT", run, "latent_image")
        decode = g.node("VAEDecode", (x + 650, top), width=200)
        g.link(run, 0, decode, "samples")
        g.link(vae[0], vae[1], decode, "vae")
        decoded.append(decode)
    _save_batch(g, decoded, x, y, KLEIN_ROW, filename_prefix)


def klein_train_and_generate(info: dict) -> dict:
    g = Graph(info)
    g.note(NOTE_TRAIN.format(image=CONCEPT_IMAGE, train_prompt=TRAIN_PROMPT, summary=_summary(KLEIN_TRAIN),
                             lora=KLEIN_LORA) + NOTE_KLEIN, (COL_A, 0), width=720, height=300)
    model, clip, vae = _single_encoder_loaders(g, KLEIN_UNET, QWEN3_4B, "flux2", KLEIN_VAE)
    positive, latent = _plain_training_inputs(g, clip, vae, 770)
    train = _trainer(g, model, latent, positive, KLEIN_TRAIN, KLEIN_LORA, (COL_C, 0), "T-LoRA Train")
    _train_outputs(g, train, COL_D, 0)
    _klein_sample_column(g, (train, "model"), clip, vae, _prompts("klein_train"), COL_E, 0, "tlora/klein_trained")
    return g.build()


def _qwen_image_sample_column(g: Graph, model, clip, vae, prompts: list[str], x: float, y: float) -> None:
    """Real CFG against an empty negative prompt (no zeroed negative, no guidance node), one row
    per prompt, all images batched into one SaveImage."""
    negative = g.node("CLIPTextEncode", (x, y), {"text": ""}, title="Negative prompt (empty)", width=300)
    g.link(clip[0], clip[1], negative, "clip")
    latent = g.node("EmptySD3LatentImage", (x, y + 200), {"width": QWEN_SIZE, "height": QWEN_SIZE,
                                                          "batch_size": 1}, width=300)
    decoded = []
    for row, text in enumerate(prompts):
        top = y + 460 + row * ROW
        positive = _prompt(g, clip, text, (x, top), f"Prompt {row + 1}", flux=False)
        decoded.append(_sampler(g, model, positive, negative, latent, vae, QWEN_SAMPLE, 0, (x + 340, top),
                                (x + 650, top), f"Sample {row + 1}"))
    _save_batch(g, decoded, x, y, ROW, "tlora/qwen_image_trained")


def qwen_image_train_and_generate(info: dict) -> dict:
    g = Graph(info)
    g.note(NOTE_TRAIN_QWEN_IMAGE.format(image=CONCEPT_IMAGE, train_prompt=TRAIN_PROMPT, summary=_summary(QWEN_TRAIN),
                                        lora=QWEN_LORA, shift=QWEN_SHIFT, cfg=QWEN_SAMPLE["cfg"]),
           (COL_A, 0), width=720, height=300)
    train, clip, vae = _shifted_training(g, (QWEN_UNET, QWEN_CLIP, "qwen_image", QWEN_VAE), QWEN_SHIFT,
                                         QWEN_TRAIN, QWEN_SAMPLE, QWEN_LORA)
    _qwen_image_sample_column(g, (train, "model"), clip, vae, _prompts("qwen_image_train"), COL_E, 0)
    return g.build()


def sdxl_lora_vs_tlora(info: dict) -> dict:
    g = Graph(info)
    g.note(NOTE_COMPARE, (COL_A, 0), width=720, height=300)
    model, clip, vae = _sdxl_loaders(g)
    positive, latent = _training_inputs(g, clip, vae, flux=False)
    runs = {"LoRA": ({**SDXL_TRAIN, "variant": "LoRA", "steps": 500, "save_every": 0},
                     "tlora/sks_dog_sdxl_plain_lora"),
            "T-LoRA": ({**SDXL_TRAIN, "save_every": 0}, "tlora/sks_dog_sdxl_tlora")}
    trained, y = {}, 0
    for label, (settings, name) in runs.items():
        trained[label] = _trainer(g, model, latent, positive, settings, name, (COL_C, y), f"Train {label}")
        _train_outputs(g, trained[label], COL_D, y, f"{label} loss")
        y += trained[label].height + TRAIN_GAP
    # The sampling grid sits below the training part; the saved grid to the right of it.
    base = y + 20
    negative, empty = _negative_and_latent(g, clip, COL_A, base, flux=False)
    rows = []
    for index, text in enumerate(_prompts("compare")):
        top = base + index * ROW
        encode = _prompt(g, clip, text, (COL_B, top), f"Prompt {index + 1}", flux=False)
        images = [_sampler(g, (trained[label], "model"), encode, negative, empty, vae, SDXL_SAMPLE, index,
                           (COL_B + 340 + column * 300, top), (COL_B + 950, top + column * 110),
                           f"{label}, prompt {index + 1}")
                  for column, label in enumerate(runs)]
        row = g.node("ImageStitch", (COL_B + 1190, top), {"direction": "right", "match_image_size": True,
                                                          "spacing_width": 16, "spacing_color": "white"},
                     title=f"Row {index + 1}: LoRA | T-LoRA", width=280)
        g.link(images[0], "IMAGE", row, "image1")
        g.link(images[1], "IMAGE", row, "image2")
        rows.append(row)
    grid = rows[0]
    for index, row in enumerate(rows[1:], start=1):
        joined = g.node("ImageStitch", (COL_B + 1510, base + index * ROW - 100),
                        {"direction": "down", "match_image_size": True, "spacing_width": 16,
                         "spacing_color": "white"}, title="Stack rows", width=260)
        g.link(grid, "IMAGE", joined, "image1")
        g.link(row, "IMAGE", joined, "image2")
        grid = joined
    save = g.node("SaveImage", (COL_D + 440, 0), {"filename_prefix": "tlora/lora_vs_tlora_grid"}, width=640)
    save.height = 960
    g.link(grid, "IMAGE", save, "images")
    return g.build()


WORKFLOWS = {
    "tlora_sdxl_train_and_generate": sdxl_train_and_generate,
    "tlora_sdxl_generate": sdxl_generate,
    "tlora_flux_train_and_generate": flux_train_and_generate,
    "tlora_flux_generate": flux_generate,
    "tlora_sdxl_lora_vs_tlora": sdxl_lora_vs_tlora,
    "tlora_qwen_image_train_and_generate": qwen_image_train_and_generate,
    "tlora_zimage_train_and_generate": zimage_train_and_generate,
    "tlora_flux2_klein_train_and_generate": klein_train_and_generate,
}


def render(info: dict | None = None) -> dict[str, str]:
    """``{file name: JSON text}`` of every workflow."""
    info = info or object_info()
    return {f"{name}.json": json.dumps(build(info), indent=2) + "\n" for name, build in WORKFLOWS.items()}


def _layout(workflow: dict) -> dict[str, tuple]:
    """Per node: its size and input sockets (what the schema implies and the meaning leaves out)."""
    return {str(node["id"]): (list(node.get("size", [])),
                              [(slot["name"], slot["type"]) for slot in node.get("inputs", [])])
            for node in workflow.get("nodes", [])}


def stale(info: dict | None = None, directory: Path = WORKFLOWS_DIR) -> dict[str, list[str]]:
    """``{file name: differences}`` for each workflow whose file in ``directory`` does not mean what
    this runtime's schemas generate (missing files included); empty when every file is up to date."""
    info = info or object_info()
    out = {}
    for name, text in render(info).items():
        path = directory / name
        if not path.exists():
            out[name] = ["missing"]
            continue
        generated, shipped = json.loads(text), json.loads(path.read_text(encoding="utf-8"))
        try:
            reasons = meaning_differences(generated, shipped, info)
        except (ValueError, KeyError, IndexError) as err:  # e.g. a widget count the schema no longer has
            reasons = [f"does not fit this runtime's schemas: {err!r}"]
        ours, theirs = _layout(generated), _layout(shipped)
        reasons += [f"node {node_id}: size and sockets {theirs.get(node_id)} != {ours[node_id]}"
                    for node_id in ours if theirs.get(node_id) != ours[node_id]]
        if reasons:
            out[name] = reasons
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed workflow is out of date")
    parser.add_argument("--force", action="store_true", help="rewrite every file, even one whose meaning is unchanged")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = object_info()
    out_of_date = stale(info)
    if args.check:
        for name, reasons in out_of_date.items():
            log.error("%s is out of date:\n  %s", name, "\n  ".join(reasons[:20]))
        return 1 if out_of_date else 0
    for name, text in render(info).items():
        path = WORKFLOWS_DIR / name
        if name not in out_of_date and not args.force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        log.info("wrote %s", path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
