"""Where the offline pass runs ``method.compress``: in the driver process, or as Ray tasks.

Once a decoder layer's calibration statistics are collected, the groups of linears that share an
input (q/k/v, o, gate/up, down) are independent problems. ``RayExecutor`` submits one task per
group (method name and options, the group's float32 weights and its ``InputStats``) and gathers the
results in group order; the driver then encodes and saves the layer exactly as a single-process run
does. Layers still run one after the other (sequential order needs layer ``i`` compressed before
the statistics of ``i + 1``), so at most as many tasks run at once as the layer has groups (4 for a
Llama layer).

Every task sets torch's intra-op thread count to the driver's (BLAS results may depend on it),
so the checkpoint is byte for byte the one a single-process run writes; set ``OMP_NUM_THREADS`` for
the driver to choose it.

Local: ``python -m armor_vllm.offline ... --workers 4`` starts a private Ray instance with 4 worker
processes and shuts it down at the end.

Several machines (armor-vllm, with ``pip install 'armor-vllm[ray]'``, and the same torch on each)::

    ray start --head --port 6379                  # on the head node
    ray start --address HEAD_IP:6379              # on every other node
    python -m armor_vllm.offline --model M --output OUT --ray-address auto   # on the head node

The driver (statistics, encoding, the checkpoint) runs where the command runs; only ``compress``
runs on the cluster. Each task asks Ray for one CPU but uses the driver's thread count, and the
tasks are spread over the nodes, so use nodes alike (cores, torch build). If the cluster uses Ray
token authentication, every node and the driver need the head's token (``ray get-auth-token``).
"""

from __future__ import annotations

import time

import torch

from armor_vllm.offline.methods import CompressionMethod, InputStats, LayerResult, get_method

Job = tuple[dict[str, torch.Tensor], "InputStats | None"]
Outcome = tuple[dict[str, LayerResult], float]  # results by name, seconds spent in compress


def _timed_compress(method: CompressionMethod, weights, stats) -> Outcome:
    start = time.perf_counter()
    results = method.compress(weights, stats)
    return results, time.perf_counter() - start


def compress_task(
    method_name: str, block_size: int, seed: int, options: dict, weights, stats, num_threads: int
) -> Outcome:
    """One group, in a worker: rebuild the method from its registry name and options, run it with
    the driver's thread count."""
    torch.set_num_threads(num_threads)
    method = get_method(method_name)(block_size=block_size, seed=seed, **options)
    return _timed_compress(method, weights, stats)


class LocalExecutor:
    """Runs every group in this process, one after the other."""

    def compress_groups(self, method: CompressionMethod, jobs: list[Job]) -> list[Outcome]:
        return [_timed_compress(method, weights, stats) for weights, stats in jobs]

    def close(self) -> None:
        pass


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "--workers/--ray-address need Ray, which is not installed: pip install 'armor-vllm[ray]'"
        ) from None
    return ray


class RayExecutor:
    """Runs the groups of a layer as Ray tasks, one task per group, and gathers them in order.

    ``address``: an existing cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``);
    otherwise a local instance with ``workers`` CPUs is started (and shut down by ``close``)."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        ray = _import_ray()
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
            self._owns = True
        # SPREAD: a layer has only a few groups; give each its own node where there are several.
        self._task = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(compress_task)

    def compress_groups(self, method: CompressionMethod, jobs: list[Job]) -> list[Outcome]:
        threads = torch.get_num_threads()
        refs = [
            self._task.remote(
                method.name, method.block_size, method.seed, dict(method.options), weights, stats, threads
            )
            for weights, stats in jobs
        ]
        return self._ray.get(refs)

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False


def check_options(workers: int | None = None, ray_address: str | None = None) -> None:
    """Refuse bad ``workers``/``ray_address`` (and a missing Ray) before any work is done."""
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if workers is not None and ray_address:
        raise ValueError("pass --workers (a local Ray instance) or --ray-address (a running cluster), not both")
    if workers is not None or ray_address:
        _import_ray()


def make_executor(workers: int | None = None, ray_address: str | None = None):
    """``LocalExecutor`` unless ``workers`` or ``ray_address`` asks for Ray."""
    check_options(workers, ray_address)
    if workers is None and not ray_address:
        return LocalExecutor()
    return RayExecutor(workers=workers, address=ray_address)
