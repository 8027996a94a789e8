"""Import-only stand-ins for ``torchvision`` and ``torchaudio`` in the CPU test runtimes.

PyPI's torchvision does not load beside the CPU torch these runtimes use, and no torchaudio exists
for it. ComfyUI imports both at module level in model families and nodes this pack does not use,
so ``import torchvision.ops`` / ``from torchaudio import functional`` must work; any real use (a
call) raises ImportError naming what was used. Installed by scripts/setup_runtime.sh as a
``sys.meta_path`` finder through a ``.pth`` file in the runtime's own venv only.
"""

import importlib.abc
import importlib.machinery
import sys
import types

STUBBED = ("torchvision", "torchaudio")


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} is not available in the T-LoRA CPU test runtime")

    def __mro_entries__(self, bases):
        # `class X(torchvision.something.Base)` at module level: give it a plain base.
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+tlora-stub"
        return module

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StubFinder())
