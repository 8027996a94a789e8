"""bench/gpu_check.py's logic at tiny size on the CPU (the GPU run itself needs a CUDA device)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from comfy_runtime import REPO

pytestmark = pytest.mark.comfy


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_runs_and_writes_its_report(comfy, tmp_path, capsys):
    import comfy.model_management as mm
    from comfyui_tlora.training.prepare import TRAINING_FLAGS

    out = tmp_path / "gpu_check.json"
    report = _script().main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "family" and [line.split()[0] for line in table[1:]] == ["sdxl", "flux"]
    present = {name: value for name, value in TRAINING_FLAGS.items() if hasattr(mm, name)}
    for family, r in report["families"].items():
        assert r["dynamic_patcher"] is False, family   # no dynamic patcher on a CPU
        for run in ("dynamic", "non_dynamic"):
            assert r["train"][run]["flags_seen"] == present and r["train"][run]["flags_constant"]
            assert r["train"][run]["s_per_step"] > 0
        # Both loads are ordinary patchers of the same seeded weights here: exactly equal.
        assert r["train"]["adapter_max_diff"] == 0.0
        assert r["train_on_dynamic_clone"] == {"ran": True, "adapter_max_diff": 0.0}
        assert r["loader"]["latent_max_diff"] == 0.0
