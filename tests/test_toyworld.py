"""The toy world: generator, text encoder, toy VAE and evaluator give known results on known
inputs, and one short end-to-end run of the experiment writes result files that parse."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from comfy_runtime import REPO

if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after ComfyUI's root: the pack's nodes/ must not shadow nodes.py

from bench.toyworld import evaluate, pixels, text, world  # noqa: E402


def test_world_has_every_combination_and_held_out_scenes_are_part_of_it():
    scenes = world.all_base_scenes()
    assert len(scenes) == len(set(scenes)) == 3 * 3 * 4 * 4
    held = world.held_out_scenes()
    assert len(set(held)) == 12 and set(held) <= set(scenes)
    assert world.held_out_scenes() == held  # fixed by the seed


@pytest.mark.parametrize("scene", world.all_base_scenes()[::7] + [world.concept_scene("top", "black")])
def test_render_draws_the_background_and_the_object_where_the_caption_says(scene):
    image = world.render(scene)
    assert image.shape == (world.SIZE, world.SIZE, 3) and image.dtype == np.float32
    assert np.allclose(image[0, 0], world.rgb01(world.BACKGROUNDS[scene.background]))
    row, col = world.POSITIONS[scene.position]
    expected = world.CONCEPT_COLOURS["centre"] if scene.is_concept else world.OBJECT_COLOURS[scene.colour]
    assert np.allclose(image[row, col], world.rgb01(expected))


@pytest.mark.parametrize("scene", world.all_base_scenes() + [world.concept_scene(p, b)
                         for p in world.POSITIONS for b in world.BACKGROUNDS])
def test_a_rendered_scene_scores_right_on_its_own_prompt(scene):
    s = evaluate.score(world.render(scene), scene)
    assert s.aligned and s.background == scene.background and s.position == scene.position
    assert s.is_concept == scene.is_concept
    assert s.nearest == (world.CONCEPT if scene.is_concept else f"{scene.colour} {scene.shape}")


def test_scores_on_a_wrong_prompt_name_what_is_wrong():
    drawn = world.concept_scene("right", "green")
    s = evaluate.score(world.render(drawn), world.concept_scene("left", "blue"))
    assert not s.background_right and not s.position_right and not s.aligned
    assert s.is_concept and s.concept_distance == pytest.approx(0.0)
    s = evaluate.score(world.render(drawn), world.concept_scene("right", "blue"))
    assert s.position_right and not s.background_right


def test_an_image_without_an_object_has_no_position_and_no_concept():
    empty = np.empty((world.SIZE, world.SIZE, 3), np.float32)
    empty[:] = world.rgb01(world.BACKGROUNDS["gray"])
    s = evaluate.score(empty, world.concept_scene("left", "gray"))
    assert s.background_right and s.position is None and not s.aligned and not s.is_concept


def test_noise_on_the_concept_raises_its_distance_but_keeps_it_recognised():
    scene = world.concept_scene("bottom", "blue")
    noisy = world.render(scene) + np.random.default_rng(0).normal(0, 0.03, (world.SIZE, world.SIZE, 3))
    s = evaluate.score(noisy.astype(np.float32), scene)
    assert s.is_concept and s.aligned and 0.0 < s.concept_distance < 0.1


def test_summarise_counts_fractions():
    scene = world.concept_scene("left", "blue")
    good = evaluate.score(world.render(scene), scene)
    bad = evaluate.score(world.render(world.Scene("red", "circle", "top", "blue")), scene)
    summary = evaluate.summarise([good, bad, good, good])
    assert summary["alignment"] == 0.75 and summary["fidelity"] == 0.75 and summary["background"] == 1.0


def test_text_encoder_is_fixed_and_tells_word_order_apart():
    a, pa = text.encode(["a red circle on the left, blue background"])
    b, _ = text.encode(["a red circle on the left, blue background"])
    c, _ = text.encode(["a blue circle on the left, red background"])
    assert torch.equal(a, b) and a.shape == (1, text.TOKENS, text.WIDTH) and pa.shape == (1, text.WIDTH)
    assert not torch.allclose(a, c)
    empty, pooled = text.encode([""])
    assert torch.equal(pooled, torch.zeros(1, text.WIDTH))
    assert torch.equal(empty[0], text.position_embeddings())
    cond = text.conditioning("a sks object on the right, green background")
    assert cond[0][0].shape == (1, text.TOKENS, text.WIDTH) and cond[0][1]["pooled_output"].shape == (1, text.WIDTH)
    with pytest.raises(ValueError, match="words"):
        text.words("one two three four five six seven eight nine")


def test_toy_vae_round_trips_images():
    images = np.stack([world.render(s) for s in world.all_base_scenes()[:5]])
    latent = pixels.encode(images)["samples"]
    assert latent.shape == (5, 4, world.SIZE, world.SIZE)
    assert np.allclose(pixels.decode(latent), images, atol=1e-6)


def test_toy_vae_uses_comfyuis_sdxl_latent_scale(comfy):
    import comfy.latent_formats

    assert pixels.SDXL_SCALE_FACTOR == comfy.latent_formats.SDXL().scale_factor


def test_short_end_to_end_run_writes_result_files_that_parse(comfy, tmp_path, monkeypatch):
    import folder_paths

    from bench.toyworld import experiment, run

    # run.main points the loras folder at its output; restored after the test.
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        folder_paths.folder_names_and_paths["loras"])
    monkeypatch.delitem(folder_paths.filename_list_cache, "loras", raising=False)

    assert run.main(["--steps", "2", "--seeds", "1", "--images-per-prompt", "1", "--sampler-steps", "2",
                     "--no-base-quality", "--output", str(tmp_path)]) == 0
    for name in ("grid.png", "tradeoff.png", "results.csv", "table.md"):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["variant"] for r in results["table_final_step"]} == set(experiment.VARIANTS)
    assert {r["inference"] for r in results["table_final_step"]} == {"per-step", "merged"}
    samples = json.loads((tmp_path / "samples.json").read_text())["samples"]
    # 4 variants x 2 inference modes x 1 seed x 2 checkpoints x 15 prompts x 1 image
    assert len(samples) == 4 * 2 * 2 * len(experiment.EVAL_SCENES)
    from PIL import Image

    for entry in samples[:: len(experiment.EVAL_SCENES)]:
        assert entry["variant"] in experiment.VARIANTS and entry["inference"] in ("per-step", "merged")
        assert entry["step"] in (1, 2) and entry["seed"] == 0 and entry["position"] in world.POSITIONS
        assert tuple(entry["background_rgb"]) in world.BACKGROUNDS.values()
        assert f"on the {entry['position']}" in entry["prompt"]
        with Image.open(tmp_path / entry["path"]) as image:
            assert image.size == (world.SIZE, world.SIZE)
    assert len(list((tmp_path / "loras" / "toyworld").glob("*.safetensors"))) == 4 * 2


def test_pretraining_is_reproducible_from_its_seed(comfy, tmp_path):
    import safetensors.torch

    from bench.toyworld import pretrain

    runs = []
    other = tmp_path / "c.safetensors"
    with torch.random.fork_rng():  # pretrain seeds torch's global generator too
        for name in ("a", "b"):
            out = tmp_path / f"{name}.safetensors"
            pretrain.pretrain(steps=3, batch=4, seed=5, lr=1e-3, out=out, log_every=1, save_every=10)
            runs.append(safetensors.torch.load_file(str(out)))
        pretrain.pretrain(steps=3, batch=4, seed=6, lr=1e-3, out=other, log_every=1, save_every=10)
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    changed = safetensors.torch.load_file(str(other))
    assert any(not torch.equal(runs[0][k], changed[k]) for k in runs[0])


def test_copy_rates_count_images_that_repeat_the_training_layout():
    from bench.toyworld import experiment

    train = experiment.TRAIN_SCENE
    asked = [world.concept_scene("left", "blue"), world.concept_scene("top", train.background),
             world.concept_scene(train.position, "black")]
    copied = [evaluate.score(world.render(train), a) for a in asked]
    obeyed = [evaluate.score(world.render(a), a) for a in asked]
    assert experiment.copies_position(copied, asked) == 1.0  # the third asks for the training position
    assert experiment.copies_layout(copied) == 1.0
    assert experiment.copies_position(obeyed, asked) == 0.0 and experiment.copies_layout(obeyed) == 0.0
