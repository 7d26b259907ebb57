"""The ``armor`` quantization method for vLLM: a config that parses and validates the checkpoint's
``quantization_config``, and a linear method that creates, loads, post-processes and applies the
ARMOR tensors (``y = A (S (B x)) + bias``).

Registered with ``@register_quantization_config("armor")`` when vLLM loads our general plugin
(``armor_vllm.plugin:register``) in every process, so ``vllm serve DIR --quantization armor`` works.
Fused layers (``qkv_proj``, ``gate_up_proj``) receive each checkpoint projection as its own shard
with its own wrappers. Under tensor parallelism column-parallel layers slice rows (and the output
blocks with them) and row-parallel layers slice the input columns (and the input blocks); since
``A`` is linear it is applied to each rank's partial sum before the all-reduce.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from armor_vllm.format import (
    BITMASK,
    COMPRESSED,
    QUANT_METHOD,
    SHAPE,
    WRAPPER_IN,
    WRAPPER_OUT,
    ArmorConfig,
    ArmorFormatError,
    decompress_core,
)
from armor_vllm.kernels import CPU_KERNELS, CUDA_KERNELS, ArmorShards, select_kernel

KERNEL_ENV = "ARMOR_VLLM_KERNEL"
# "auto" means: on CPU the folded kernel (measured faster than factored, see BENCHMARKS.md); on
# CUDA the fastest of cuSPARSELt / CUTLASS / dense measured at load (armor_vllm.kernels.cuda).
QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


def selected_kernel() -> str:
    """The execution mode from ``$ARMOR_VLLM_KERNEL``, validated against the known names."""
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower()
    known = {"auto", *CPU_KERNELS, *CUDA_KERNELS}
    if mode not in known:
        raise ValueError(f"${KERNEL_ENV}={mode!r} is not one of {sorted(known)}")
    return mode


@register_quantization_config(QUANT_METHOD)
class ArmorQuantConfig(QuantizationConfig):
    """The validated ``quantization_config`` of an ARMOR checkpoint (format v1)."""

    def __init__(self, armor: ArmorConfig):
        super().__init__()
        self.armor = armor
        self.kernel = selected_kernel()

    def __repr__(self) -> str:
        return f"ArmorQuantConfig(block_size={self.armor.block_size}, method={self.armor.method}, kernel={self.kernel})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # sparse tensor cores (Ampere); the CPU path has no such limit

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ArmorQuantConfig":
        return cls(ArmorConfig.from_dict(config, where="config.json: quantization_config"))

    def shard_names(self, prefix: str) -> list[str]:
        """Checkpoint names of the projections a vLLM layer fuses (``qkv_proj`` -> q/k/v_proj)."""
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        names = self.shard_names(prefix)
        compressed = [self.armor.is_compressed(n) for n in names]
        if all(compressed):
            return ArmorLinearMethod(self)
        if not any(compressed):
            return UnquantizedLinearMethod()
        raise ArmorFormatError(
            f"{prefix}: vLLM fuses {names} into one layer, but only some of them are ARMOR-compressed "
            f"(targets {list(self.armor.targets)}, ignore {list(self.armor.ignore)})"
        )


class ArmorLinearMethod(LinearMethodBase):
    """Creates the format-v1 tensors of a (possibly fused, possibly tensor-parallel) linear, loads
    each checkpoint projection into its shard, validates and hands them to a kernel after loading."""

    def __init__(self, config: ArmorQuantConfig):
        self.config = config
        self.kernel = None
        self._dense = None  # vLLM's own dense GEMM, reused by the folded kernel

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
        bs = self.config.armor.block_size
        prefix = getattr(layer, "prefix", "") or "linear"
        names = self.config.shard_names(prefix)
        if len(names) != len(output_partition_sizes):
            names = [f"{prefix}[{i}]" for i in range(len(output_partition_sizes))]
        for name, rows in zip(names, output_partition_sizes):
            if rows % bs:
                raise ArmorFormatError(
                    f"{name}: block size {bs} does not divide its {rows} output rows on this rank "
                    f"(tensor parallel size {getattr(layer, 'tp_size', 1)})"
                )
        if input_size_per_partition % bs or input_size_per_partition % 8:
            raise ArmorFormatError(
                f"{prefix}: block size {bs} (and the bitmask's 8 columns) must divide its "
                f"{input_size_per_partition} input columns on this rank (tensor parallel size "
                f"{getattr(layer, 'tp_size', 1)})"
            )
        rows = sum(output_partition_sizes)
        cols = input_size_per_partition
        n = len(output_partition_sizes)
        layer.armor_shard_names = names
        layer.armor_output_sizes = list(output_partition_sizes)
        layer.armor_input_size = input_size
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
        for name, data in specs.items():
            param = Parameter(data, requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._make_loader(layer, name)})
            layer.register_parameter(name, param)

    # -- load -----------------------------------------------------------------------------------
    def _make_loader(self, layer, tensor_name: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None):
            self._load(layer, tensor_name, param, loaded, shard_id)

        return load

    def _shard_index(self, layer, tensor_name, shard_id) -> int:
        n = len(layer.armor_output_sizes)
        if shard_id is None:
            if n != 1:
                raise ArmorFormatError(
                    f"{layer.prefix}.{tensor_name}: the checkpoint stores this fused layer as one "
                    f"tensor; format v1 stores each projection ({layer.armor_shard_names}) apart"
                )
            return 0
        index = QKV_SHARDS.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
        if not isinstance(index, int) or not 0 <= index < n:
            raise ArmorFormatError(f"{layer.prefix}.{tensor_name}: unknown shard {shard_id!r}")
        return index

    def _load(self, layer, tensor_name, param, loaded, shard_id):
        idx = self._shard_index(layer, tensor_name, shard_id)
        where = f"{layer.armor_shard_names[idx]}.{tensor_name}"
        bs = self.config.armor.block_size
        sizes = layer.armor_output_sizes
        offset, rows = sum(sizes[:idx]), sizes[idx]
        tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
        # Only column- and row-parallel layers are split; a ReplicatedLinear also carries the world's
        # tp_rank/tp_size but holds the whole weight on every rank.
        row_parallel = isinstance(layer, RowParallelLinear) and tp_size > 1
        col_parallel = isinstance(layer, ColumnParallelLinear) and tp_size > 1
        # Which rows / input columns of the checkpoint tensor this rank keeps (with fewer kv heads
        # than ranks, QKVParallelLinear gives groups of num_kv_head_replicas ranks the same k/v rows).
        replicas = getattr(layer, "num_kv_head_replicas", 1) if shard_id in ("k", "v") else 1
        row_start = (tp_rank // replicas) * rows if col_parallel else 0
        in_part = layer.input_size_per_partition if hasattr(layer, "input_size_per_partition") else None
        col_start = tp_rank * in_part if (row_parallel and in_part) else 0
        layer.armor_full_shapes[(tensor_name, idx)] = tuple(loaded.shape)

        def check(src: torch.Tensor, dst: torch.Tensor) -> None:
            if tuple(src.shape) != tuple(dst.shape):
                raise ArmorFormatError(
                    f"{where}: shape {tuple(loaded.shape)} does not fit this layer (this rank expects "
                    f"{tuple(dst.shape)} after tensor-parallel slicing)"
                )

        if tensor_name == SHAPE:
            if loaded.numel() != 2:
                raise ArmorFormatError(f"{where}: expected [d_out, d_in], got shape {tuple(loaded.shape)}")
            param.data[idx].copy_(loaded.reshape(2))
        elif tensor_name in (COMPRESSED, BITMASK):
            per_col = 2 if tensor_name == COMPRESSED else 8
            src = loaded
            if src.dim() != 2:
                raise ArmorFormatError(f"{where}: expected a 2-D tensor, got shape {tuple(src.shape)}")
            if col_parallel:
                src = src.narrow(0, row_start, min(rows, max(src.shape[0] - row_start, 0)))
            if row_parallel:
                width = param.shape[1]
                src = src.narrow(1, col_start // per_col, min(width, max(src.shape[1] - col_start // per_col, 0)))
            dst = param.data.narrow(0, offset, rows)
            check(src, dst)
            dst.copy_(src)
        elif tensor_name == WRAPPER_OUT:
            src = loaded
            if src.dim() != 3 or tuple(src.shape[1:]) != (bs, bs):
                raise ArmorFormatError(f"{where}: shape {tuple(src.shape)}, expected (d_out/{bs}, {bs}, {bs})")
            if col_parallel:
                src = src.narrow(0, row_start // bs, min(rows // bs, max(src.shape[0] - row_start // bs, 0)))
            dst = param.data.narrow(0, offset // bs, rows // bs)
            check(src, dst)
            dst.copy_(src)
        elif tensor_name == WRAPPER_IN:
            src = loaded
            if src.dim() != 3 or tuple(src.shape[1:]) != (bs, bs):
                raise ArmorFormatError(f"{where}: shape {tuple(src.shape)}, expected (d_in/{bs}, {bs}, {bs})")
            if row_parallel:
                src = src.narrow(0, col_start // bs, min(param.shape[1], max(src.shape[0] - col_start // bs, 0)))
            dst = param.data[idx]
            check(src, dst)
            dst.copy_(src)
        layer.armor_loaded.add((tensor_name, idx))

    # -- post-process ---------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        names = layer.armor_shard_names
        missing = [
            f"{names[i]}.{t}"
            for i in range(len(names))
            for t in (COMPRESSED, BITMASK, SHAPE, WRAPPER_OUT, WRAPPER_IN)
            if (t, i) not in layer.armor_loaded
        ]
        if missing:
            raise ArmorFormatError(f"{layer.prefix}: checkpoint tensor(s) missing: {', '.join(missing)}")
        sizes = layer.armor_output_sizes
        cols = layer.compressed.shape[1] * 2
        cores, wrappers_in, offset = [], [], 0
        for i, rows in enumerate(sizes):
            full_rows, full_cols = (int(v) for v in layer.shape.data[i].tolist())
            stored = layer.armor_full_shapes[(COMPRESSED, i)]
            if stored != (full_rows, full_cols // 2) or full_cols != layer.armor_input_size:
                raise ArmorFormatError(
                    f"{names[i]}.{SHAPE}: says {[full_rows, full_cols]}, but {names[i]}.{COMPRESSED} is "
                    f"{stored} and the model expects {layer.armor_input_size} inputs"
                )
            part_shape = torch.tensor([rows, cols])
            core = decompress_core(
                layer.compressed.data.narrow(0, offset, rows),
                layer.bitmask.data.narrow(0, offset, rows),
                part_shape,
                where=names[i],
            )
            cores.append(core)
            wrappers_in.append(layer.wrapper_in.data[i])
            offset += rows
        for name in (WRAPPER_OUT, WRAPPER_IN):
            if not bool(torch.isfinite(getattr(layer, name).data).all()):
                raise ArmorFormatError(f"{layer.prefix}: {name} holds non-finite values")
        shards = ArmorShards(wrapper_out=layer.wrapper_out.data, cores=cores, wrappers_in=wrappers_in)
        for name in (COMPRESSED, BITMASK, SHAPE, WRAPPER_OUT, WRAPPER_IN):
            delattr(layer, name)
        self._prepare(layer, shards, layer.armor_params_dtype)

    def _prepare(self, layer, shards: ArmorShards, dtype: torch.dtype) -> None:
        self.kernel = select_kernel(self.config.kernel, shards.wrapper_out.device)
        tensors = self.kernel.prepare(shards, dtype)
        if self.kernel.name == "folded":
            # The folded weight is an ordinary dense weight: run it through vLLM's own dense GEMM
            # (on CPU a prepacked oneDNN matmul), so folded costs exactly what the dense model does.
            layer.weight = Parameter(tensors["weight"], requires_grad=False)
            self._dense = UnquantizedLinearMethod()
            self._dense.process_weights_after_loading(layer)
            return
        layer.armor_tensors = list(tensors)
        for name, tensor in tensors.items():
            layer.register_buffer(f"armor_{name}", tensor, persistent=False)

    # -- apply ----------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._dense is not None:
            return self._dense.apply(layer, x, bias)
        tensors = {name: getattr(layer, f"armor_{name}") for name in layer.armor_tensors}
        return self.kernel.apply(tensors, x, bias)
