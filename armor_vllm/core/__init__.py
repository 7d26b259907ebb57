"""The core of armor-vllm: what an ARMOR checkpoint means, shared by every side.

The maths (``factorization``, ``group_solver``), the format of one layer and of the config
(``format``, with the one layer reader ``decode_layer``), directory I/O (``checkpoint``), the
header-only directory check (``validate``) and a directory read back as dense weights (``reader``).
Imports only torch, safetensors and compressed-tensors: never vLLM, never transformers
(``tests/core/test_imports.py``)."""
