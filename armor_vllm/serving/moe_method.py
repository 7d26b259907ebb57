"""The ``armor`` method for vLLM's fused Mixture-of-Experts layers (first cut: folded experts).

An ARMOR checkpoint stores each expert's gate, up and down projection as its own format layer
under the per-expert checkpoint names vLLM's expert mapping loads (docs/FORMAT.md: Qwen3-MoE
``...experts.E.gate_proj``, Mixtral ``...experts.E.w1``). vLLM hands every such tensor to the
layer's ``w13_<tensor>`` / ``w2_<tensor>`` parameter with its shard (``w1``, ``w3``, ``w2``) and
expert id; this method keeps them per expert, and after loading multiplies each expert out
(``A·S·B``, float32), takes this rank's tensor-parallel slice, writes vLLM's dense ``w13_weight``
/ ``w2_weight`` and hands the layer to vLLM's own unquantized MoE method (on CPU its grouped GEMM):
the dense model's speed and memory, the compressed checkpoint's values.

vLLM picks it through ``ArmorQuantConfig.get_quant_method`` (``vllm_quant``), for layers that are
``RoutedExperts``: ``return moe_method(self.armor, layer, prefix)``.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.utils import set_weight_attrs

from armor_vllm.core.format import ArmorConfig, ArmorFormatError, decode_layer, layer_tensor_names

SHARDS = ("w1", "w3", "w2")  # gate, up (together vLLM's w13), down
STEMS = {"w1": "w13", "w3": "w13", "w2": "w2"}


def moe_method(armor: ArmorConfig, layer, prefix: str):
    """The quant method of one vLLM ``RoutedExperts`` layer: ARMOR unless ``ignore`` leaves its
    experts dense (``prefix`` is what vLLM calls the layer, ``model.layers.N.mlp.experts``)."""
    if not armor.is_compressed(prefix):
        return UnquantizedFusedMoEMethod(layer.moe_config)
    return ArmorMoEMethod(armor, layer.moe_config)


class ArmorMoEMethod(UnquantizedFusedMoEMethod):
    """Loads per-expert ARMOR layers and folds them into vLLM's dense expert weights."""

    def __init__(self, armor: ArmorConfig, moe):
        super().__init__(moe)
        self.armor = armor

    def create_weights(
        self,
        layer,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        # vLLM's dense expert weights, written once every expert is loaded.
        super().create_weights(
            layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
        )
        layer.armor_pending = {}  # (local expert, shard) -> {"global": id, tensor name: tensor}
        for stem in ("w13", "w2"):
            for name in layer_tensor_names(self.armor.wrappers):
                param = Parameter(torch.empty(0), requires_grad=False)
                set_weight_attrs(param, {"weight_loader": self._loader(layer, name)})
                layer.register_parameter(f"{stem}_{name}", param)

    def _loader(self, layer, tensor_name: str):
        def load(param, loaded_weight, weight_name="", shard_id=None, expert_id=None, return_success=False):
            if shard_id not in SHARDS or expert_id is None:
                raise ArmorFormatError(
                    f"{layer.layer_name}: {weight_name} arrived without an expert shard ({shard_id!r})"
                )
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:  # another expert-parallel rank holds this expert
                return False if return_success else None
            entry = layer.armor_pending.setdefault((local, shard_id), {"global": expert_id})
            entry[tensor_name] = loaded_weight.detach().clone()
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer) -> None:
        parallel = layer.moe_config.moe_parallel_config
        tp_rank, tp_size = parallel.tp_rank, parallel.tp_size
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        n_local, hidden, inter = w2.shape[0], w2.shape[1], self.moe.intermediate_size_per_partition_unpadded
        w13.zero_()  # padding (if a kernel asked for any) stays zero
        w2.zero_()
        names = layer_tensor_names(self.armor.wrappers)
        for local in range(n_local):
            for shard in SHARDS:
                entry = layer.armor_pending.get((local, shard))
                where = f"{layer.layer_name} (local expert {local}, shard {shard})"
                if entry is None:
                    raise ArmorFormatError(f"{where}: no ARMOR tensors for this expert in the checkpoint")
                missing = [n for n in names if n not in entry]
                if missing:
                    raise ArmorFormatError(f"{where}: checkpoint tensor(s) missing: {missing}")
                prefix = f"{layer.layer_name}.{entry['global']}.{shard}"
                arm = decode_layer(
                    prefix, {f"{prefix}.{n}": entry[n] for n in names}, self.armor.block_size, self.armor.wrappers
                )
                weight = arm.weight()
                full_inter = inter * tp_size
                expect = (hidden, full_inter) if shard == "w2" else (full_inter, hidden)
                if tuple(weight.shape) != expect:
                    raise ArmorFormatError(f"{prefix}: shape {tuple(weight.shape)}, the model expects {expect}")
                part = slice(tp_rank * inter, (tp_rank + 1) * inter)
                if shard == "w2":
                    w2[local, :, :inter].copy_(weight[:, part].to(w2.dtype))
                else:
                    offset = 0 if shard == "w1" else w13.shape[1] // 2
                    w13[local, offset : offset + inter].copy_(weight[part].to(w13.dtype))
        for stem in ("w13", "w2"):
            for name in names:
                delattr(layer, f"{stem}_{name}")
        layer.armor_pending = None
        super().process_weights_after_loading(layer)
