"""The T-LoRA Loader and Schedule Preview nodes through ComfyUI's real PromptExecutor, with files in a
temporary ``loras`` folder: the sampled result equals the hand-merged per-step reference, the input
MODEL is untouched, and bad input fails with a message that names the file and the fix.

Tolerance: the final latents of the Loader and of the hand-merged reference differ only by float32
rounding (merged vs. activation-space adapter, see test_loader_patch.py), measured at one ulp of the
latent's magnitude (1e-7 relative); 2e-6 relative leaves a 20x margin, while the T-LoRA moves the
latent by more than 20x that tolerance.
"""

from __future__ import annotations

import importlib

import loader_fixtures as lf
import pytest
import torch

import comfy_runtime

pytestmark = pytest.mark.comfy

REL_TOL = 2e-6


@pytest.fixture(scope="module")
def core(pack):
    return importlib.import_module(f"{pack.__name__}.tlora_core.files.write")


@pytest.fixture(scope="module")
def loader(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.loader")


def loader_prompt(family: str, lora_name: str, strength: float = 1.0, min_rank: int = -1,
                  power: float = 0.0, refactor: bool = False, steps: int = 3) -> dict:
    # An empty 4-channel latent; KSampler widens an all-zero latent to FLUX's 16 channels itself.
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}
    return {
        "1": {"class_type": "TLoRATestTinyModelLoader", "inputs": {"family": family}},
        "2": {"class_type": "TLoRALoader", "inputs": {
            "model": ["1", 0], "lora_name": lora_name, "strength_model": strength, "min_rank": min_rank,
            "schedule_power": power, "schedule_ordinary_lora": refactor}},
        "3": {"class_type": "TLoRATestTinyClipLoader", "inputs": {"family": family}},
        "4": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["3", 0], "text": "a photo of sks dog"}},
        "5": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["3", 0], "text": "blurry"}},
        "6": latent,
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 11, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "8": {"class_type": "TLoRATestTinyVaeLoader", "inputs": {"family": family}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["8", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def output_of(executor, node_id: str, slot: int = 0):
    return comfy_runtime.node_output(executor, node_id, slot)


def execution_error(server) -> dict:
    errors = [data for event, data in server.messages if event == "execution_error"]
    assert errors, f"no execution_error in {[e for e, _ in server.messages]}"
    return errors[0]


@pytest.mark.parametrize("family,variant", [("sdxl", "tlora"), ("flux", "vanilla")])
def test_node_in_a_real_prompt_equals_the_merged_reference(comfy, core, loras_dir, family, variant):
    import tiny_nodes

    base = comfy.build_model(family, seed=0)   # the same weights TLoRATestTinyModelLoader builds
    weights, factors = lf.make_tlora(base, family, variant, rank=8, min_rank=2, power=1.5, scale=2.0)
    core.save_tlora(loras_dir / "subject.safetensors", weights,
                    inventory=lf.inventory(base))
    executor, server = comfy.run_prompt(loader_prompt(family, "subject.safetensors", strength=0.8))
    assert executor.success, server.messages
    latent = output_of(executor, "7")["samples"]
    untouched = output_of(executor, "1")
    patched = output_of(executor, "2")
    assert untouched.injections == {} and len(patched.injections) == 1
    assert patched.model is untouched.model   # a clone: same weights, patched only in the forward

    reference = base.clone()
    lf.install_merged_reference(reference, [(factors, 0.8)], family)
    positive = comfy.fake_conditioning(family, seed=tiny_nodes._text_seed("a photo of sks dog"))
    negative = comfy.fake_conditioning(family, seed=tiny_nodes._text_seed("blurry"))
    want = comfy.sample(reference, family, steps=3, seed=11, size=16, cfg=2.0,
                        positive=positive, negative=negative)
    plain = comfy.sample(base, family, steps=3, seed=11, size=16, cfg=2.0,
                         positive=positive, negative=negative)
    tol = REL_TOL * want.abs().max().item()
    torch.testing.assert_close(latent, want, rtol=0, atol=tol)
    assert (latent - plain).abs().max() > 20 * tol


def test_node_reports_a_file_for_another_architecture(comfy, core, loras_dir):
    flux = comfy.build_model("flux", seed=0)
    weights, _ = lf.make_tlora(flux, "flux", "vanilla")
    core.save_tlora(loras_dir / "flux_subject.safetensors", weights, inventory=lf.inventory(flux))
    executor, server = comfy.run_prompt(loader_prompt("sdxl", "flux_subject.safetensors"))
    assert not executor.success
    error = execution_error(server)
    assert error["node_type"] == "TLoRALoader"
    assert "flux_subject.safetensors" in error["exception_message"]
    assert "FLUX" in error["exception_message"] and "SDXL" in error["exception_message"]


def test_node_reports_a_corrupt_file(comfy, loras_dir):
    (loras_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    executor, server = comfy.run_prompt(loader_prompt("sdxl", "broken.safetensors"))
    assert not executor.success
    message = execution_error(server)["exception_message"]
    assert "broken.safetensors" in message


def test_node_reports_min_rank_above_the_rank(comfy, core, loras_dir):
    base = comfy.build_model("sdxl", seed=0)
    weights, _ = lf.make_tlora(base, "sdxl", "tlora", rank=8, min_rank=4)
    core.save_tlora(loras_dir / "rank8.safetensors", weights, inventory=lf.inventory(base))
    executor, server = comfy.run_prompt(loader_prompt("sdxl", "rank8.safetensors", min_rank=12))
    assert not executor.success
    message = execution_error(server)["exception_message"]
    assert "rank8.safetensors" in message and "min_rank 12" in message and "between 1 and 8" in message


def test_missing_file_is_reported_with_the_folders_searched(comfy, loader, loras_dir):
    # ComfyUI 0.3.75 does not check V3 combo values at validation (newer versions may refuse the
    # prompt there): the node itself must then say what is missing and where it looked.
    try:
        executor, server = comfy.run_prompt(loader_prompt("sdxl", "not_there.safetensors"))
    except AssertionError as refused:
        assert "lora_name" in str(refused)
    else:
        assert not executor.success
        message = execution_error(server)["exception_message"]
        assert "not_there.safetensors" in message and str(loras_dir) in message
    with pytest.raises(FileNotFoundError, match="not_there.safetensors.*loras folders"):
        loader.lora_path("not_there.safetensors")


def test_a_failing_load_leaves_the_model_unpatched(comfy, core, loader, loras_dir):
    base = comfy.build_model("sdxl", seed=0)
    weights, _ = lf.make_tlora(base, "sdxl", "tlora", rank=8, min_rank=4)
    core.save_tlora(loras_dir / "ok.safetensors", weights, inventory=lf.inventory(base))
    for kwargs in ({"min_rank": 9}, {"min_rank": 0}, {"schedule_power": -1.0}):
        args = {"min_rank": -1, "schedule_power": 0.0} | kwargs
        with pytest.raises(ValueError):
            loader.TLoRALoader.execute(base, "ok.safetensors", 1.0, args["min_rank"],
                                       args["schedule_power"], False)
    assert base.injections == {} and base.attachments == {} and not base.wrappers
    out = loader.TLoRALoader.execute(base, "ok.safetensors", 1.0, 3, 2.0, False)
    patched = out.result[0]
    holder = next(iter(patched.attachments.values()))
    assert {a.schedule for g in holder.weights.adapters.values() for a in g} == {
        holder.weights.schedule} and holder.weights.schedule.min_rank == 3
    assert holder.weights.schedule.power == 2.0 and base.injections == {}


def test_schedule_preview_node_draws_the_loader_ranks(comfy, core, loras_dir, pack):
    preview = importlib.import_module(f"{pack.__name__}.nodes.schedule_preview")
    base = comfy.build_model("flux", seed=0)
    weights, _ = lf.make_tlora(base, "flux", "vanilla", rank=32, min_rank=1)
    core.save_tlora(loras_dir / "flux32.safetensors", weights, inventory=lf.inventory(base))
    prompt = {
        "1": {"class_type": "TLoRATestTinyModelLoader", "inputs": {"family": "flux"}},
        "2": {"class_type": "TLoRASchedulePreview", "inputs": {
            "model": ["1", 0], "steps": 12, "scheduler": "simple", "denoise": 1.0,
            "lora_name": "flux32.safetensors", "rank": 64, "min_rank": -1, "schedule_power": 0.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    executor, server = comfy.run_prompt(prompt)
    assert executor.success, server.messages
    image = output_of(executor, "2")
    assert image.shape == (1, preview.HEIGHT, preview.WIDTH, 3) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05

    ms = base.model.model_sampling
    sigmas = preview.step_sigmas(ms, "simple", 12, 1.0)
    schedule = weights.schedule   # rank 32, min_rank 1 from the file
    ranks = preview.ranks_per_step(ms, sigmas, schedule)
    assert ranks == [lf.reference_rank(1000 * float(s), 32, 1) for s in sigmas]
    assert ranks[0] < 10 and ranks == sorted(ranks) and ranks[-1] > 20
    # different ranks draw different pictures; the same ones the same picture
    a = preview.draw_schedule(ranks, schedule, "t")
    b = preview.draw_schedule(ranks[::-1], schedule, "t")
    assert a.tobytes() != b.tobytes() and a.tobytes() == preview.draw_schedule(ranks, schedule, "t").tobytes()


def test_schedule_preview_draws_the_family_schedule_from_its_own_sampling(comfy, pack, family, monkeypatch):
    samplers = importlib.import_module("comfy.samplers")   # not `import comfy...`: the fixture is `comfy`
    preview = importlib.import_module(f"{pack.__name__}.nodes.schedule_preview")
    drawn = []
    draw = preview.draw_schedule
    monkeypatch.setattr(preview, "draw_schedule", lambda ranks, *a: drawn.append(ranks) or draw(ranks, *a))
    base = comfy.build_model(family, seed=0)
    out = preview.TLoRASchedulePreview.execute(base, 8, "simple", 1.0, preview.NO_FILE, 16, -1, 0.0)
    assert out.result[0].shape == (1, preview.HEIGHT, preview.WIDTH, 3)
    ms = base.model.model_sampling   # the family's own sampling (its shift, its table)
    sigmas = samplers.calculate_sigmas(ms, "simple", 8)[:-1]
    assert drawn == [[lf.reference_rank(lf.timestep_of(ms, float(s), family), 16, 8) for s in sigmas]]
    assert drawn[0][0] < drawn[0][-1]


def test_schedule_preview_without_a_file_and_with_denoise(comfy, pack):
    preview = importlib.import_module(f"{pack.__name__}.nodes.schedule_preview")
    base = comfy.build_model("sdxl", seed=0)
    out = preview.TLoRASchedulePreview.execute(base, 10, "karras", 0.5, preview.NO_FILE, 64, -1, 0.0)
    assert out.result[0].shape == (1, preview.HEIGHT, preview.WIDTH, 3)
    ms = base.model.model_sampling
    full = preview.step_sigmas(ms, "karras", 10, 1.0)
    half = preview.step_sigmas(ms, "karras", 10, 0.5)
    assert len(half) == 10 and half[0] < full[0]       # partial denoise starts at a lower noise level
    schedule, note = preview.preview_schedule(base, preview.NO_FILE, 64, -1, 0.0)
    assert (schedule.rank, schedule.min_rank, schedule.power) == (64, 32, 1.0) and note == "no file"
    ranks = preview.ranks_per_step(ms, half, schedule)
    assert ranks[0] > 32 and ranks == sorted(ranks)
    with pytest.raises(ValueError, match="min_rank"):
        preview.preview_schedule(base, preview.NO_FILE, 16, 20, 0.0)


@pytest.mark.parametrize("schedule_it", [False, True])
def test_ordinary_lora_with_and_without_a_schedule(comfy, loader, loras_dir, schedule_it):
    """A kohya LoRA: unmasked by default; with schedule_ordinary_lora, its delta's singular
    components (strongest first, computed here by a full SVD) follow the rank schedule."""
    import comfy.model_management as mm
    import reference_files as rf

    base = comfy.build_model("sdxl", seed=0)
    gen = torch.Generator().manual_seed(5)
    rank, alpha = 4, 2.0
    layers = {name: (torch.randn(rank, m.in_features, generator=gen) / m.in_features ** 0.5,
                     torch.randn(m.out_features, rank, generator=gen), alpha)
              for name, m in base.model.diffusion_model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".attn" in name}
    rf.write_safetensors(loras_dir / "plain.safetensors", rf.plain_lora_state_dict(layers, "kohya"))
    out = loader.TLoRALoader.execute(base, "plain.safetensors", 1.0, 1 if schedule_it else -1, 0.0,
                                     schedule_it)
    model = out.result[0]

    factors = {}
    for name, (down, up, a) in layers.items():
        delta = (up.double() * (a / rank)) @ down.double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        f = lf.Factors(vh[:rank], u[:, :rank] * s[:rank])
        f.rank, f.min_rank, f.power = rank, (1 if schedule_it else rank), 1.0
        factors[name] = [f]
    x, kwargs = lf.direct_inputs("sdxl", batch=2)
    sigmas = base.model.model_sampling.sigmas[[999, 0]].float()   # ranks 1 and 4 when scheduled
    mm.load_models_gpu([model])
    got = lf.call_model(model, x, sigmas, kwargs)
    reference = base.clone()
    lf.install_merged_reference(reference, [(factors, 1.0)], "sdxl")
    mm.load_models_gpu([reference])
    want = torch.cat([lf.call_model(reference, x[i:i + 1], sigmas[i:i + 1],
                                    {k: v[i:i + 1] for k, v in kwargs.items()}) for i in range(2)])
    # float32 rounding as in test_loader_patch.py (2e-5 of the output's magnitude)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    mm.load_models_gpu([base])
    plain = lf.call_model(base, x, sigmas, kwargs)
    assert (got - plain).abs().max() > 1e-3 * want.abs().max()
