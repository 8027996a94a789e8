"""ComfyUI loads the pack: in-process through nodes.load_custom_node, and in a real main.py server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from comfy_runtime import REPO, import_pack


def expected_node_ids() -> set[str]:
    pack = import_pack()
    extension = asyncio.run(pack.comfy_entrypoint())
    return {node.GET_SCHEMA().node_id for node in asyncio.run(extension.get_node_list())}


def test_tlora_core_imports_without_comfyui(tmp_path):
    # A fresh interpreter with only the repository on its path: no ComfyUI anywhere.
    code = ("import sys, importlib.util\n"
            "assert importlib.util.find_spec('comfy') is None, 'ComfyUI unexpectedly importable'\n"
            "import tlora_core.schedule, tlora_core.adapter, tlora_core.apply, tlora_core.weights\n"
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules)\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.comfy
def test_load_custom_node_registers_every_node(comfy, caplog):
    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
    assert ok is True
    ids = expected_node_ids()
    assert {"TLoRALoader", "TLoRATrain"} <= ids
    assert ids <= set(nodes.NODE_CLASS_MAPPINGS)
    for node_id in ids - before:
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.category == "T-LoRA"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == schema.display_name
    assert "Error while calling comfy_entrypoint" not in caplog.text


@pytest.mark.comfy
def test_every_input_and_output_has_a_tooltip(comfy):
    from comfy_runtime import init_nodes

    init_nodes()
    import nodes

    for node_id in expected_node_ids():
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), f"{node_id} has an output without a tooltip"


@pytest.mark.comfy
@pytest.mark.server
def test_server_lists_the_pack_nodes(comfy, tmp_path):
    from comfy_server import running_server

    with running_server(tmp_path) as server:
        info = server.get_json("/object_info")
        log = server.log()
    missing = expected_node_ids() - set(info)
    assert not missing, f"/object_info lacks {missing}"
    assert info["TLoRALoader"]["category"] == "T-LoRA"
    pack_lines = [line for line in log.splitlines() if "custom_nodes/tlora-nodes" in line]
    assert pack_lines, f"the server never loaded the pack:\n{log[-3000:]}"
    assert not [line for line in pack_lines if "IMPORT FAILED" in line], pack_lines
    assert "Error while calling comfy_entrypoint" not in log
