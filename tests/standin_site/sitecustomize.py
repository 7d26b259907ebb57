"""On ``PYTHONPATH`` only for the vLLM tests that run the CUDA kernel class on CPU: puts the CPU
stand-ins of cuSPARSELt and CUTLASS (``standin``) in place in every Python process
that starts, so vLLM's engine and worker processes serve through them too."""

import standin

standin.install()
