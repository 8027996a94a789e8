"""A small builder for UI-format ComfyUI workflows (version 0.4), driven by the node schemas.

Each node is created from its ``/object_info`` entry, so input order, widget order, the frontend's
extra widget values (seed "control after generate", the image upload button) and every default
come from the schema; a workflow only states the values it changes. Unknown node types, unknown
widget names and links between mismatched types raise at build time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from workflow_tools import UPLOAD_SLOT_TYPE, InputSpec, input_specs  # noqa: E402

SLOT_HEIGHT, WIDGET_HEIGHT, TITLE_HEIGHT = 20, 24, 30
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"


def _default(spec: InputSpec) -> Any:
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        if not spec.choices:
            raise ValueError(f"combo {spec.name!r} has no choices and no default: give a value")
        return spec.choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec.type]


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    info: dict | None
    values: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    width: float = 320
    height: float | None = None
    color: str | None = None
    bgcolor: str | None = None
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    widgets_values: list[Any] = field(default_factory=list)

    def output_index(self, output: str | int) -> int:
        if isinstance(output, int):
            return output
        names = [slot["name"] for slot in self.outputs]
        if output in names:
            return names.index(output)
        types = [slot["type"] for slot in self.outputs]
        if types.count(output) == 1:
            return types.index(output)
        raise KeyError(f"{self.type} has no output {output!r} (outputs: {names})")

    def input_index(self, name: str) -> int:
        for index, slot in enumerate(self.inputs):
            if slot["name"] == name:
                return index
        raise KeyError(f"{self.type} has no input {name!r}")


class Graph:
    """Collects nodes, links and groups and serialises them the way the frontend saves a workflow."""

    def __init__(self, object_info: dict[str, dict]) -> None:
        self.object_info = object_info
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, node_type: str, pos: tuple[float, float], values: dict[str, Any] | None = None,
             title: str | None = None, width: float = 320, **style: Any) -> Node:
        info = self.object_info.get(node_type)
        if info is None:
            raise KeyError(f"unknown node type {node_type!r}")
        node = Node(len(self.nodes) + 1, node_type, pos, info, dict(values or {}), title, width, **style)
        specs = input_specs(info)
        unknown = set(node.values) - {spec.name for spec in specs if spec.is_widget}
        if unknown:
            raise KeyError(f"{node_type} has no widget {sorted(unknown)}")
        sockets = [spec for spec in specs if not spec.is_widget]
        widgets = [spec for spec in specs if spec.is_widget]
        node.inputs = [{"name": spec.name, "type": spec.type, "link": None} for spec in sockets]
        for spec in widgets:
            node.inputs.append({"name": spec.name, "type": spec.type, "widget": {"name": spec.name},
                                "link": None})
            node.widgets_values.append(node.values[spec.name] if spec.name in node.values else _default(spec))
            for extra in spec.extra_values:
                if extra == "control":
                    node.widgets_values.append("fixed")  # same seed every run: reproducible examples
                else:
                    node.inputs.append({"name": "upload", "type": UPLOAD_SLOT_TYPE,
                                        "widget": {"name": "upload"}, "link": None})
                    node.widgets_values.append("image")
        node.outputs = [{"name": name, "type": kind, "links": []}
                        for name, kind in zip(info.get("output_name", info["output"]), info["output"])]
        multiline = sum(1 for spec in widgets if spec.options.get("multiline"))
        rows = max(len(sockets), len(node.outputs))
        node.height = node.height or (TITLE_HEIGHT + rows * SLOT_HEIGHT + len(widgets) * WIDGET_HEIGHT
                                      + multiline * 80 + 10)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos: tuple[float, float], width: float = 420, height: float = 240) -> Node:
        """A MarkdownNote (frontend-only node, never sent to the server)."""
        node = Node(len(self.nodes) + 1, "MarkdownNote", pos, None, title="Read me", width=width,
                    height=height, color=NOTE_COLOR, bgcolor=NOTE_BGCOLOR)
        node.widgets_values = [text]
        self.nodes.append(node)
        return node

    def link(self, source: Node, output: str | int, target: Node, input_name: str) -> None:
        out_index, in_index = source.output_index(output), target.input_index(input_name)
        out_slot, in_slot = source.outputs[out_index], target.inputs[in_index]
        if in_slot["link"] is not None:
            raise ValueError(f"{target.type}.{input_name} is already connected")
        if in_slot["type"] != out_slot["type"] and "*" not in (in_slot["type"], out_slot["type"]):
            raise TypeError(f"{source.type}.{out_slot['name']} ({out_slot['type']}) cannot feed "
                            f"{target.type}.{input_name} ({in_slot['type']})")
        link_id = len(self.links) + 1
        self.links.append([link_id, source.id, out_index, target.id, in_index, out_slot["type"]])
        out_slot["links"].append(link_id)
        in_slot["link"] = link_id

    def group(self, title: str, members: list[Node], color: str = "#3f789e", padding: float = 30) -> None:
        left = min(node.pos[0] for node in members) - padding
        top = min(node.pos[1] for node in members) - padding - 40
        right = max(node.pos[0] + node.width for node in members) + padding
        bottom = max(node.pos[1] + (node.height or 0) for node in members) + padding
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left,
                            bottom - top], "color": color, "font_size": 24, "flags": {}})

    def _orders(self) -> dict[int, int]:
        """Topological execution order, as the frontend stores it in ``order``."""
        parents = {node.id: set() for node in self.nodes}
        for _, source, _, target, _, _ in self.links:
            parents[target].add(source)
        order: dict[int, int] = {}
        while len(order) < len(self.nodes):
            ready = [nid for nid in parents if nid not in order and parents[nid] <= set(order)]
            if not ready:
                raise ValueError("the graph has a cycle")
            for nid in sorted(ready):
                order[nid] = len(order)
        return order

    def build(self) -> dict:
        orders = self._orders()
        nodes = []
        for node in self.nodes:
            entry: dict[str, Any] = {"id": node.id, "type": node.type, "pos": list(node.pos),
                                     "size": [node.width, node.height], "flags": {},
                                     "order": orders[node.id], "mode": 0, "inputs": node.inputs,
                                     "outputs": [{**slot, "links": slot["links"] or None} for slot in node.outputs],
                                     "properties": {"Node name for S&R": node.type} if node.info else {},
                                     "widgets_values": node.widgets_values}
            if node.title:
                entry["title"] = node.title
            if node.color:
                entry["color"] = node.color
            if node.bgcolor:
                entry["bgcolor"] = node.bgcolor
            nodes.append(entry)
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": self.groups, "config": {}, "extra": {}, "version": 0.4}
