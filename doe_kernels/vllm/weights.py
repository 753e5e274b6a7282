"""The dense FFN weights a pruned forward reads, kept in the layouts doe_kernels' ops expect.

vLLM's CPU build repacks every unquantized linear weight after loading (into oneDNN or sgl-kernel
handles) and empties `.weight`, so nothing indexable would be left. `keep_dense_ffn_weights()`
(run when this package is imported, which vLLM does in every worker before it loads the model)
wraps vLLM's `dispatch_cpu_unquantized_gemm` so that, just before a layer named
`*.mlp.gate_up_proj` or `*.mlp.down_proj` is repacked, its dense weight is kept: gate_up as loaded
([2 * I/tp, hidden], the gate rows then the up rows; a reference) and down input-major
([I/tp, hidden]; a copy, the [hidden, I/tp] original is then freed). vLLM's dense path is left as
it is, so an unplugged model computes exactly what vLLM does. Cost on CPU: the rank's FFN weights
once more (the packed handles hold their own copy). On GPUs nothing is repacked: gate_up is read in
place and down is converted input-major at the first plug (cost: the down projections once more).
"""
from dataclasses import dataclass

import torch

from doe_kernels.ops import input_major

_KEPT = "_doe_dense_weight"  # set on a gate_up_proj / down_proj before vLLM repacks it
_CACHED = "_doe_ffn_weights"  # set on an MLP at its first plug
_FFN_LINEARS = ("mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class FfnWeights:
    """One rank's FFN weights: w_gate, w_up (I/tp, hidden) and w_down_t (I/tp, hidden)."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down_t: torch.Tensor


def keep_dense_ffn_weights() -> None:
    """Wrap vLLM's CPU weight repacking so that FFN weights survive it (idempotent)."""
    from vllm.model_executor.layers import utils

    if getattr(utils.dispatch_cpu_unquantized_gemm, "_doe_keeps_dense", False):
        return
    repack = utils.dispatch_cpu_unquantized_gemm

    def dispatch_keeping_dense(layer, remove_weight):
        weight = layer.weight
        if (str(getattr(layer, "prefix", "")).endswith(_FFN_LINEARS) and not weight.is_meta
                and weight.dim() == 2):
            dense = weight.detach()
            setattr(layer, _KEPT, input_major(dense) if layer.prefix.endswith("down_proj")
                    else dense)
        return repack(layer, remove_weight)

    dispatch_keeping_dense._doe_keeps_dense = True
    utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_dense


def ffn_weights(mlp) -> FfnWeights:
    """The rank's dense FFN weights of a vLLM LLaMA-style MLP (prepared once, then cached)."""
    cached = mlp.__dict__.get(_CACHED)
    if cached is None:
        gate_up = _dense(mlp.gate_up_proj, input_major_copy=False)
        w_down_t = _dense(mlp.down_proj, input_major_copy=True)
        local = w_down_t.shape[0]
        cached = FfnWeights(gate_up[:local], gate_up[local:], w_down_t)
        mlp.__dict__[_CACHED] = cached
    return cached


def _dense(linear, input_major_copy: bool) -> torch.Tensor:
    kept = getattr(linear, _KEPT, None)
    if kept is not None:
        return kept
    weight = linear.weight.detach()
    if weight.numel() == 0:
        raise RuntimeError(
            f"{getattr(linear, 'prefix', 'an FFN layer')}: vLLM repacked this weight and removed "
            "it before doe_kernels.vllm could keep it; create the LLM with "
            "worker_extension_cls='doe_kernels.vllm.WorkerExtension' so that the workers import "
            "doe_kernels.vllm before loading the model")
    return input_major(weight) if input_major_copy else weight
