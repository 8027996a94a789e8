"""Every shipped workflow in ComfyUI's real web UI: headless Chromium (Debian) driven by playwright-core.

One module fixture installs the browser tooling (``scripts/setup_browser.sh``: Debian's chromium and
the pinned playwright-core, skipped when present), starts the real ComfyUI server with its frontend
package on 127.0.0.1, loads each workflow with ``app.loadGraphData`` and records what the UI made of
it (tests/browser/check_workflows.mjs). The server's models folders hold empty files with the
workflows' model names and its input folder the concept image, so the server's own validation of
the prompt the frontend builds can pass; the run then stops at the first model loader (the files
are empty), which is the expected end. Screenshots go to tests/artifacts/browser/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from workflow_tools import input_specs, load_workflow, runtime_marks, schema_outputs, to_api, widget_values

from comfy_runtime import REPO

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
NAMES = [path.stem for path in WORKFLOWS]
# Every workflow is loaded; the per-workflow checks of one a ComfyUI version cannot run (FLUX.2
# Klein on versions that do not load Klein) are deselected there (conftest).
NAME_PARAMS = [pytest.param(name, id=name, marks=runtime_marks(name)) for name in NAMES]
ARTIFACTS = REPO / "tests" / "artifacts" / "browser"
PACK_NODES = ("TLoRATrain", "TLoRALoader", "TLoRASchedulePreview")
# Which workflow each README close-up of a pack node is taken from.
CLOSEUPS = {"TLoRATrain": "tlora_sdxl_train_and_generate", "TLoRALoader": "tlora_sdxl_generate",
            "TLoRASchedulePreview": "tlora_sdxl_generate"}
LOADER_TYPES = {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader"}
# Where the server looks for each loader's files (the pack's nodes read the loras folder).
MODEL_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models",
                 "DualCLIPLoader": "text_encoders", "CLIPLoader": "text_encoders", "VAELoader": "vae"}
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
               "Comfy.Graph.CanvasInfo": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
VIEWPORT = (1920, 1200)
BROWSER_TIMEOUT = 300  # seconds for the whole page session (measured: well under a minute)

pytestmark = [pytest.mark.comfy, pytest.mark.server]


def _post(url: str, payload: dict, timeout: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _stage_files(base: Path) -> None:
    """The concept image and an empty file for every model name the workflows use."""
    (base / "input").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 128), (180, 120, 60)).save(base / "input" / "sks_dog.png")
    for path in WORKFLOWS:
        for node in load_workflow(path)["nodes"]:
            for value in node.get("widgets_values") or []:
                if isinstance(value, str) and value.endswith(".safetensors"):
                    target = base / "models" / MODEL_FOLDERS.get(node["type"], "loras") / value
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()


def _wait_idle(server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"the server queue did not empty in {timeout}s")


def _run_browser(server, job_path: Path) -> dict:
    command = ["node", str(REPO / "tests" / "browser" / "check_workflows.mjs"), str(job_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT,
                            stdin=subprocess.DEVNULL, cwd=REPO / "tests" / "browser")
    assert result.returncode == 0, f"browser script failed:\n{result.stderr[-4000:]}\n{server.log()[-3000:]}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    started = time.monotonic()
    setup = subprocess.run(["bash", str(REPO / "scripts" / "setup_browser.sh")], capture_output=True,
                           text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert setup.returncode == 0, f"scripts/setup_browser.sh failed:\n{setup.stderr[-4000:]}"
    from comfy_server import running_server

    base = tmp_path_factory.mktemp("browser_server")
    _stage_files(base)
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    with running_server(base) as server:
        # A fresh user profile opens the templates browser; a returning user's does not. Full
        # detail at every zoom and no minimap, so the screenshots show the nodes' widgets.
        status, _ = _post(server.url + "/settings", UI_SETTINGS)
        assert status == 200
        job = {"url": server.url, "chromium": "/usr/bin/chromium", "outdir": str(ARTIFACTS),
               "workflows": [{"name": path.stem, "path": str(path)} for path in WORKFLOWS],
               "closeups": CLOSEUPS, "width": VIEWPORT[0], "height": VIEWPORT[1], "canary": True}
        job_path = base / "job.json"
        job_path.write_text(json.dumps(job))
        report = _run_browser(server, job_path)
        object_info = server.get_json("/object_info")
        submitted = {}
        for entry in report["workflows"]:
            status, body = _post(server.url + "/prompt", {"prompt": entry["api_prompt"], "client_id": "tests"})
            history = {}
            if status == 200:
                _wait_idle(server)
                history = server.get_json(f"/history/{body['prompt_id']}").get(body["prompt_id"], {})
            submitted[entry["name"]] = (status, body, history)
    report["seconds"] = time.monotonic() - started
    (ARTIFACTS / "report.json").write_text(json.dumps(report, indent=1))  # for debugging a failure
    by_name = {entry["name"]: entry for entry in report["workflows"]}
    return {"report": report, "by_name": by_name, "object_info": object_info, "submitted": submitted}


def test_every_shipped_workflow_was_loaded(browser):
    assert NAMES, "no workflows shipped"
    assert sorted(browser["by_name"]) == NAMES
    # Bound from the brief: the browser check must finish within a few minutes.
    assert browser["report"]["seconds"] < 240, browser["report"]["seconds"]


def test_the_checks_see_a_missing_node_and_an_error_toast(browser):
    """The checks below look where this frontend reports faults: a node type nobody registers opens
    a dialog (1.32) or an error card (1.49), and an error toast is seen (both)."""
    canary = browser["report"]["canary"]
    assert [n["registered"] for n in canary["nodes"]] == [False]
    assert any(canary["type"] in text for text in canary["dialogs"]), canary["dialogs"]
    assert any("T-LoRA test canary" in text for text in canary["error_toasts"]), canary["error_toasts"]


@pytest.mark.parametrize("name", NAME_PARAMS)
def test_no_missing_nodes_or_error_dialogs(browser, name):
    entry = browser["by_name"][name]
    unregistered = [(n["id"], n["type"]) for n in entry["nodes"] if not n["registered"]]
    assert not unregistered, f"node types the UI does not know: {unregistered}"
    assert not [n["id"] for n in entry["nodes"] if n["has_errors"]]
    assert entry["dialogs"] == [], entry["dialogs"]
    assert entry["error_toasts"] == [], entry["error_toasts"]
    assert len(entry["nodes"]) == len(load_workflow(REPO / "workflows" / f"{name}.json")["nodes"])


def _slots(slots: list[dict], key: str) -> list[tuple]:
    return [(slot["name"], slot["type"], slot.get(key) or None) for slot in slots]


def _by_id(nodes: list[dict]) -> dict[str, dict]:
    """Nodes by id as a string: the 1.49 frontend reports live node ids as strings, 1.32 as numbers
    (and the API prompt's keys are strings on both)."""
    return {str(node["id"]): node for node in nodes}


def _expected_outputs(node: dict, info: dict | None) -> list[tuple]:
    """The output slots the frontend shows for a stored node: the stored ones, then those the
    server's schema declares beyond them (a newer ComfyUI declares outputs that a file saved against
    an older one lacks, e.g. 0.33's SaveImage / PreviewImage IMAGE; both frontends add them, unlinked)."""
    stored = _slots(node.get("outputs", []), "links")
    declared = schema_outputs(info) if info else []
    return stored + [(out_name, out_type, None) for out_name, out_type in declared[len(stored):]]


@pytest.mark.parametrize("name", NAME_PARAMS)
def test_ui_saves_the_file_back_unchanged(browser, name):
    """The file is what the frontend itself would save: same sockets, links and widget values.

    Compared by meaning: the 1.49 frontend leaves out an empty ``widgets_values``, and adds the
    outputs the server declares beyond the stored ones (see _expected_outputs)."""
    original = load_workflow(REPO / "workflows" / f"{name}.json")
    saved = _by_id(browser["by_name"][name]["serialized"]["nodes"])
    for node in original["nodes"]:
        again = saved[str(node["id"])]
        where = f"node {node['id']} ({node['type']})"
        assert again["type"] == node["type"], where
        assert (again.get("widgets_values") or []) == node["widgets_values"], where
        # The frontend grows a node to fit its widgets: equal sizes mean the stored layout is what shows.
        assert again["size"] == node["size"], where
        assert _slots(again.get("inputs", []), "link") == _slots(node.get("inputs", []), "link"), where
        info = browser["object_info"].get(node["type"])
        assert _slots(again.get("outputs", []), "links") == _expected_outputs(node, info), where
    assert sorted(map(tuple, browser["by_name"][name]["serialized"]["links"])) == sorted(
        map(tuple, original["links"]))


@pytest.mark.parametrize("name", NAME_PARAMS)
def test_frontend_prompt_equals_converter(browser, name):
    """tests/workflow_tools.to_api builds the same API prompt as the real frontend's graphToPrompt."""
    info = browser["object_info"]
    ours = to_api(load_workflow(REPO / "workflows" / f"{name}.json"), info)
    theirs = browser["by_name"][name]["api_prompt"]

    def schema_inputs(node: dict) -> dict:
        # Frontend-only display widgets (e.g. Preview as Text's "preview") are sent too; the server
        # reads only the inputs in the node's schema, so only those are compared.
        names = {spec.name for spec in input_specs(info[node["class_type"]])}
        return {key: value for key, value in node["inputs"].items() if key in names}

    assert {k: (v["class_type"], v["inputs"]) for k, v in ours.items()} == {
        k: (v["class_type"], schema_inputs(v)) for k, v in theirs.items()}


@pytest.mark.parametrize("name", NAME_PARAMS)
def test_pack_nodes_render_with_their_widgets(browser, name):
    info = browser["object_info"]
    pack_nodes = [n for n in browser["by_name"][name]["nodes"] if n["type"] in PACK_NODES]
    assert pack_nodes, f"{name} uses none of the pack's nodes"
    original = _by_id(load_workflow(REPO / "workflows" / f"{name}.json")["nodes"])
    for node in pack_nodes:
        expected = [spec.name for spec in input_specs(info[node["type"]]) if spec.is_widget]
        shown = {w["name"]: w["value"] for w in node["widgets"]}
        assert set(expected) <= set(shown), f"{node['type']} lacks widgets {set(expected) - set(shown)}"
        stored = widget_values(original[str(node["id"])], info[node["type"]])
        assert {w: shown[w] for w in expected} == stored, node["type"]
        width, height = node["size"]
        assert width >= 200 and height >= 24 * len(expected), (node["type"], node["size"])


@pytest.mark.parametrize("name", NAME_PARAMS)
def test_server_accepts_the_prompt_the_ui_builds(browser, name):
    status, body, history = browser["submitted"][name]
    assert status == 200 and not body.get("node_errors"), body
    # The empty model files stop the run at a loader: proof that validation passed and ran.
    messages = dict(history["status"]["messages"])
    assert history["status"]["status_str"] == "error"
    assert messages["execution_error"]["node_type"] in LOADER_TYPES, messages["execution_error"]


@pytest.mark.parametrize("name", NAME_PARAMS)
def test_screenshot_saved(browser, name):
    path = Path(browser["by_name"][name]["screenshot"])
    with Image.open(path) as image:
        assert image.size == VIEWPORT
        colours = image.convert("RGB").resize((64, 40)).getcolors(64 * 40)
        assert colours is None or len(colours) > 20, "the screenshot is (nearly) blank"


def test_pack_node_closeups_saved(browser):
    shots = {k: v for entry in browser["report"]["workflows"] for k, v in entry["closeups"].items()}
    assert sorted(shots) == sorted(PACK_NODES)
    for path in shots.values():
        with Image.open(path) as image:
            assert image.size[0] >= 240 and image.size[1] >= 100


# The run the preview test queues from the page: a tiny SDXL trains 6 steps with a validation
# sample every 2 steps (decoded by the tiny VAE), each shown in the node's live preview.
PREVIEW_STEPS, PREVIEW_EVERY = 6, 2
TINY_NODES_SHIM = '''"""Test-only: the tiny-model nodes of the pack's tests, for a test server."""
import sys

sys.path.insert(0, {tests!r})
from tiny_nodes import comfy_entrypoint  # noqa: E402,F401
'''


def _validation_prompt() -> dict:
    return {
        "1": {"class_type": "TLoRATestTinyCheckpointLoader", "inputs": {"family": "sdxl"}},
        "2": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks dog"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "TLoRATrain", "inputs": {
            "model": ["1", 0], "latents": ["4", 0], "positive": ["2", 0], "variant": "auto", "rank": 4,
            "min_rank": -1, "schedule_power": 1.0, "steps": PREVIEW_STEPS, "learning_rate": 1e-2,
            "batch_size": 1, "seed": 0, "target_layers": "attention", "training_dtype": "auto",
            "gradient_checkpointing": True, "save_every": 0, "file_name": "tlora/preview_test",
            "resume_from": "none", "validation_every": PREVIEW_EVERY, "validation_positive": ["2", 0],
            "validation_vae": ["1", 2], "validation_steps": 2, "validation_cfg": 1.0}},
    }


def test_validation_previews_update_in_the_ui_during_a_run(tmp_path):
    """The real server and UI: the page receives the validation samples as node previews while
    the run trains (distinct images, each with the validation panel under the loss curve), before
    the run finishes."""
    setup = subprocess.run(["bash", str(REPO / "scripts" / "setup_browser.sh")], capture_output=True,
                           text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert setup.returncode == 0, f"scripts/setup_browser.sh failed:\n{setup.stderr[-4000:]}"
    from comfy_server import running_server

    shim = tmp_path / "tiny_nodes_shim"
    shim.mkdir()
    (shim / "__init__.py").write_text(TINY_NODES_SHIM.format(tests=str(REPO / "tests")))
    base = tmp_path / "server"
    with running_server(base, extra_custom_nodes={"tlora_test_tiny_nodes": shim}) as server:
        job = {"url": server.url, "chromium": "/usr/bin/chromium", "prompt": _validation_prompt(),
               "timeout_ms": 240000}
        job_path = tmp_path / "job.json"
        job_path.write_text(json.dumps(job))
        command = ["node", str(REPO / "tests" / "browser" / "watch_previews.mjs"), str(job_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO / "tests" / "browser")
        assert result.returncode == 0, f"browser script failed:\n{result.stderr[-4000:]}\n{server.log()[-3000:]}"
        events = json.loads(result.stdout)["events"]
        log = server.log()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "validation_previews.json").write_text(json.dumps(events, indent=1))  # for debugging
    done = [i for i, e in enumerate(events) if e["kind"] == "done"]
    assert done and events[done[0]]["status"] == "execution_success", (events, log[-3000:])
    during = events[:done[0]]
    # The loss curve alone is wider than high (512 x 320); a validation preview has the newest
    # sample (square here) under it, so it is higher than wide.
    validation = [e for e in during if e["kind"] == "preview" and e["height"] > e["width"]]
    assert len({e["sha"] for e in validation}) >= 2, during
    # The node's own output (the grid shown on it) comes after the previews, before the end.
    executed = [i for i, e in enumerate(during) if e["kind"] == "executed" and e["node"] == "5"]
    assert executed and executed[0] > during.index(validation[1])
    assert (base / "models" / "loras" / "tlora" / f"preview_test_step{PREVIEW_STEPS:05d}.png").is_file()
