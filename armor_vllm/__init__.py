"""armor-vllm: compress a dense LLM with ARMOR into a 2:4 sparse model and serve it in vLLM.

Importing the package is cheap on purpose (no torch, vLLM or transformers): vLLM imports the plugin
entry point in every process, and the CUDA kernels must import on machines without our
dependencies. What it does on import: arrange that the ``armor`` quantizer is registered with
transformers as soon as transformers' model loading code is imported (at once if it already is), so
``AutoModelForCausalLM.from_pretrained(armor_dir)`` works after ``import armor_vllm``
(``armor_vllm.hf.quantizer``). ``armor_vllm.compress`` is the Python API of the offline pass.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# from_pretrained lives there; it imports transformers' quantizer registry first thing. (Hooking the
# registry itself is too early: registering imports modules that need transformers.PreTrainedModel.)
_HF_LOADER = "transformers.modeling_utils"


def _register_with_transformers() -> None:
    try:
        # Importing the module registers (at its end; if it is being imported right now, that import
        # registers when it finishes).
        importlib.import_module("armor_vllm.hf.quantizer")
    except Exception as exc:  # never break the importer; ARMOR checkpoints then fail loudly (the guard)
        warnings.warn(f"armor_vllm: could not register the 'armor' quantizer with transformers: {exc!r}", stacklevel=2)


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs the real loader of transformers' model loading code, then registers ours."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register_with_transformers()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._inner, name)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Waits for ``transformers.modeling_utils`` to be imported (once), then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != _HF_LOADER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


if _HF_LOADER in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenImported())


def __getattr__(name: str):
    if name == "compress":  # lazy: the offline pass imports torch and transformers
        from armor_vllm.api import compress

        return compress
    raise AttributeError(f"module 'armor_vllm' has no attribute {name!r}")
