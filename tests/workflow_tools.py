"""UI-format workflows (what ComfyUI's frontend saves) checked against ``/object_info`` and converted
to API format (what ``/prompt`` and ``PromptExecutor`` run).

UI format, version 0.4: ``nodes`` each with ``id``, ``type``, ``inputs`` (sockets: name, type,
link id, and ``widget: {name}`` for a widget that also has a socket), ``outputs`` (name, type,
link ids) and ``widgets_values`` (one entry per widget, in input order: required then optional,
plus the frontend's extra entries: the "control after generate" value after a seed-like INT and
the upload button's value after an image-upload combo); ``links`` as
``[id, origin_id, origin_slot, target_id, target_slot, type]``.

``object_info`` is the dict the server's ``/object_info`` route returns, keyed by node type.
Nothing here imports ComfyUI, so the same functions serve the server test, the in-process run test
and ``scripts/make_workflows.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Node types that exist only in the frontend: never sent to the server.
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
# Combos listing model files: no weights ship, so only the value's form is checked.
MODEL_FILE_INPUTS = frozenset({"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2",
                               "vae_name", "lora_name"})
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".gguf")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
UPLOAD_SLOT_TYPE = "IMAGEUPLOAD"


def workflow_runtimes(name: str) -> tuple[str, ...] | None:
    """The ComfyUI versions that run the shipped workflow ``name`` (None: every supported one).
    The FLUX.2 Klein workflow runs where Klein loads (family_configs: the klein-4b real config)."""
    if "klein" not in name:
        return None
    import family_configs

    return family_configs.real_size_runtimes("flux2", "klein-4b")


def runtime_marks(name: str) -> list:
    """The pytest marks of a test of workflow ``name``: ``runtimes`` (conftest deselects the test on
    other versions) where only some ComfyUI versions run it."""
    import pytest

    versions = workflow_runtimes(name)
    return [pytest.mark.runtimes(*versions)] if versions else []


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "COMBO" for every combo, whatever its spelling in /object_info
    options: dict[str, Any]
    choices: tuple | None  # combo values
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def extra_values(self) -> list[str]:
        """Kinds of the frontend's extra widget values that follow this widget's own value."""
        extras = []
        control = self.options.get("control_after_generate")
        if self.type == "INT" and (control if control is not None else self.name in ("seed", "noise_seed")):
            extras.append("control")
        elif self.type == "COMBO" and control:
            extras.append("control")
        if self.type == "COMBO" and self.options.get("image_upload"):
            extras.append("upload")
        return extras


def load_workflow(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def input_specs(info: dict) -> list[InputSpec]:
    """A node's inputs from /object_info, in the order the frontend lays them out."""
    specs = []
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        entries = inputs.get(section, {})
        for name in order.get(section, list(entries)):
            raw = entries[name]
            kind, options = raw[0], (raw[1] if len(raw) > 1 else {}) or {}
            choices = None
            if isinstance(kind, list):
                kind, choices = "COMBO", tuple(kind)
            elif kind == "COMBO":
                choices = tuple(options.get("options", ()))
            specs.append(InputSpec(name, kind, options, choices, section == "optional"))
    return specs


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """The node's widget values by input name (the frontend's extra entries dropped)."""
    values = list(node.get("widgets_values") or [])
    named: dict[str, Any] = {}
    position = 0
    for spec in input_specs(info):
        if not spec.is_widget:
            continue
        if position >= len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {spec.name!r}")
        named[spec.name] = values[position]
        position += 1 + len(spec.extra_values)
    if position != len(values):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, "
                         f"the schema has {position}")
    return named


def schema_outputs(info: dict) -> list[tuple[str, str]]:
    """A node's declared outputs as ``(name, type)``, in slot order."""
    types = list(info.get("output", []))
    return list(zip(info.get("output_name") or types, types))


def _links_by_id(workflow: dict) -> dict[int, list]:
    return {link[0]: link for link in workflow.get("links", [])}


def _resolve_origin(workflow: dict, nodes: dict[int, dict], links: dict[int, list],
                    link_id: int) -> tuple[str, int]:
    """The real (non-Reroute) output feeding a link."""
    link = links[link_id]
    origin = nodes[link[1]]
    while origin["type"] == "Reroute":
        link = links[origin["inputs"][0]["link"]]
        origin = nodes[link[1]]
    if origin["type"] in VIRTUAL_NODE_TYPES:
        raise ValueError(f"link {link_id} starts at a {origin['type']} node, which this converter does not expand")
    return str(origin["id"]), int(link[2])


def to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI-format workflow into an API-format prompt ``{id: {class_type, inputs, _meta}}``."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = _links_by_id(workflow)
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            continue
        if node.get("mode", MODE_ALWAYS) != MODE_ALWAYS:
            raise ValueError(f"node {node['id']} has mode {node['mode']}: bypassed nodes are not supported")
        info = object_info[node["type"]]
        values = widget_values(node, info)
        linked = {slot["name"]: slot["link"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        inputs: dict[str, Any] = {}
        for spec in input_specs(info):
            if spec.name in linked:
                inputs[spec.name] = list(_resolve_origin(workflow, nodes, links, linked[spec.name]))
            elif spec.name in values:
                inputs[spec.name] = values[spec.name]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return prompt


def _value_errors(where: str, spec: InputSpec, value: Any) -> list[str]:
    options = spec.options
    if spec.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: {value!r} is not an INT"]
    elif spec.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return [f"{where}: {value!r} is not a finite FLOAT"]
    elif spec.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a BOOLEAN"]
    elif spec.type == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a STRING"]
    elif spec.type == "COMBO":
        if spec.choices and value in spec.choices:
            return []
        if spec.name in MODEL_FILE_INPUTS and isinstance(value, str) and value.endswith(MODEL_FILE_SUFFIXES):
            return []  # a model file the user provides; the server lists only files it has
        return [f"{where}: {value!r} is not one of {list(spec.choices or [])[:12]}"]
    if spec.type in ("INT", "FLOAT"):
        low, high = options.get("min"), options.get("max")
        if low is not None and value < low or high is not None and value > high:
            return [f"{where}: {value!r} outside [{low}, {high}]"]
    return []


def _widget_errors(node: dict, info: dict) -> list[str]:
    where = f"node {node['id']} ({node['type']})"
    values = list(node.get("widgets_values") or [])
    errors: list[str] = []
    position = 0
    for spec in input_specs(info):
        if not spec.is_widget:
            continue
        if position >= len(values):
            return errors + [f"{where}: missing widget value for {spec.name!r}"]
        errors += _value_errors(f"{where}.{spec.name}", spec, values[position])
        for offset, kind in enumerate(spec.extra_values, start=1):
            extra = values[position + offset] if position + offset < len(values) else None
            if kind == "control" and extra not in CONTROL_VALUES:
                errors.append(f"{where}.{spec.name}: control value {extra!r} not in {sorted(CONTROL_VALUES)}")
            if kind == "upload" and extra != "image":
                errors.append(f"{where}.{spec.name}: upload value {extra!r} is not 'image'")
        position += 1 + len(spec.extra_values)
    if position != len(values):
        errors.append(f"{where}: {len(values)} widget values, the schema has {position}")
    return errors


def _types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def _node_errors(node: dict, info: dict) -> list[str]:
    where = f"node {node['id']} ({node['type']})"
    errors = _widget_errors(node, info)
    specs = {spec.name: spec for spec in input_specs(info)}
    uploads = any("upload" in spec.extra_values for spec in specs.values())
    for slot in node.get("inputs", []):
        spec = specs.get(slot["name"])
        if uploads and slot["name"] == "upload" and slot.get("type") == UPLOAD_SLOT_TYPE:
            continue  # the frontend's upload button, saved as a widget slot
        if spec is None:
            errors.append(f"{where}: input {slot['name']!r} is not in the schema")
        elif slot.get("type") != spec.type:
            errors.append(f"{where}: input {slot['name']!r} has type {slot.get('type')!r}, schema {spec.type!r}")
        elif spec.is_widget and slot.get("widget", {}).get("name") != spec.name:
            errors.append(f"{where}: widget input {slot['name']!r} lacks widget.name")
    linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
    for spec in specs.values():
        if not spec.is_widget and not spec.optional and spec.name not in linked:
            errors.append(f"{where}: required input {spec.name!r} is not connected")
    saved = [(slot.get("name"), slot.get("type")) for slot in node.get("outputs", [])]
    declared = schema_outputs(info)
    # A file saved against an older ComfyUI lacks the outputs a newer one added at the end (0.33's
    # SaveImage / PreviewImage / PreviewAny): both frontends (1.32, 1.49) add the declared outputs a
    # file lacks when they load it. A saved output the schema does not declare, or declares with
    # another name or type, stays as saved (the 1.32 frontend keeps it): a socket the server lacks.
    if saved != declared[:len(saved)]:
        errors.append(f"{where}: outputs {saved} are not the start of the schema's {declared}")
    return errors


def _link_errors(workflow: dict, nodes: dict[int, dict]) -> list[str]:
    errors: list[str] = []
    for link in workflow.get("links", []):
        link_id, origin_id, origin_slot, target_id, target_slot, link_type = link
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            errors.append(f"link {link_id}: joins a missing node ({origin_id} -> {target_id})")
            continue
        outputs, inputs = origin.get("outputs", []), target.get("inputs", [])
        if not 0 <= origin_slot < len(outputs) or not 0 <= target_slot < len(inputs):
            errors.append(f"link {link_id}: slot out of range ({origin_slot} -> {target_slot})")
            continue
        out_slot, in_slot = outputs[origin_slot], inputs[target_slot]
        if link_id not in (out_slot.get("links") or []):
            errors.append(f"link {link_id}: not listed on node {origin_id} output {origin_slot}")
        if in_slot.get("link") != link_id:
            errors.append(f"link {link_id}: node {target_id} input {target_slot} holds {in_slot.get('link')}")
        if not (_types_match(out_slot["type"], link_type) and _types_match(link_type, in_slot["type"])):
            errors.append(f"link {link_id}: {origin['type']}.{out_slot['name']} ({out_slot['type']}) -> "
                          f"{target['type']}.{in_slot['name']} ({in_slot['type']}) via {link_type}")
    link_ids = {link[0] for link in workflow.get("links", [])}
    for node in nodes.values():
        held = [slot["link"] for slot in node.get("inputs", []) if slot.get("link") is not None]
        held += [i for slot in node.get("outputs", []) for i in (slot.get("links") or [])]
        errors += [f"node {node['id']}: refers to missing link {i}" for i in held if i not in link_ids]
    return errors


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Every problem that would stop the workflow loading or validating; empty when it is sound."""
    errors: list[str] = []
    if workflow.get("version") != 0.4:
        errors.append(f"version {workflow.get('version')!r}, expected 0.4")
    node_list, link_list = workflow.get("nodes", []), workflow.get("links", [])
    nodes = {node["id"]: node for node in node_list}
    if len(nodes) != len(node_list):
        errors.append("duplicate node ids")
    if len({link[0] for link in link_list}) != len(link_list):
        errors.append("duplicate link ids")
    if nodes and workflow.get("last_node_id", -1) < max(nodes):
        errors.append("last_node_id is below a node id")
    if link_list and workflow.get("last_link_id", -1) < max(link[0] for link in link_list):
        errors.append("last_link_id is below a link id")
    for node in node_list:
        if node["type"] in VIRTUAL_NODE_TYPES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            errors.append(f"node {node['id']}: unknown node type {node['type']!r}")
            continue
        errors += _node_errors(node, info)
    return errors + _link_errors(workflow, nodes)


def _widget_entries(node: dict, info: dict | None) -> dict[str, Any]:
    """The node's widget values by input name, the frontend's extra entries as ``name:kind``
    (e.g. ``seed:control`` = "fixed"); a frontend-only node's values by position."""
    values = list(node.get("widgets_values") or [])
    if info is None:
        return {f"#{index}": value for index, value in enumerate(values)}
    named = widget_values(node, info)  # raises when the count does not fit the schema
    position = 0
    entries: dict[str, Any] = {}
    for spec in input_specs(info):
        if not spec.is_widget:
            continue
        entries[spec.name] = named[spec.name]
        for offset, kind in enumerate(spec.extra_values, start=1):
            entries[f"{spec.name}:{kind}"] = values[position + offset]
        position += 1 + len(spec.extra_values)
    return entries


def workflow_meaning(workflow: dict, object_info: dict) -> dict[str, Any]:
    """What a UI-format workflow says, apart from how a frontend or generator serialises it.

    Per node (by id, as a string: the id is also the API prompt's key): type, title, mode, position,
    colours and widget values by input name (``object_info`` names them). Links by what they join,
    ``(origin id, output name, target id, input name, type)``, not by link id or slot index; the
    groups by title and box. Left out on purpose: the output slots nothing links (a newer ComfyUI
    declares outputs an older file lacks, and the frontend adds them), the sockets and sizes the
    schema implies (check_workflow and the browser test check those), empty vs absent
    ``widgets_values``, ``order``, ``properties`` and link ids.
    """
    nodes = {str(node["id"]): node for node in workflow.get("nodes", [])}
    described = {}
    for node_id, node in nodes.items():
        info = None if node["type"] in VIRTUAL_NODE_TYPES else object_info.get(node["type"])
        described[node_id] = {"type": node["type"], "title": node.get("title"),
                              "mode": node.get("mode", MODE_ALWAYS),
                              "pos": [float(v) for v in node.get("pos", [])],
                              "color": node.get("color"), "bgcolor": node.get("bgcolor"),
                              "widgets": _widget_entries(node, info)}
    links = []
    for _, origin_id, origin_slot, target_id, target_slot, link_type in workflow.get("links", []):
        origin, target = nodes[str(origin_id)], nodes[str(target_id)]
        links.append((str(origin_id), origin["outputs"][origin_slot]["name"], str(target_id),
                      target["inputs"][target_slot]["name"], link_type))
    groups = sorted((group.get("title"), tuple(float(v) for v in group.get("bounding", ())))
                    for group in workflow.get("groups", []))
    return {"nodes": described, "links": sorted(links), "groups": groups}


def meaning_differences(ours: dict, theirs: dict, object_info: dict) -> list[str]:
    """Where two workflows differ in meaning (see ``workflow_meaning``); empty when they agree."""
    a, b = workflow_meaning(ours, object_info), workflow_meaning(theirs, object_info)
    out = []
    for node_id in sorted(set(a["nodes"]) | set(b["nodes"]), key=lambda i: (len(i), i)):
        left, right = a["nodes"].get(node_id), b["nodes"].get(node_id)
        if left is None or right is None:
            out.append(f"node {node_id}: only in {'the second' if left is None else 'the first'}")
            continue
        for key in left:
            if left[key] != right[key]:
                out.append(f"node {node_id} ({left['type']}) {key}: {left[key]!r} != {right[key]!r}")
    links_a, links_b = set(a["links"]), set(b["links"])
    out += [f"link only in the first: {link}" for link in sorted(links_a - links_b)]
    out += [f"link only in the second: {link}" for link in sorted(links_b - links_a)]
    if a["groups"] != b["groups"]:
        out.append(f"groups: {a['groups']} != {b['groups']}")
    return out
