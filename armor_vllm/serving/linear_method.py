"""The ``armor`` linear method for vLLM, in the four steps of vLLM's quantization schemes: create
the format tensors of a (possibly fused, possibly tensor-parallel) linear, load each checkpoint
projection into its shard, post-process (decode and validate every shard with the one layer reader,
``core.format.decode_layer``, then hand the layer to a kernel), and apply ``y = A (S (B x)) + bias``.

Fused layers (``qkv_proj``, ``gate_up_proj``) receive each checkpoint projection as its own shard
with its own wrappers, or one checkpoint-fused tensor that is split at vLLM's output sizes; which
part of each tensor a tensor-parallel rank keeps is ``serving.weight_slicing``'s business. The
kernel (``armor_vllm.kernels``, chosen by ``$ARMOR_VLLM_KERNEL``) is reached through one custom op
with a fixed schema (``armor_vllm::armor_linear``: x, bias, layer name), for folded layers too, so
vLLM's compiled graph (which vLLM saves and reloads across restarts keyed on its own config only)
and its CUDA graphs see one node whatever was chosen at load. Each layer's report line
(``$ARMOR_VLLM_KERNEL_REPORT``) gives the weight bytes it serves against the dense weight's, and
the config logs the totals once every ARMOR linear is prepared.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.utils import set_weight_attrs

from armor_vllm import envs
from armor_vllm.core.format import (
    BITMASK,
    COMPRESSED,
    SHAPE,
    WRAPPER_IN,
    WRAPPER_OUT,
    ArmorFormatError,
    decode_layer,
)
from armor_vllm.kernels import ArmorShards, select_kernel
from armor_vllm.kernels.linear_op import LAYERS, LayerEntry, call_op, register_layer
from armor_vllm.kernels.plan import KernelPlan
from armor_vllm.serving.host_memory import trim_host_heap
from armor_vllm.serving.weight_slicing import rank_slice, slice_for_rank, split_fused

if TYPE_CHECKING:
    from armor_vllm.serving.config import ArmorQuantConfig

QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
logger = init_logger(__name__)
_LOGGED_CHOICES: set[str] = set()


def record_choice(layer, kernel) -> None:
    """Log each distinct (kernel, plan) once per process; with ``$ARMOR_VLLM_KERNEL_REPORT`` write
    every layer's choice as a JSON line (tests and users can see what really serves)."""
    plan = getattr(kernel, "plan", None)
    entry = {
        "layer": layer.prefix,
        "rank": getattr(layer, "tp_rank", 0),
        "kernel": kernel.name,
        "plan": plan.to_json() if plan is not None else {"backend": "folded"},
        # what this layer keeps to serve, against the dense weight of the same shape and dtype
        "weight_bytes": int(kernel.weight_bytes),
        "dense_bytes": int(kernel.dense_bytes),
    }
    choice = json.dumps({k: entry[k] for k in ("kernel", "plan")}, sort_keys=True)
    if choice not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(choice)
        logger.info("ARMOR: %s (first: %s)", choice, layer.prefix)
    path = envs.get(envs.KERNEL_REPORT)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def max_num_batched_tokens() -> int | None:
    """The largest token count one forward can carry in this vLLM engine (None outside one)."""
    try:
        from vllm.config import get_current_vllm_config

        value = get_current_vllm_config().scheduler_config.max_num_batched_tokens
        return int(value) if value else None
    except Exception:  # noqa: BLE001 - no engine config (unit tests): the kernel's default
        return None


def tensor_parallel_agreement(layer) -> Any:
    """How the ranks of a tensor-parallel layer settle on one measured plan: rank 0's, broadcast
    over vLLM's tensor-parallel group (None when there is one rank)."""
    if getattr(layer, "tp_size", 1) <= 1:
        return None

    def agree(plan: KernelPlan) -> KernelPlan:
        from vllm.distributed import get_tp_group

        return KernelPlan.from_json(get_tp_group().broadcast_object(plan.to_json(), src=0))

    return agree


class ArmorLinearMethod(LinearMethodBase):
    """Creates the format tensors of a (possibly fused, possibly tensor-parallel) linear, loads each
    checkpoint projection into its shard, validates, and hands the layer to a kernel after loading."""

    def __init__(self, config: "ArmorQuantConfig"):
        self.config = config
        self.kernel = None
        self._dense = None  # vLLM's own dense GEMM, reused by the folded kernel
        self.key = ""  # the layer name the op finds this layer by (set at prepare)
        self.entry = None  # this layer's entry in the op's registry

    def layer_tensors(self) -> tuple[str, ...]:
        return (
            (COMPRESSED, BITMASK, SHAPE, WRAPPER_OUT, WRAPPER_IN)
            if self.config.has_wrappers
            else (COMPRESSED, BITMASK, SHAPE)
        )

    # -- create ---------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        prefix = getattr(layer, "prefix", "") or "linear"
        names = self.config.shard_names(prefix)
        if len(names) != len(output_partition_sizes):
            names = [f"{prefix}[{i}]" for i in range(len(output_partition_sizes))]
        # Without wrappers the block size means nothing; the blocks are then the identity at a size
        # dividing every part (only the bitmask's 8 columns constrain the input).
        bs = (
            self.config.armor.block_size
            if self.config.has_wrappers
            else math.gcd(8, input_size_per_partition, *output_partition_sizes)
        )
        tp_note = f"(tensor parallel size {getattr(layer, 'tp_size', 1)})"
        for name, rows in zip(names, output_partition_sizes):
            if rows % bs:
                raise ArmorFormatError(
                    f"{name}: block size {bs} does not divide its {rows} output rows on this rank {tp_note}"
                )
        if input_size_per_partition % bs or input_size_per_partition % 8:
            raise ArmorFormatError(
                f"{prefix}: block size {bs} (and the bitmask's 8 columns) must divide its "
                f"{input_size_per_partition} input columns on this rank {tp_note}"
            )
        layer.armor_block_size = bs
        rows = sum(output_partition_sizes)
        cols = input_size_per_partition
        n = len(output_partition_sizes)
        layer.armor_shard_names = names
        layer.armor_output_sizes = list(output_partition_sizes)
        layer.armor_input_size = input_size
        layer.armor_cols = cols
        layer.armor_params_dtype = params_dtype
        layer.armor_loaded = set()  # (tensor, shard index) pairs seen
        layer.armor_full_shapes = {}  # (tensor, shard) -> shape as stored in the checkpoint
        specs = {
            COMPRESSED: torch.empty(rows, cols // 2, dtype=params_dtype),
            BITMASK: torch.empty(rows, cols // 8, dtype=torch.uint8),
            SHAPE: torch.empty(n, 2, dtype=torch.int64),
            WRAPPER_OUT: torch.empty(rows // bs, bs, bs, dtype=torch.float32),
            WRAPPER_IN: torch.empty(n, cols // bs, bs, bs, dtype=torch.float32),
        }
        for name in self.layer_tensors():
            param = Parameter(specs[name], requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._make_loader(layer, name)})
            layer.register_parameter(name, param)

    # -- load -----------------------------------------------------------------------------------
    def _make_loader(self, layer, tensor_name: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None):
            self._load(layer, tensor_name, param, loaded, shard_id)

        return load

    def _shard_index(self, layer, tensor_name, shard_id) -> int:
        n = len(layer.armor_output_sizes)
        index = QKV_SHARDS.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
        if not isinstance(index, int) or not 0 <= index < n:
            raise ArmorFormatError(f"{layer.prefix}.{tensor_name}: unknown shard {shard_id!r}")
        return index

    @staticmethod
    def _full_output_sizes(layer) -> list[int]:
        """The checkpoint's output rows of each shard (before tensor-parallel slicing)."""
        tp = getattr(layer, "tp_size", 1) if isinstance(layer, ColumnParallelLinear) else 1
        return [s * tp // _kv_replicas(layer, i) for i, s in enumerate(layer.armor_output_sizes)]

    def _load(self, layer, tensor_name, param, loaded, shard_id):
        if shard_id is None and len(layer.armor_output_sizes) > 1:
            # One checkpoint tensor for a layer vLLM fuses (Phi-3's qkv_proj, gate_up_proj).
            where = f"{layer.prefix}.{tensor_name}"
            parts = split_fused(tensor_name, loaded, self._full_output_sizes(layer), layer.armor_block_size, where)
            for idx, part in enumerate(parts):
                self._load_shard(layer, tensor_name, param, part, idx, f"{layer.prefix}[{idx}].{tensor_name}")
            return
        idx = 0 if shard_id is None else self._shard_index(layer, tensor_name, shard_id)
        self._load_shard(layer, tensor_name, param, loaded, idx, f"{layer.armor_shard_names[idx]}.{tensor_name}")

    def _load_shard(self, layer, tensor_name, param, loaded, idx, where):
        bs = layer.armor_block_size
        sizes = layer.armor_output_sizes
        tp_size = getattr(layer, "tp_size", 1)
        # Only column- and row-parallel layers are split; a ReplicatedLinear also carries the world's
        # tp_rank/tp_size but holds the whole weight on every rank.
        part = rank_slice(
            rows=sizes[idx],
            cols=layer.armor_cols,
            block_size=bs,
            tp_rank=getattr(layer, "tp_rank", 0),
            column_parallel=isinstance(layer, ColumnParallelLinear) and tp_size > 1,
            row_parallel=isinstance(layer, RowParallelLinear) and tp_size > 1,
            kv_replicas=_kv_replicas(layer, idx),
        )
        layer.armor_full_shapes[(tensor_name, idx)] = tuple(loaded.shape)
        src = slice_for_rank(tensor_name, loaded, part, where)
        offset = sum(sizes[:idx])
        if tensor_name == SHAPE:
            if src.numel() != 2:
                raise ArmorFormatError(f"{where}: expected [d_out, d_in], got shape {tuple(src.shape)}")
            dst = param.data[idx]
            src = src.reshape(2)
        elif tensor_name in (COMPRESSED, BITMASK):
            dst = param.data.narrow(0, offset, sizes[idx])
        elif tensor_name == WRAPPER_OUT:
            dst = param.data.narrow(0, offset // bs, sizes[idx] // bs)
        else:
            dst = param.data[idx]
        if tuple(src.shape) != tuple(dst.shape):
            raise ArmorFormatError(
                f"{where}: shape {tuple(loaded.shape)} does not fit this layer (this rank expects "
                f"{tuple(dst.shape)} after tensor-parallel slicing)"
            )
        dst.copy_(src)
        layer.armor_loaded.add((tensor_name, idx))

    # -- post-process ---------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        names = layer.armor_shard_names
        tensor_names = self.layer_tensors()
        missing = [
            f"{names[i]}.{t}" for i in range(len(names)) for t in tensor_names if (t, i) not in layer.armor_loaded
        ]
        if missing:
            raise ArmorFormatError(f"{layer.prefix}: checkpoint tensor(s) missing: {', '.join(missing)}")
        full_sizes = self._full_output_sizes(layer)
        shards, offset = [], 0
        for i, rows in enumerate(layer.armor_output_sizes):
            full_rows, full_cols = (int(v) for v in layer.shape.data[i].tolist())
            stored = layer.armor_full_shapes[(COMPRESSED, i)]
            if (
                (full_rows, full_cols) != (full_sizes[i], layer.armor_input_size)
                or stored[0] != full_rows
                or stored[-1] * 2 != full_cols
            ):
                raise ArmorFormatError(
                    f"{names[i]}.{SHAPE}: says {[full_rows, full_cols]}, but {names[i]}.{COMPRESSED} is "
                    f"{stored} and the model expects {[full_sizes[i], layer.armor_input_size]}"
                )
            shards.append(
                decode_layer(
                    names[i],
                    self._rank_tensors(layer, i, offset, rows),
                    layer.armor_block_size,
                    self.config.has_wrappers,
                )
            )
            offset += rows
        for name in tensor_names:
            delattr(layer, name)
        prepared = ArmorShards.from_layers(shards, layer.armor_block_size)
        on_host = prepared.wrapper_out.device.type == "cpu"
        self._prepare(layer, prepared, layer.armor_params_dtype)
        del shards, prepared
        if on_host:  # the checkpoint tensors and load temporaries are freed: give their pages back
            trim_host_heap()

    def _rank_tensors(self, layer, shard: int, offset: int, rows: int) -> dict[str, torch.Tensor]:
        """This rank's tensors of one shard, under the shard's checkpoint names, as the layer reader
        takes them (``shape`` is this rank's part: the full one is checked above)."""
        name, bs = layer.armor_shard_names[shard], layer.armor_block_size
        tensors = {
            COMPRESSED: layer.compressed.data.narrow(0, offset, rows),
            BITMASK: layer.bitmask.data.narrow(0, offset, rows),
            SHAPE: torch.tensor([rows, layer.armor_cols]),
        }
        if self.config.has_wrappers:
            tensors[WRAPPER_OUT] = layer.wrapper_out.data.narrow(0, offset // bs, rows // bs)
            tensors[WRAPPER_IN] = layer.wrapper_in.data[shard]
        return {f"{name}.{k}": v for k, v in tensors.items()}

    def _prepare(self, layer, shards: ArmorShards, dtype: torch.dtype) -> None:
        self.key = getattr(layer, "prefix", "") or f"armor-linear-{id(layer)}"
        self.kernel = select_kernel(
            self.config.kernel,
            shards.wrapper_out.device,
            key=self.key,
            agree=tensor_parallel_agreement(layer),
            max_tokens=max_num_batched_tokens(),
        )
        tensors = self.kernel.prepare(shards, dtype)
        self.entry = LAYERS[self.key]  # what the op finds under this layer's name
        layer.armor_out_features = self.kernel.out_features
        record_choice(layer, self.kernel)
        self.config.note_prepared(self.kernel)
        if self.kernel.layout is None:
            # A folded weight is an ordinary dense weight: run it through vLLM's own dense GEMM
            # (on CPU a prepacked oneDNN matmul), so folded costs exactly what the dense model does:
            # directly in eager mode, and from inside the op ``armor_linear`` in a compiled graph.
            layer.weight = Parameter(tensors[0], requires_grad=False)
            dense = self._dense = UnquantizedLinearMethod()
            dense.process_weights_after_loading(layer)
            self.entry = register_layer(
                self.key,
                LayerEntry(
                    forward=lambda x, bias: dense.apply(layer, x, bias),
                    out_features=self.kernel.out_features,
                    tensors=tuple(tensors),
                ),
            )
            return
        layer.armor_tensor_names = tuple(f"armor_{i}" for i in range(len(tensors)))
        for name, tensor in zip(layer.armor_tensor_names, tensors):
            layer.register_buffer(name, tensor, persistent=False)

    # -- apply ----------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # What torch.compile traces is ALWAYS the one op, whatever kernel, plan or dense copy this
        # process chose: vLLM reuses a saved compiled graph across restarts keyed on its own config
        # only, so the graph must not depend on ARMOR's choices (kernels.linear_op).
        # The op finds the layer by name, as vLLM's attention ops do (one process: unique names). In
        # eager mode this layer's entry runs directly: no op dispatch, and a folded layer is exactly
        # vLLM's dense GEMM.
        if torch.compiler.is_compiling():
            return call_op(x, bias, self.key, layer.armor_out_features)
        if self._dense is not None:
            return self._dense.apply(layer, x, bias)
        return self.entry.forward(x, bias)


def _kv_replicas(layer, shard: int) -> int:
    """How many tensor-parallel ranks hold the same rows of shard ``shard`` (k/v with fewer kv heads
    than ranks), else 1."""
    if isinstance(layer, QKVParallelLinear) and shard > 0:
        return getattr(layer, "num_kv_head_replicas", 1)
    return 1
