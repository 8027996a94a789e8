"""Every shipped workflow (workflows/*.json) is sound and runs.

- Static checks against the real server's ``/object_info`` (one server of the ComfyUI under test,
  with this pack, for the module): valid UI-format JSON, every node type exists, every link joins
  matching types, every widget value fits its input (model file names only need the form of a model
  file: no weights ship).
- The files mean what ``scripts/make_workflows.py`` generates from this runtime's schemas (node
  types, layout, links, widget values by name; not the exact serialisation, which depends on the
  runtime).
- Contents: standard model file names, the paper's recommended settings and prompts from the
  paper's Appendix A.
- Runs: each graph converted to API format runs in ComfyUI's real PromptExecutor with the model
  loaders and text encoders swapped for tiny stand-ins (tests/tiny_nodes) and training cut to a
  few steps; the images it saves are checked. The generate workflows load the file their train
  workflow saved.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request

import pytest
import torch
from PIL import Image
from workflow_tools import (
    VIRTUAL_NODE_TYPES,
    check_workflow,
    load_workflow,
    meaning_differences,
    runtime_marks,
    schema_outputs,
    to_api,
    widget_values,
    workflow_runtimes,
)

import comfy_compat
from comfy_runtime import REPO

WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
NAMES = [path.stem for path in WORKFLOWS]
TRAIN_WORKFLOWS = [name for name in NAMES if "train" in name or "vs" in name]


def _params(names: list[str], value=lambda name: name) -> list:
    """One parameter per workflow, marked with the ComfyUI versions that run it (the FLUX.2 Klein
    one: those that load Klein; deselected on the others by conftest)."""
    return [pytest.param(value(name), id=name, marks=runtime_marks(name)) for name in names]


PATH_PARAMS = _params(NAMES, lambda name: WORKFLOW_DIR / f"{name}.json")
NAME_PARAMS, TRAIN_PARAMS = _params(NAMES), _params(TRAIN_WORKFLOWS)
CONCEPT_IMAGE = "sks_dog.png"

# Paper Appendix A, live_set (V* = the subject token): the prompts the examples may use.
PAPER_LIVE_SET = [
    "a chocolate-colored V*", "a red V*", "a purple V*", "a brightly lit V*", "a snowy V*",
    "a V* in a purple wizard outfit", "a V* in a doctor outfit", "a V* in a superhero suit",
    "a V* dressed as a ballerina", "a V* wearing a green bow tie",
    "a V* with the Eiffel Tower in the background", "a V* with a mountain in the background",
    "a V* with a tree and autumn leaves in the background",
    "a V* on top of green grass with sunflowers around it",
    "a V* with a sunset and palm trees in the background",
    "a V* with the Sydney Opera House in the background", "a V* lying in the bed",
    "a V* sitting on the chair", "a V* swimming", "a V* sleeping", "a V* skateboarding",
    "a V* riding a surfboard", "a V* jumping with a parachute", "a V* running on a treadmill",
    "a V* riding a bike",
    "a V* dressed in a superhero cape, soaring through the skies above a bustling city during a sunset",
    "a V* wearing a tuxedo performing on a stage in the spotlight",
    "a V* in a wizards robe in a magical forest at midnight, accented with purples and sparkling "
    "silver tones",
    "a V* wearing a space helmet, among stars in a cosmic landscape during a starry night",
    "a V* wearing a pirate hat exploring a sandy beach at the sunset with a boat floating in the "
    "background",
]
TOKEN = "sks dog"
TRAIN_PROMPT = f"a photo of {TOKEN}"

# Loaders and text encoders -> tiny stand-ins of the same output types (tests/tiny_nodes).
# Which tiny model stands in for each workflow's diffusion model file (a checkpoint: SDXL).
TINY_FAMILY_OF_UNET = {"flux1-dev.safetensors": "flux", "z_image_turbo_bf16.safetensors": "zimage",
                       "flux-2-klein-base-4b.safetensors": "flux2_klein",
                       "qwen_image_fp8_e4m3fn.safetensors": "qwen_image"}
SWAPS = {"CheckpointLoaderSimple": "TLoRATestTinyCheckpointLoader", "UNETLoader": "TLoRATestTinyModelLoader",
         "DualCLIPLoader": "TLoRATestTinyClipLoader", "CLIPLoader": "TLoRATestTinyClipLoader",
         "VAELoader": "TLoRATestTinyVaeLoader"}
# What the tiny run changes, and why: a few optimizer and sampler steps prove the graph runs;
# rank 4 / min_rank 2 because the tiny models' attention layers are 32-64 wide (rank 64 cannot
# exist there); 128 px images give the tiny models 16 x 16 latents.
TRAIN_STEPS, SAVE_EVERY, TINY_RANK, TINY_MIN_RANK, SAMPLE_STEPS, TINY_SIZE = 3, 2, 4, 2, 2, 128


@pytest.fixture(scope="module")
def server_data(tmp_path_factory):
    """What a real server with this pack reports (one server for the module): /object_info, the
    template list, and the workflow files and thumbnails as it serves them."""
    from comfy_server import PACK_DIR_NAME, running_server

    base = tmp_path_factory.mktemp("workflow_server")
    (base / "input").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 120, 60)).save(base / "input" / CONCEPT_IMAGE)
    with running_server(base) as server:
        served = {}
        for path in WORKFLOWS:
            for suffix in (".json", ".png"):
                route = f"/api/workflow_templates/{PACK_DIR_NAME}/{path.stem}{suffix}"
                with urllib.request.urlopen(server.url + route, timeout=30) as response:
                    served[path.stem + suffix] = response.read()
        return {"object_info": server.get_json("/object_info"), "templates": server.get_json("/workflow_templates"),
                "served": served, "pack": PACK_DIR_NAME}


@pytest.fixture(scope="module")
def object_info(server_data):
    return server_data["object_info"]


@pytest.mark.comfy
@pytest.mark.server
def test_comfyui_lists_and_serves_the_workflows_as_templates(server_data):
    """ComfyUI's template browser finds workflows/ and serves each file and its thumbnail."""
    assert sorted(server_data["templates"][server_data["pack"]]) == NAMES
    for path in WORKFLOWS:
        assert server_data["served"][path.stem + ".json"] == path.read_bytes()
        assert server_data["served"][path.stem + ".png"] == path.with_suffix(".png").read_bytes()


def _nodes_of(workflow: dict, node_type: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def _values(workflow: dict, node_type: str, info: dict) -> list[dict]:
    return [widget_values(node, info[node_type]) for node in _nodes_of(workflow, node_type)]


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_workflow_is_ui_format_json(path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    assert workflow["version"] == 0.4
    assert isinstance(workflow["nodes"], list) and workflow["nodes"]
    assert all(len(link) == 6 for link in workflow["links"])
    thumbnail = path.with_suffix(".png")
    assert thumbnail.is_file(), f"{thumbnail.name}: every workflow ships a same-name thumbnail"
    with Image.open(thumbnail) as image:
        assert 256 <= image.size[0] <= 1024


@pytest.mark.comfy
@pytest.mark.server
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_node_types_exist_in_comfyui_and_pack(object_info, path):
    types = {node["type"] for node in load_workflow(path)["nodes"]}
    unknown = sorted(types - set(object_info) - VIRTUAL_NODE_TYPES)
    assert not unknown, f"not in this ComfyUI + this pack: {unknown}"
    assert types & {"TLoRATrain", "TLoRALoader"}, "the example uses none of the pack's main nodes"


@pytest.mark.comfy
@pytest.mark.server
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_links_and_widget_values_fit_the_schemas(object_info, path):
    assert check_workflow(load_workflow(path), object_info) == []


@pytest.mark.comfy
@pytest.mark.server
def test_checker_catches_broken_workflows(object_info):
    """The checker above is not vacuous: each kind of fault is reported."""
    workflow = load_workflow(WORKFLOW_DIR / "tlora_sdxl_train_and_generate.json")
    train = _nodes_of(workflow, "TLoRATrain")[0]
    sampler = _nodes_of(workflow, "KSampler")[0]
    broken = json.loads(json.dumps(workflow))
    nodes = {node["id"]: node for node in broken["nodes"]}
    nodes[train["id"]]["widgets_values"][1] = 100000          # rank above its max
    nodes[sampler["id"]]["widgets_values"][4] = "no_such_sampler"
    broken["links"][0][5] = "LATENT"                          # a link of the wrong type
    nodes[sampler["id"]]["type"] = "NoSuchNode"
    errors = "\n".join(check_workflow(broken, object_info))
    assert "rank" in errors and "outside" in errors
    assert "unknown node type 'NoSuchNode'" in errors
    assert "via LATENT" in errors
    broken = json.loads(json.dumps(workflow))
    next(n for n in broken["nodes"] if n["id"] == sampler["id"])["widgets_values"][4] = "no_such_sampler"
    assert "no_such_sampler" in "\n".join(check_workflow(broken, object_info))


@pytest.mark.comfy
@pytest.mark.server
def test_checker_outputs_rule(object_info):
    """A file may lack declared outputs at the end of a node (what a file saved against an older
    ComfyUI looks like: both frontends add them on load), never carry one the schema lacks or
    declares differently (the frontend keeps it: a socket the server does not have)."""
    workflow = load_workflow(WORKFLOW_DIR / "tlora_sdxl_train_and_generate.json")
    image = _nodes_of(workflow, "LoadImage")[0]
    declared = schema_outputs(object_info["LoadImage"])
    assert [(slot["name"], slot["type"]) for slot in image["outputs"]] == declared
    assert image["outputs"][-1]["links"] is None  # MASK: unlinked here
    older = json.loads(json.dumps(workflow))
    _nodes_of(older, "LoadImage")[0]["outputs"].pop()
    assert check_workflow(older, object_info) == []
    extra = json.loads(json.dumps(workflow))
    _nodes_of(extra, "LoadImage")[0]["outputs"].append({"name": "extra", "type": "INT", "links": None})
    assert "are not the start of the schema's" in "\n".join(check_workflow(extra, object_info))
    renamed = json.loads(json.dumps(workflow))
    _nodes_of(renamed, "LoadImage")[0]["outputs"][-1]["type"] = "LATENT"
    assert "are not the start of the schema's" in "\n".join(check_workflow(renamed, object_info))


@pytest.mark.comfy
def test_files_are_what_the_generator_makes(comfy, tmp_path):
    """workflows/*.json mean what scripts/make_workflows.py makes from THIS runtime's node schemas.

    Compared by meaning (make_workflows.stale: node types, titles, positions, links by what they
    join, widget values by name, plus the sizes and sockets the generator lays out), not as text:
    the schemas differ between runtimes (0.33 declares outputs on SaveImage / PreviewImage /
    PreviewAny that 0.3.75 lacks), so the text the generator writes differs while the workflow is
    the same. The files ship generated on the oldest supported runtime, whose outputs both
    frontends accept (see test_checker_outputs_rule).
    """
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_workflows
    finally:
        sys.path.remove(str(REPO / "scripts"))
    info = make_workflows.object_info()
    assert sorted(make_workflows.render(info)) == sorted(path.name for path in WORKFLOWS)
    out_of_date = make_workflows.stale(info)
    assert not out_of_date, "stale: run scripts/make_workflows.py\n" + "\n".join(
        f"{name}: {reason}" for name, reasons in out_of_date.items() for reason in reasons[:20])
    # Not vacuous: a changed widget value, a moved link and a resized node are each stale.
    edits = {
        "tlora_sdxl_generate.json": lambda w: _nodes_of(w, "KSampler")[0]["widgets_values"].__setitem__(2, 30),
        "tlora_flux_generate.json": lambda w: _nodes_of(w, "SaveImage")[0].__setitem__("size", [100, 100]),
        "tlora_sdxl_lora_vs_tlora.json": lambda w: w["links"][0].__setitem__(3, w["links"][1][3]),
    }
    for path in WORKFLOWS:
        workflow = load_workflow(path)
        edits.get(path.name, lambda w: None)(workflow)
        (tmp_path / path.name).write_text(json.dumps(workflow), encoding="utf-8")
    assert sorted(make_workflows.stale(info, tmp_path)) == sorted(edits)


def test_meaning_comparison_is_not_vacuous():
    """Each kind of change the staleness test must see is reported; serialisation alone is not."""
    info = {"KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0}],
                                                "steps": ["INT", {"default": 20}]}},
                         "output": ["LATENT"], "output_name": ["LATENT"]},
            "PreviewImage": {"input": {"required": {"images": ["IMAGE"]}}, "output": [], "output_name": []}}
    base = {"nodes": [{"id": 1, "type": "KSampler", "pos": [0, 0], "mode": 0,
                       "inputs": [{"name": "model", "type": "MODEL", "link": None}],
                       "outputs": [{"name": "LATENT", "type": "LATENT", "links": [1]}],
                       "widgets_values": [5, "fixed", 20]},
                      {"id": 2, "type": "PreviewImage", "pos": [300, 0], "mode": 0,
                       "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [],
                       "widgets_values": []}],
            "links": [[1, 1, 0, 2, 0, "LATENT"]], "groups": [], "version": 0.4}

    def changed(edit) -> list[str]:
        other = json.loads(json.dumps(base))
        edit(other)
        return meaning_differences(base, other, info)

    def reserialised(w):
        # What a newer frontend or schema changes: ids as strings, an empty widgets_values left out,
        # declared outputs added, link ids renumbered.
        w["nodes"][1]["id"] = "2"
        del w["nodes"][1]["widgets_values"]
        w["nodes"][1]["outputs"] = [{"name": "images", "type": "IMAGE", "links": None}]
        w["links"][0][0] = 7
        w["nodes"][0]["outputs"][0]["links"] = [7]
        w["nodes"][1]["inputs"][0]["link"] = 7
    assert changed(reserialised) == []
    assert changed(lambda w: w["nodes"][0]["widgets_values"].__setitem__(2, 25))  # a widget value
    assert changed(lambda w: w["nodes"][0]["widgets_values"].__setitem__(1, "randomize"))  # seed control
    assert changed(lambda w: w["nodes"][1].__setitem__("type", "SaveImage"))
    assert changed(lambda w: w["nodes"][0].__setitem__("title", "Sampler"))
    assert changed(lambda w: w["nodes"][0].__setitem__("pos", [10, 0]))
    assert changed(lambda w: w["links"].clear())
    assert changed(lambda w: w["links"][0].__setitem__(5, "IMAGE"))


TITLE_BAR = 30   # LiteGraph draws a node's title above its position (scripts/workflow_graph.py)


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_no_two_nodes_overlap(path):
    """Every node, title bar included, has its own space: a node that grows (T-LoRA Train with
    new inputs) must push the layout, not hide what is under it."""
    boxes = [(node["id"], node["type"], node["pos"][0], node["pos"][1] - TITLE_BAR,
              node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
             for node in load_workflow(path)["nodes"]]
    overlapping = [(a[:2], b[:2]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                   if a[2] < b[4] and b[2] < a[4] and a[3] < b[5] and b[3] < a[5]]
    assert not overlapping, overlapping


@pytest.mark.comfy
@pytest.mark.server
def test_standard_model_files_and_family_wiring(object_info):
    """Each family's standard file names and the nodes its users sample it with."""
    for path in WORKFLOWS:
        workflow = load_workflow(path)
        if "zimage" in path.stem:   # Z-Image Turbo: Qwen3-4B as "lumina2", shift 3, 9 steps at CFG 1
            assert [v["unet_name"] for v in _values(workflow, "UNETLoader", object_info)] == [
                "z_image_turbo_bf16.safetensors"]
            assert _values(workflow, "CLIPLoader", object_info) == [
                {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}]
            assert [v["vae_name"] for v in _values(workflow, "VAELoader", object_info)] == ["ae.safetensors"]
            assert _values(workflow, "ModelSamplingAuraFlow", object_info) == [{"shift": 3.0}]
            assert {(v["steps"], v["cfg"], v["sampler_name"], v["scheduler"])
                    for v in _values(workflow, "KSampler", object_info)} == {(9, 1.0, "res_multistep", "simple")}
            assert not _nodes_of(workflow, "FluxGuidance") and _nodes_of(workflow, "EmptySD3LatentImage")
        elif "klein" in path.stem:   # FLUX.2 Klein base: Qwen3-4B as "flux2", no guidance input
            assert [v["unet_name"] for v in _values(workflow, "UNETLoader", object_info)] == [
                "flux-2-klein-base-4b.safetensors"]
            assert _values(workflow, "CLIPLoader", object_info) == [
                {"clip_name": "qwen_3_4b.safetensors", "type": "flux2", "device": "default"}]
            assert [v["vae_name"] for v in _values(workflow, "VAELoader", object_info)] == ["flux2-vae.safetensors"]
            assert _values(workflow, "Flux2Scheduler", object_info) == [{"steps": 20, "width": 1024, "height": 1024}]
            assert _values(workflow, "EmptyFlux2LatentImage", object_info) == [
                {"width": 1024, "height": 1024, "batch_size": 1}]
            guiders = _values(workflow, "CFGGuider", object_info)
            assert len(guiders) == len(_nodes_of(workflow, "SamplerCustomAdvanced")) >= 3
            assert {v["cfg"] for v in guiders} == {5.0}
            assert not _nodes_of(workflow, "FluxGuidance") and not _nodes_of(workflow, "KSampler")
        elif "flux" in path.stem:
            assert [v["unet_name"] for v in _values(workflow, "UNETLoader", object_info)] == ["flux1-dev.safetensors"]
            assert _values(workflow, "DualCLIPLoader", object_info) == [
                {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                 "device": "default"}]
            assert [v["vae_name"] for v in _values(workflow, "VAELoader", object_info)] == ["ae.safetensors"]
            guidance = sorted(v["guidance"] for v in _values(workflow, "FluxGuidance", object_info))
            assert guidance[-1] == 3.5 and set(guidance) <= {1.0, 3.5}
            assert {v["cfg"] for v in _values(workflow, "KSampler", object_info)} == {1.0}
            assert not _nodes_of(workflow, "CheckpointLoaderSimple")
        elif "qwen_image" in path.stem:
            # As ComfyUI's Qwen-Image template: Comfy-Org's split files, the Qwen 2.5 VL encoder as
            # CLIPLoader type qwen_image, shift 3.1, real CFG against an empty negative, no guidance.
            assert [v["unet_name"] for v in _values(workflow, "UNETLoader", object_info)] == [
                "qwen_image_fp8_e4m3fn.safetensors"]
            assert _values(workflow, "CLIPLoader", object_info) == [
                {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image", "device": "default"}]
            assert [v["vae_name"] for v in _values(workflow, "VAELoader", object_info)] == ["qwen_image_vae.safetensors"]
            assert _values(workflow, "ModelSamplingAuraFlow", object_info) == [{"shift": 3.1}]
            assert {v["cfg"] for v in _values(workflow, "KSampler", object_info)} == {2.5}
            assert not _nodes_of(workflow, "FluxGuidance") and not _nodes_of(workflow, "ConditioningZeroOut")
            assert not _nodes_of(workflow, "CheckpointLoaderSimple")
        else:
            assert [v["ckpt_name"] for v in _values(workflow, "CheckpointLoaderSimple", object_info)] == [
                "sd_xl_base_1.0.safetensors"]


@pytest.mark.comfy
@pytest.mark.server
def test_paper_settings_in_the_trainers(object_info):
    for name in TRAIN_WORKFLOWS:
        workflow = load_workflow(WORKFLOW_DIR / f"{name}.json")
        for values in _values(workflow, "TLoRATrain", object_info):
            assert values["learning_rate"] == 1e-4 and values["batch_size"] == 1
            if values["variant"] == "LoRA":  # the paper's baseline: 500 steps (Appendix B)
                assert values["steps"] == 500 and values["rank"] == 64
            elif "flux" in name:  # the reference FLUX recipe (FLUX.1, FLUX.2 Klein): rank 32, vanilla T-LoRA
                assert (values["variant"], values["rank"], values["min_rank"]) == ("Vanilla T-LoRA", 32, 16)
            elif "qwen_image" in name:  # the pack's Qwen-Image recipe (the paper has none)
                assert (values["variant"], values["rank"], values["min_rank"]) == ("T-LoRA", 16, 8)
            elif "zimage" in name:  # the family's T-LoRA at rank 32, r_min = 50 %
                assert (values["variant"], values["rank"], values["min_rank"], values["steps"]) == (
                    "T-LoRA", 32, 16, 1000)
            else:  # T-LoRA: rank 64, r_min = 50 %, 800 steps
                assert (values["variant"], values["rank"], values["min_rank"], values["steps"]) == (
                    "T-LoRA", 64, 32, 800)


@pytest.mark.comfy
@pytest.mark.server
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_prompts_come_from_the_paper(object_info, path):
    allowed = {p.replace("V*", TOKEN) for p in PAPER_LIVE_SET} | {TRAIN_PROMPT, ""}
    texts = [v["text"] for v in _values(load_workflow(path), "CLIPTextEncode", object_info)]
    assert set(texts) <= allowed, set(texts) - allowed
    assert len({t for t in texts if t not in (TRAIN_PROMPT, "")}) >= 3, "several prompts per workflow"


def test_generate_workflows_load_what_the_train_workflows_save():
    for family in ("sdxl", "flux"):
        train = load_workflow(WORKFLOW_DIR / f"tlora_{family}_train_and_generate.json")
        generate = load_workflow(WORKFLOW_DIR / f"tlora_{family}_generate.json")
        file_name = next(v for v in _nodes_of(train, "TLoRATrain")[0]["widgets_values"]
                         if isinstance(v, str) and v.startswith("tlora/"))
        assert _nodes_of(generate, "TLoRALoader")[0]["widgets_values"][0] == f"{file_name}.safetensors"


def tiny_prompt(workflow: dict, object_info: dict) -> tuple[dict, str]:
    """The workflow in API format with tiny stand-ins and a few steps (see the constants above)."""
    prompt = to_api(workflow, object_info)
    family = next((TINY_FAMILY_OF_UNET[n["inputs"]["unet_name"]] for n in prompt.values()
                   if n["class_type"] == "UNETLoader"), "sdxl")
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in SWAPS:
            node["class_type"], node["inputs"] = SWAPS[kind], {"family": family}
        elif kind == "CLIPTextEncode":
            node["class_type"] = "TLoRATestTinyTextEncode"
        elif kind == "TLoRATrain":
            inputs.update(steps=TRAIN_STEPS, rank=TINY_RANK, min_rank=TINY_MIN_RANK,
                          save_every=SAVE_EVERY if inputs["save_every"] else 0)
        elif kind == "KSampler":
            inputs["steps"] = SAMPLE_STEPS
        elif kind == "Flux2Scheduler":   # its sigmas depend on the image size
            inputs.update(steps=SAMPLE_STEPS, width=TINY_SIZE, height=TINY_SIZE)
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage", "ImageScale"):
            inputs.update(width=TINY_SIZE, height=TINY_SIZE)
    return prompt, family


@pytest.fixture(scope="module")
def runtime_dirs(comfy, tmp_path_factory):
    """ComfyUI's input/output/loras folders pointed at a temporary tree for this module."""
    comfy.init_nodes()
    import folder_paths
    import tiny_nodes

    tiny_nodes.register()
    root = tmp_path_factory.mktemp("workflow_runs")
    dirs = {key: root / key for key in ("input", "output", "loras")}
    for path in dirs.values():
        path.mkdir()
    # A textured concept image: a flat colour would make every latent alike.
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(96, 128, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(dirs["input"] / CONCEPT_IMAGE)
    saved = (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.folder_names_and_paths["loras"])
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.folder_names_and_paths["loras"] = ([str(dirs["loras"])], saved[2][1])
    folder_paths.filename_list_cache.pop("loras", None)
    try:
        yield dirs
    finally:
        folder_paths.set_input_directory(saved[0])
        folder_paths.set_output_directory(saved[1])
        folder_paths.folder_names_and_paths["loras"] = saved[2]
        folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture(scope="module")
def runs(runtime_dirs, object_info):
    """Run every workflow this ComfyUI runs once (train workflows first: the generate ones load
    their files)."""
    from comfy_runtime import comfyui_version, run_prompt

    results = {}
    runnable = [name for name in NAMES if comfyui_version() in (workflow_runtimes(name) or [comfyui_version()])]
    for name in sorted(runnable, key=lambda n: n not in TRAIN_WORKFLOWS):
        prompt, family = tiny_prompt(load_workflow(WORKFLOW_DIR / f"{name}.json"), object_info)
        executor, server = run_prompt(prompt)
        results[name] = {"prompt": prompt, "family": family, "executor": executor, "server": server}
    return results


def _saved_images(run: dict) -> dict[str, torch.Tensor]:
    """The IMAGE tensor each SaveImage node received, by node id."""
    out = {}
    for node_id, node in run["prompt"].items():
        if node["class_type"] == "SaveImage":
            source, slot = node["inputs"]["images"]
            entry = comfy_compat.cached_output(run["executor"], source)
            out[node_id] = torch.cat(list(entry.outputs[slot]))
    return out


def _error_report(run: dict) -> str:
    return json.dumps([m for m in run["server"].messages if m[0] == "execution_error"], default=str)[:4000]


@pytest.mark.comfy
@pytest.mark.server
@pytest.mark.parametrize("name", NAME_PARAMS)
def test_workflow_runs_and_saves_images(runs, runtime_dirs, name):
    run = runs[name]
    assert run["executor"].success, _error_report(run)
    images = _saved_images(run)
    assert len(images) == 1
    batch = next(iter(images.values()))
    prompts = sum(1 for n in run["prompt"].values() if n["class_type"] in ("KSampler", "SamplerCustomAdvanced"))
    if "vs" in name:  # one grid: rows of LoRA | T-LoRA with 16 px white gaps
        assert batch.shape == (1, 3 * TINY_SIZE + 2 * 16, 2 * TINY_SIZE + 16, 3)
    else:
        assert batch.shape == (prompts, TINY_SIZE, TINY_SIZE, 3)
    assert torch.isfinite(batch).all() and batch.min() >= 0 and batch.max() <= 1
    assert batch.std() > 1e-3, "the images are flat"
    outputs = run["executor"].history_result["outputs"]
    files = [image["filename"] for node in outputs.values() for image in node.get("images", [])
             if image.get("type") == "output"]
    assert len(files) == batch.shape[0]
    for file_name in files:
        found = list(runtime_dirs["output"].rglob(file_name))
        assert len(found) == 1 and Image.open(found[0]).size == (batch.shape[2], batch.shape[1])


@pytest.mark.comfy
@pytest.mark.server
@pytest.mark.parametrize("name", TRAIN_PARAMS)
def test_train_workflows_save_their_files(runs, runtime_dirs, name):
    run = runs[name]
    assert run["executor"].success, _error_report(run)
    for node in (n for n in run["prompt"].values() if n["class_type"] == "TLoRATrain"):
        final = runtime_dirs["loras"] / f"{node['inputs']['file_name']}.safetensors"
        assert final.is_file()
        if node["inputs"]["save_every"]:
            assert final.with_name(f"{final.stem}_step{SAVE_EVERY:05d}.safetensors").is_file()


@pytest.mark.comfy
@pytest.mark.server
def test_comparison_differs_only_in_method(runs):
    """Same seeds per row, different methods per column, and the two columns differ."""
    run = runs["tlora_sdxl_lora_vs_tlora"]
    assert run["executor"].success, _error_report(run)
    trainers = {n["inputs"]["variant"]: n["inputs"] for n in run["prompt"].values() if n["class_type"] == "TLoRATrain"}
    assert sorted(trainers) == ["LoRA", "T-LoRA"]
    ignore = {"variant", "steps", "file_name"}
    assert {k: v for k, v in trainers["LoRA"].items() if k not in ignore} == {
        k: v for k, v in trainers["T-LoRA"].items() if k not in ignore}
    seeds_by_prompt: dict[str, set] = {}
    for node in run["prompt"].values():
        if node["class_type"] == "KSampler":
            text = run["prompt"][node["inputs"]["positive"][0]]["inputs"]["text"]
            seeds_by_prompt.setdefault(text, set()).add(node["inputs"]["seed"])
    assert len(seeds_by_prompt) == 3 and all(len(seeds) == 1 for seeds in seeds_by_prompt.values())
    grid = next(iter(_saved_images(run).values()))[0]
    left, right = grid[:, :TINY_SIZE], grid[:, TINY_SIZE + 16:]
    assert (left - right).abs().mean() > 1e-4, "LoRA and T-LoRA columns are identical"


@pytest.mark.comfy
@pytest.mark.server
def test_qwen_image_workflow_trains_on_its_vaes_5d_latents(runs, runtime_dirs):
    """The Qwen-Image graph ran on the tiny Qwen-Image model: its VAE's (B, 16, 1, h, w) latents
    went into the trainer and the saved file is labelled Qwen-Image."""
    from safetensors import safe_open

    run = runs["tlora_qwen_image_train_and_generate"]
    assert run["executor"].success, _error_report(run)
    assert run["family"] == "qwen_image"
    encode = next(i for i, n in run["prompt"].items() if n["class_type"] == "VAEEncode")
    latent = comfy_compat.cached_output(run["executor"], encode).outputs[0][0]["samples"]
    assert tuple(latent.shape) == (1, 16, 1, TINY_SIZE // 8, TINY_SIZE // 8)
    train = next(n for n in run["prompt"].values() if n["class_type"] == "TLoRATrain")
    with safe_open(str(runtime_dirs["loras"] / f"{train['inputs']['file_name']}.safetensors"), "pt") as f:
        assert f.metadata()["tlora.architecture"] == "qwen_image"


@pytest.mark.comfy
@pytest.mark.server
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_generate_workflow_uses_the_trained_file(runs, family):
    run = runs[f"tlora_{family}_generate"]
    assert run["executor"].success, _error_report(run)
    loader = next(n for n in run["prompt"].values() if n["class_type"] == "TLoRALoader")
    assert re.fullmatch(rf"tlora/sks_dog_{family}\.safetensors", loader["inputs"]["lora_name"])


@pytest.mark.comfy
@pytest.mark.server
def test_readme_documents_every_pack_node_input_and_picture(object_info):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    pack_nodes = [name for name, info in object_info.items() if info.get("category") == "T-LoRA"]
    assert sorted(pack_nodes) == ["TLoRALoader", "TLoRASchedulePreview", "TLoRATrain"]
    for name in pack_nodes:
        section = readme.split(f"(`{name}`)", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        for section_name in ("required", "optional"):
            for input_name in object_info[name]["input"].get(section_name, {}):
                assert f"| `{input_name}`" in section, f"README's {name} table lacks {input_name}"
    pictures = re.findall(r"(?:\]\(|src=\")(docs/images/[^)\"]+)", readme)
    assert len(pictures) >= 4
    for picture in pictures:
        assert (REPO / picture).is_file(), picture
