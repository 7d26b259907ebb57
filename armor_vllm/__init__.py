"""armor-vllm: compress a dense LLM with ARMOR into a 2:4 sparse model and serve it in vLLM.

Importing the package is cheap on purpose (no torch, vLLM or transformers): vLLM imports the plugin
entry point in every process, and the CUDA kernels must import on machines without our
dependencies.
"""

__version__ = "0.1.0"
