"""bench/bench_floor.py's harness on the tiny SDXL (its timings are the bench's, not a test's)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from comfy_runtime import REPO

pytestmark = pytest.mark.comfy


def _script():
    spec = importlib.util.spec_from_file_location("bench_floor", REPO / "bench" / "bench_floor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    saved = list(sys.path)   # the script puts the repository first: its nodes/ would shadow ComfyUI's
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_floor_bench_times_every_setting_and_streams_about_half_the_targets(comfy, tmp_path):
    bench = _script()
    out = tmp_path / "bench_floor.json"
    report = bench.main(["--tiny", "--rounds", "2", "--steps", "3", "--latent", "8", "--out", str(out)])
    assert set(report["settings"]) == {"floor", "floor:checkpointed", "tlora:full", "tlora:checkpointed",
                                       "tlora:streamed"}
    assert all(s["step_cpu_s"] > 0 and s["range_cpu_s"][0] <= s["step_cpu_s"] <= s["range_cpu_s"][1]
               for s in report["settings"].values())
    for pair in bench.PAIRS.items():
        ratio = report["ratios"][" / ".join(pair)]
        assert ratio["range"][0] <= ratio["median"] <= ratio["range"][1] and ratio["median"] > 0
    stream = report["stream"]
    assert abs(stream["streamed_targets"] / stream["targets"] - bench.STREAM_TARGET) <= 0.25, stream
    assert report["tlora"]["rank"] == bench.TINY_RANK and bench.TLORA["rank"] == 64   # no global change
    written = json.loads(out.read_text())
    assert written["ratios"].keys() == report["ratios"].keys()
