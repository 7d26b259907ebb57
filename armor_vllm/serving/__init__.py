"""The vLLM side: the ``armor`` quantization method (``config``), its linear and MoE methods, the
tensor-parallel slicing of checkpoint tensors, and the ``vllm.general_plugins`` entry point
(``plugin``). Only this side imports vLLM."""
