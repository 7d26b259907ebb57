"""vLLM general-plugin entry point (``vllm.general_plugins``): vLLM calls ``register`` in the API
server, engine and worker processes, which registers the ``armor`` quantization method."""


def register() -> None:
    import armor_vllm.serving.config  # noqa: F401  (the decorator registers the method)
