"""bench/gpu_check.py's logic at tiny size on the CPU (the GPU run itself needs a CUDA device)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from comfy_runtime import REPO, comfyui_version

pytestmark = pytest.mark.comfy
STEPS = 3
GIB = 2 ** 30


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def _recipes() -> dict:
    saved = list(sys.path)   # train_memory puts the repository first on import
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import train_memory
    finally:
        sys.path[:] = saved
    return train_memory.RECIPES


def test_gpu_check_tiny_runs_every_section_and_writes_its_report(comfy, tmp_path, capsys):
    import comfy.model_management as mm
    from comfyui_tlora.training.prepare import TRAINING_FLAGS
    from comfyui_tlora.training.targets import find_targets

    import comfy_runtime

    out = tmp_path / "gpu_check.json"
    script = _script()
    report = script.main(["--tiny", "--steps", str(STEPS), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "family" and [line.split()[0] for line in table[1:3]] == ["sdxl", "flux"]
    assert table[3].split()[:2] == ["streaming", "run"]
    assert [line.split()[0] for line in table[4:-1]] == list(script.gpu_streaming.RUNS)
    assert table[-1].startswith("budget 480 s") and table[-1].endswith("dynamic VRAM off (CPU)")
    assert report["dynamic_vram"] == "off (CPU)"
    assert report["allocator"] == {"torch": None, "comfy_cuda_malloc": False}
    assert report["budget"]["skipped"] == [] and 0 < report["budget"]["used_s"] < 480
    present = {name: value for name, value in TRAINING_FLAGS.items() if hasattr(mm, name)}
    old_comfy = comfyui_version().startswith("0.3.")
    recipes = _recipes()
    for family, r in report["families"].items():
        assert {"setup", "train", "comfy_trainer", "loader_vs_stock", "loader", "train_on_dynamic_clone"} <= set(r)
        assert r["setup"]["status"] == "ran" and r["setup"]["dynamic_patcher"] is False   # no dynamic patcher on a CPU
        train = r["train"]
        assert train["status"] == "ran", train
        variant, rank, _, tokens = recipes[family]
        for run in ("dynamic", "non_dynamic"):
            t = train[run]
            assert t["flags_seen"] == present and t["flags_constant"]
            assert t["s_per_step"] > 0 and t["steps_timed"] == STEPS - 1 and t["wall_s"] > t["s_per_step"]
            assert t["variant"] == variant and t["rank"] == 8 and t["peak_allocated_gib"] is None   # CUDA only
            assert t["device_used_at_steps_max_gib"] is None
        # Both loads are ordinary patchers of the same seeded weights here: exactly equal.
        assert train["adapter_max_diff"] == 0.0
        model = train["memory_model"]
        assert (model["variant"], model["rank"], model["tokens"]) == (variant, rank, tokens)
        assert model["peak_gib"] > model["peak_without_context_gib"] > 0.5
        assert model["measured_peak_allocated_gib"] is None and model["measured/model"] is None

        comfy_run = r["comfy_trainer"]
        assert comfy_run["status"] == "ran", comfy_run
        assert comfy_run["s_per_step"] > 0 and comfy_run["steps_timed"] == STEPS - 1
        assert comfy_run["flags_seen"] == present and comfy_run["rank"] == train["dynamic"]["rank"]
        assert comfy_run["comfy/ours"]["s_per_step"] == comfy_run["s_per_step"] / train["dynamic"]["s_per_step"]
        if family == "flux" and old_comfy:
            # ComfyUI 0.3.75's trainer cannot train FLUX on some layers only (its checkpointing
            # recomputes different tensors): the check says so and runs it as shipped instead.
            assert comfy_run["layers"] == "all" and comfy_run["targets_error"].startswith("CheckpointError")
        else:
            model_patcher = comfy_runtime.build_model(family)
            targets = find_targets(model_patcher.model.diffusion_model, family)
            assert comfy_run["layers"] == "targets"
            assert comfy_run["adapters"]["kept"] == len({t.module for t in targets})
            assert comfy_run["adapters"]["dropped"] > 0

        stock = r["loader_vs_stock"]
        assert stock["status"] == "ran" and stock["rank"] == 8 and stock["min_rank"] == 4
        # The trained file where it is a T-LoRA of that rank (SDXL's recipe), else an initialisation.
        assert stock["adapter"] == {"sdxl": "trained", "flux": "initialisation"}[family]
        assert set(stock["all_s"]) == {f"{load}:{kind}" for load in ("dynamic", "non_dynamic")
                                       for kind in ("tlora", "stock")}
        assert all(len(v) == 2 and min(v) > 0 for v in stock["all_s"].values())
        for load in ("dynamic", "non_dynamic"):
            assert stock[load]["dynamic_patcher"] is False
            assert stock[load]["tlora_s"] == min(stock["all_s"][f"{load}:tlora"])
            assert stock[load]["tlora/stock"] == stock[load]["tlora_s"] / stock[load]["stock_s"]

        assert r["loader"]["status"] == "ran" and r["loader"]["latent_max_diff"] == 0.0
        assert r["loader"]["dynamic_s"] > 0 and r["loader"]["non_dynamic_s"] > 0
        assert r["train_on_dynamic_clone"] == {"status": "ran", "ran": True, "adapter_max_diff": 0.0,
                                               "seconds": r["train_on_dynamic_clone"]["seconds"]}
    _check_streaming(report["streaming"], script.gpu_streaming, present, old_comfy)


def _check_streaming(s: dict, streaming, present: dict, old_comfy: bool) -> None:
    """The streaming part's figures on the CPU, where a budget is the trainer's cap."""
    import quantized_models

    setup = s["setup"]
    assert setup["status"] == "ran", setup
    assert s["how"] == streaming.HOW and "counted" in s["how"]["streamed_per_step_gib"]
    assert 22 < setup["full_flux_weights_gib"] < 22.5 and 1 < setup["full_flux_working_set_gib"] < 8
    f = setup["fraction_resident"]
    for b in streaming.BUDGETS_GIB:
        want = (b - setup["full_flux_working_set_gib"]) / setup["full_flux_weights_gib"]
        assert f[str(b)] == pytest.approx(want)
    assert 1 > f["24"] > f["16"] > f["12"] > 0
    gguf = quantized_models.gguf_pack_dir() is not None
    assert set(setup["model_gib"]) == {"float", "fp8_scaled", *(["gguf"] if gguf else [])}
    # fp32 float base; fp8 and Q8_0 hold the Linear weights in about a byte a value.
    assert all(setup["model_gib"][b] < setup["model_gib"]["float"] / 2 for b in setup["model_gib"] if b != "float")
    assert setup["bf16_weights_gib"] == pytest.approx(setup["model_gib"]["float"] / 2)

    assert set(s["budgets"]) == set(setup["model_gib"])
    for base, budgets in s["budgets"].items():   # from each base's full load: W + f * M
        assert budgets["working_set_gib"] == s[streaming.FULL_LOAD[base]]["trainer_working_set_gib"] > 0
        for b in streaming.BUDGETS_GIB:
            want = budgets["working_set_gib"] + f[str(b)] * setup["bf16_weights_gib"]
            assert budgets["bytes"][str(b)] / GIB == pytest.approx(want)

    for name, run in streaming.RUNS.items():
        r = s[name]
        if run.base == "gguf" and not gguf:
            assert r["status"] == "skipped" and "ComfyUI-GGUF" in r["note"]
            continue
        assert r["status"] == "ran", (name, r)
        assert r["kind"] == ("floor" if run.floor else "tlora") and r["base"] == run.base
        assert r["s_per_step"] > 0 and r["steps_timed"] == STEPS - 1 and r["loads"] == 1
        assert r["flags_seen"] == present and r["flags_constant"]
        assert r["peak_allocated_gib"] is None and r["peak/budget"] is None and r["ballast_gib"] == 0
        assert r["measured_working_set_gib"] is None and "automatic" not in r   # no retry on a CPU
        # training.memory's estimate for this run's load beside what the trainer asked before it.
        assert r["memory_model_working_set_gib"] > 0 and r["trainer_working_set_gib"] > 0
        # Casts land in ComfyUI's reused buffers only on a GPU (0.3.75 has none).
        assert r["cast_buffer_calls"] == (None if old_comfy else 0)
        per_step = r["streamed_per_step_gib"]
        assert per_step["counted"] == per_step["expected"]
        if run.budget is None:
            assert r["budget_gib"] is None and r["budget_by"] is None and r["max_vram_gb"] == 0
            assert r["streamed_layers"] == 0 and per_step["counted"] == 0
        else:
            assert r["budget_by"] == "max_vram_gb"
            assert r["budget_gib"] == r["max_vram_gb"] == s["budgets"][run.base]["bytes"][str(run.budget)] / GIB
            assert 0 < r["streamed_layers"] < r["layers"] and r["resident_gib"] > 0
            # Streamed layers run in forward and again in the recomputation (checkpointed blocks)
            # or once (outside the blocks): between once and twice the streamed bytes per step.
            assert r["streamed_gib"] < per_step["counted"] <= 2 * r["streamed_gib"]
            load = s["floor_full" if run.floor else streaming.FULL_LOAD[run.base]]
            assert r["resident_gib"] + r["streamed_gib"] == pytest.approx(load["resident_gib"])
            assert r["s/step vs full load"] == r["s_per_step"] / load["s_per_step"]
        if run.compare is not None:
            # Streamed, reused buffers or a second run: the same adapters bit for bit on a CPU.
            assert r["adapters_vs"]["run"] == run.compare and r["adapters_vs"]["max_diff"] == 0.0
            assert r["adapters_vs"].get("within_full_vs_full_baseline", True) is True
        if run.floor:
            pair = s[run.pair]
            assert r["tlora/floor"] == pair["s_per_step"] / r["s_per_step"]
            assert (r["resident_gib"], r["streamed_gib"]) == (pair["resident_gib"], pair["streamed_gib"])
    assert s["baseline_adapter_max_diff"] == 0.0
    streamed = [s[f"budget_{b}"]["streamed_gib"] for b in streaming.BUDGETS_GIB]
    assert streamed == sorted(streamed) and len(set(streamed)) == len(streamed)   # smaller budget, more streamed


def test_gpu_check_budget_guard_skips_what_does_not_fit(comfy, tmp_path, capsys):
    script = _script()
    budget = script.Budget(100.0)
    record: dict = {}
    budget.taken["slow"] = 1000.0   # took longer on the previous family than what is left
    assert budget.run(record, "flux", "slow", lambda: pytest.fail("must not run")) is None
    assert record["slow"]["status"] == "skipped" and "1000 s" in record["slow"]["note"]
    assert budget.run(record, "flux", "quick", lambda: {"value": 1})["value"] == 1
    assert record["quick"]["status"] == "ran" and budget.taken["quick"] == record["quick"]["seconds"]
    assert budget.run(record, "flux", "broken", lambda: 1 / 0)["status"] == "failed"
    assert record["broken"]["error"].startswith("ZeroDivisionError") and budget.skipped == ["flux.slow"]
    # The first family's sections have no previous time: a GPU run gives each a floor estimate.
    guarded = script.Budget(30.0, first_estimate_s=60.0)
    assert guarded.run(record, "sdxl", "train", lambda: pytest.fail("must not run")) is None
    assert "a first section is given 60 s" in record["train"]["note"] and guarded.skipped == ["sdxl.train"]

    # A caller's estimate, and time kept back for a later part.
    kept = script.Budget(100.0)
    kept.reserved_s = 95.0
    assert kept.run(record, "flux", "train", lambda: pytest.fail("must not run"), estimate_s=10.0) is None
    assert "s kept for a later part" in record["train"]["note"] and "given 10 s" in record["train"]["note"]
    kept.reserved_s = 0.0
    assert kept.run(record, "flux", "train", lambda: {}, estimate_s=10.0)["status"] == "ran"

    out = tmp_path / "none.json"
    report = script.main(["--tiny", "--family", "sdxl", "--budget-s", "0", "--out", str(out)])
    assert report["budget"]["skipped"] == ["sdxl.setup", "streaming.setup"]
    assert report["families"]["sdxl"]["setup"]["status"] == "skipped"
    assert set(report["streaming"]) == {"how", "setup"}
    assert report["streaming"]["setup"]["status"] == "skipped"
    assert json.loads(out.read_text())["budget"]["skipped"] == ["sdxl.setup", "streaming.setup"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-1] == ",".join(("setup", *script.SECTIONS))
    assert lines[2].startswith("streaming setup skipped: skipped: the 0 s budget has 0 s left") and len(lines) == 4


def test_threaded_gguf_quantize_writes_the_same_blocks(comfy):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    streaming = _script().gpu_streaming
    data = np.random.default_rng(0).standard_normal((37, 96)).astype(np.float32)
    for qtype in ("Q8_0", "Q4_0", "BF16"):
        want = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
        with streaming.threaded_gguf_quantize(threads=4):
            got = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
        assert got.shape == want.shape and np.array_equal(got, want), qtype
    assert gguf.quants.quantize is not None and "threaded" not in gguf.quants.quantize.__qualname__



def test_a_budget_run_out_of_memory_is_retried_leaving_the_memory_models_working_set_free(comfy):
    import train_helpers as th
    from comfyui_tlora.training import prepare

    streaming = _script().gpu_streaming
    run = streaming.RUNS["budget_12"]
    error = RuntimeError("[ComfyUI saw ...] OutOfMemoryError: CUDA out of memory")
    assert streaming.retryable(error, 1, [{}])
    assert not streaming.retryable(error, None, [{}]) and not streaming.retryable(error, 1, [])
    assert not streaming.retryable(RuntimeError("[...] ValueError: x"), 1, [{}])

    model, latents, positive = th.node_inputs("flux")
    setting = {"variant": "vanilla", "rank": 4, "min_rank": 2, "compute": "auto", "compute_dtype": torch.float32,
               "latent_shape": tuple(latents["samples"].shape), "context_tokens": positive[0][0].shape[1]}
    weights = sum(p.nbytes for p in model.model.diffusion_model.parameters())
    streaming.one_run(model, streaming.RUNS["full"], latents, positive, setting, 2, None, loads=(loads := []))
    asked = loads[0]["plan"].memory_required   # what the trainer asks ComfyUI for
    estimate = asked + weights // 4             # training.memory's working set, larger
    room = estimate + weights // 2
    load = {"estimate": estimate, "plan": prepare.LoadPlan(asked)}
    record = streaming.retry_capped(model, run, latents, positive, setting, 2, room, 0, load, str(error))
    assert record["automatic"] == {"status": "failed", "error": str(error)}
    # The cap leaves training.memory's working set free beside half the weights.
    assert record["max_vram_gb"] * GIB == room - (estimate - asked)
    assert 0 < record["streamed_layers"] < record["layers"] and record["resident_gib"] * GIB <= weights // 2
    with pytest.raises(RuntimeError, match="OutOfMemoryError"):   # no estimate: the failure stands
        streaming.retry_capped(model, run, latents, positive, setting, 2, room, 0, {**load, "estimate": None},
                               str(error))
