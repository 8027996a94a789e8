"""What validation samples cost a T-LoRA Train run, and that they leave its result bit-identical.

One process, tiny models of the chosen families (ComfyUI's own classes), one 32x32 training latent,
one CPU thread. The node itself (``TLoRATrain.execute``, as ComfyUI calls it, inference mode on)
trains ``--steps`` steps without validation and with a validation sample every ``--every`` steps
(and after the last step), ``--val-steps`` sampler steps each (euler; CFG 5 on SDXL and 4 on
Qwen-Image, so two model calls per sampler step, and 1 on FLUX), decoded by ComfyUI's
latent-to-RGB preview (no VAE: the tiny test VAE's cost would say nothing about a real one). The runs alternate off / on / on / off ... (``--rounds``
pairs), so a shared machine's slow drifts hit both alike; per setting the median wall and CPU time
of a run, their ratio (on / off), the cost of one validation image in training steps, and whether
every saved file of a validation run equals the file of the run without it, tensor for tensor
(``bit_identical``). CPU figures on toy models: they compare the two runs of this loop, not GPU
speed. Results: ``bench/results/bench_validation.json`` (git-ignored).

    python bench/bench_validation.py [--family sdxl flux] [--steps 300] [--every 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SIZE = 32
CFG = {"sdxl": 5.0, "flux": 1.0, "qwen_image": 4.0}   # FLUX: distilled guidance, CFG 1; others: real CFG
log = logging.getLogger("bench_validation")


def _setup():
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    import torch

    import comfy_runtime

    torch.set_num_threads(1)
    comfy_runtime.bootstrap()
    comfy_runtime.init_nodes()
    return comfy_runtime


def _run(comfy_runtime, family: str, folder: Path, name: str, args, validation: bool) -> tuple[float, float, dict]:
    import folder_paths
    import torch
    from comfyui_tlora.nodes.train import TLoRATrain
    from safetensors.torch import load_file

    with torch.inference_mode():
        model = comfy_runtime.build_model(family)
        latents = {"samples": torch.randn(comfy_runtime.latent_shape(family, 1, SIZE),
                                          generator=torch.Generator().manual_seed(0))}
        positive = comfy_runtime.fake_conditioning(family)
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.pop("loras", None)
    extra = {}
    if validation:
        extra = dict(validation_every=args.every, validation_positive=positive,
                     validation_steps=args.val_steps, validation_cfg=CFG.get(family, 1.0), validation_seed=1)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        TLoRATrain.execute(model, latents, positive, variant="auto", rank=4, min_rank=-1, schedule_power=1.0,
                           steps=args.steps, learning_rate=1e-3, batch_size=1, seed=0,
                           target_layers="attention", training_dtype="fp32", gradient_checkpointing=True,
                           save_every=0, file_name=name, resume_from="none", **extra)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, load_file(folder / f"{name}.safetensors")


def bench_family(comfy_runtime, family: str, args) -> dict:
    times = {False: [], True: []}
    files = {False: [], True: []}
    order = []
    for r in range(args.rounds):
        order += [False, True] if r % 2 == 0 else [True, False]
    with tempfile.TemporaryDirectory() as tmp:
        for i, validation in enumerate(order):
            wall, cpu, tensors = _run(comfy_runtime, family, Path(tmp), f"{family}_{i}", args, validation)
            times[validation].append((wall, cpu))
            files[validation].append(tensors)
            log.info("%s validation=%s: %.2f s wall, %.2f s CPU", family, validation, wall, cpu)
    reference = files[False][0]
    identical = all(t.keys() == reference.keys() and all(t[k].equal(reference[k]) for k in reference)
                    for t in files[False] + files[True])
    images = len(range(args.every, args.steps + 1, args.every)) + (args.steps % args.every != 0)
    out = {"runs_per_setting": args.rounds, "validation_images_per_run": images,
           "sampler_steps": args.val_steps, "cfg": CFG.get(family, 1.0), "bit_identical": identical}
    for kind, index in (("wall", 0), ("cpu", 1)):
        off = statistics.median(t[index] for t in times[False])
        on = statistics.median(t[index] for t in times[True])
        out[f"off_{kind}_s"], out[f"on_{kind}_s"] = round(off, 3), round(on, 3)
        out[f"ratio_{kind}"] = round(on / off, 3)
        step = off / args.steps
        out[f"image_cost_in_training_steps_{kind}"] = round((on - off) / images / step, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sdxl", "flux"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--val-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs per family")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy_runtime = _setup()
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    import torch

    results = {"steps": args.steps, "every": args.every, "latent": SIZE, "torch": torch.__version__,
               "families": {f: bench_family(comfy_runtime, f, args) for f in args.family}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_validation.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))  # noqa: T201
    return 0 if all(r["bit_identical"] for r in results["families"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
