"""The dense weights a pruned forward reads, kept in the layouts doe_kernels' ops expect.

vLLM's CPU build repacks every unquantized linear weight after loading (into oneDNN or sgl-kernel
handles) and empties `.weight`, so nothing indexable would be left. `keep_dense_weights()` (run when
this package is imported, which vLLM does in every worker before it loads the model) wraps vLLM's
`dispatch_cpu_unquantized_gemm` so that, just before a layer's `mlp.gate_up_proj`, `mlp.down_proj`,
`self_attn.qkv_proj` or `self_attn.o_proj` is repacked, its dense weight is kept: gate_up and qkv
as loaded (references: [2 * I/tp, hidden] and [(q + 2 kv)/tp, hidden]) and down and o input-major
(copies, [I/tp, hidden] and [q/tp, hidden]; the originals are then freed). vLLM's dense path is
left as it is, so an unplugged model computes exactly what vLLM does. Cost on CPU: the rank's
linear weights once more (the packed handles hold their own copy). On GPUs nothing is repacked:
gate_up and qkv are read in place, and down and o are converted input-major at the first plug
(cost: those projections once more).

A MoE block's fused experts are repacked too on the CPU (into the fused kernel's blocked layout),
so `keep_dense_weights()` also wraps the unquantized MoE method's `process_weights_after_loading`
to keep references to each rank's experts as loaded: w13 (experts x 2 I/tp x hidden, gate rows
then up rows) and w2 (experts x hidden x I/tp), on the MoE backends that do not rewrite them in
place (the CPU's and Triton's). Only experts pruned inside (neurons) or skipped
read them (doe_kernels.vllm.moe), w2 converted input-major at the first plug that needs it (the
original then dropped). Cost on the CPU, where vLLM replaces them: the rank's expert weights once
more, for every Mixtral loaded with the extension; on GPUs with Triton's experts, which keep
them, the down projections once more from the first such plug on, outside the memory vLLM
budgets.
"""
from dataclasses import dataclass

import torch

from doe_kernels.models import UnsupportedModelError
from doe_kernels.ops import input_major

_KEPT = "_doe_dense_weight"  # set on a kept linear before vLLM repacks it
_STAMP = "_doe_kept_from"  # the parameters' _Stamps as vLLM left them once it had repacked
_IN_PLACE = "_doe_experts_in_place"  # True where kept experts were vLLM's own parameters
_CACHED = "_doe_weights"  # set on an MLP or attention at its first plug
_AS_LOADED = ("mlp.gate_up_proj", "self_attn.qkv_proj")
_INPUT_MAJOR = ("mlp.down_proj", "self_attn.o_proj")


@dataclass(frozen=True)
class FfnWeights:
    """One rank's FFN weights: w_gate, w_up (I/tp, hidden) and w_down_t (I/tp, hidden)."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down_t: torch.Tensor


@dataclass(frozen=True)
class ExpertWeights:
    """One rank's MoE experts: gate_up (experts, 2 I/tp, hidden; gate rows, then up rows) and
    down_t (experts, I/tp, hidden), the layout doe_kernels.models.moe_block.experts_forward
    reads."""

    gate_up: torch.Tensor
    down_t: torch.Tensor


@dataclass(frozen=True)
class _LoadedExperts:
    """References to a rank's expert weights as vLLM loaded them (w2: experts, hidden, I/tp)."""

    w13: torch.Tensor
    w2: torch.Tensor


@dataclass(frozen=True)
class _Stamp:
    """A module's parameter as vLLM left it when doe_kernels kept its weights, with its version
    then: a reload in kernel format (`reload_weights(is_checkpoint_format=False)`) copies into
    the parameter in place, which changes its version."""

    parameter: torch.Tensor
    version: int

    @classmethod
    def of(cls, module, name: str) -> "_Stamp":
        parameter = getattr(module, name)
        return cls(parameter, parameter._version)


@dataclass(frozen=True)
class AttentionWeights:
    """One rank's attention projections: w_qkv ((q + 2 kv)/tp, hidden) with its bias b_qkv or
    None, and w_o_t (q/tp, hidden), o_proj's weight input-major."""

    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o_t: torch.Tensor


def keep_dense_weights() -> None:
    """Wrap vLLM's CPU weight repacking so that FFN and attention weights survive it, and its MoE
    weight processing so that references to the expert weights as loaded are kept
    (idempotent)."""
    from vllm.model_executor.layers import utils

    if getattr(utils.dispatch_cpu_unquantized_gemm, "_doe_keeps_dense", False):
        return
    repack = utils.dispatch_cpu_unquantized_gemm

    def dispatch_keeping_dense(layer, remove_weight):
        weight, prefix = layer.weight, str(getattr(layer, "prefix", ""))
        keeps = (prefix.endswith(_AS_LOADED + _INPUT_MAJOR) and not weight.is_meta
                 and weight.dim() == 2)
        if keeps:
            dense = weight.detach()
            setattr(layer, _KEPT, input_major(dense) if prefix.endswith(_INPUT_MAJOR) else dense)
        out = repack(layer, remove_weight)
        if keeps:
            layer.__dict__[_STAMP] = (_Stamp.of(layer, "weight"),)
        return out

    dispatch_keeping_dense._doe_keeps_dense = True
    utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_dense
    _keep_dense_experts()


# vLLM's unquantized MoE backends that replace the loaded expert weights (or use them as they are)
# rather than rewrite them in place: FlashInfer TRT-LLM, for one, reorders them into its block
# layout in place, and a kept reference would then read that layout.
_LEAVES_EXPERTS = ("CPU", "TRITON", "BATCHED_TRITON")


def _pre_processed() -> bool:
    """Whether vLLM loaded weights already in its runtime format."""
    try:
        from vllm.model_executor.utils import is_weights_pre_processed
    except ImportError:
        return False
    return bool(is_weights_pre_processed())


def _keep_dense_experts() -> None:
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod)

    process = UnquantizedFusedMoEMethod.process_weights_after_loading
    if not getattr(process, "_doe_keeps_dense", False):
        UnquantizedFusedMoEMethod.process_weights_after_loading = keeping_experts(process)


def keeping_experts(process):
    """vLLM's MoE `process_weights_after_loading(method, layer)` that also keeps references to
    the layer's expert weights as loaded, where the method's backend does not rewrite them in
    place (else the reason they were not kept)."""

    def process_keeping_dense(method, layer):
        w13, w2 = layer.w13_weight.detach(), layer.w2_weight.detach()
        backend = getattr(getattr(method, "unquantized_backend", None), "name", None)
        out = process(method, layer)
        if backend not in _LEAVES_EXPERTS or _pre_processed():
            layer.__dict__[_KEPT] = (f"vLLM's MoE backend {backend} may rewrite the expert "
                                     "weights in place, so they were not kept")
        elif not w13.is_meta and w13.dim() == 3 and w2.dim() == 3:
            layer.__dict__[_KEPT] = _LoadedExperts(w13, w2)
            layer.__dict__[_IN_PLACE] = _in_parameter(layer, layer.__dict__[_KEPT])
            layer.__dict__[_STAMP] = (_Stamp.of(layer, "w13_weight"), _Stamp.of(layer, "w2_weight"))
        return out

    process_keeping_dense._doe_keeps_dense = True
    return process_keeping_dense


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


def attention_weights(attn) -> AttentionWeights:
    """The rank's dense projections of a vLLM LLaMA-style attention (prepared once, cached)."""
    cached = attn.__dict__.get(_CACHED)
    if cached is None:
        bias = attn.qkv_proj.bias
        cached = AttentionWeights(_dense(attn.qkv_proj, input_major_copy=False),
                                  None if bias is None else bias.detach(),
                                  _dense(attn.o_proj, input_major_copy=True))
        attn.__dict__[_CACHED] = cached
    return cached


def drop_cached_weights(attn, ffn) -> None:
    """Forget a layer's prepared dense weights (`attention_weights`, `ffn_weights`), to be
    prepared again from the weights as they are now (after vLLM reloaded them in place). A MoE
    block's are kept afresh by vLLM's weight processing, which a reload runs again."""
    for module in (attn, ffn):
        module.__dict__.pop(_CACHED, None)


def expert_weights(block) -> ExpertWeights:
    """The rank's expert weights of a vLLM MoE block as loaded, the down projections input-major
    (converted at the first call, then cached)."""
    for module in block.experts.modules():
        kept = module.__dict__.get(_KEPT)
        if isinstance(kept, str):
            raise RuntimeError(f"{getattr(block.experts, 'layer_name', 'a MoE block')}: {kept}; "
                               "neurons inside the experts and skipping are served on vLLM's "
                               f"{', '.join(_LEAVES_EXPERTS)} MoE backends")
        if isinstance(kept, (_LoadedExperts, ExpertWeights)) and _moved_in_place(module, kept):
            kept = _LoadedExperts(module.w13_weight.detach(), module.w2_weight.detach())
            module.__dict__[_STAMP] = (_Stamp.of(module, "w13_weight"),
                                       _Stamp.of(module, "w2_weight"))
        if isinstance(kept, (_LoadedExperts, ExpertWeights)):
            _check_current(module, ("w13_weight", "w2_weight"))
        if isinstance(kept, _LoadedExperts):
            kept = ExpertWeights(kept.w13, kept.w2.transpose(1, 2).contiguous())
            module.__dict__[_KEPT] = kept
        if isinstance(kept, ExpertWeights):
            return kept
    raise RuntimeError(
        f"{getattr(block.experts, 'layer_name', 'a MoE block')}: its expert weights were not kept "
        "when the model was loaded; create the LLM with worker_extension_cls="
        "'doe_kernels.vllm.WorkerExtension' so that the workers import doe_kernels.vllm before "
        "loading the model")


def copies_a_reload_misses(model) -> list:
    """The modules whose weights doe_kernels keeps in tensors that are not vLLM's parameters (on
    the CPU, which repacks them): a reload in kernel format writes vLLM's parameters only, so
    these would keep the old weights."""
    missed = []
    for name, module in model.named_modules():
        kept = module.__dict__.get(_KEPT)
        if isinstance(kept, torch.Tensor) or (isinstance(kept, (_LoadedExperts, ExpertWeights))
                                              and not module.__dict__.get(_IN_PLACE)):
            missed.append(name)
    return missed


def _in_parameter(module, kept) -> bool:
    """Whether kept experts read vLLM's own w13 parameter (not a copy vLLM replaced)."""
    w13 = kept.w13 if isinstance(kept, _LoadedExperts) else kept.gate_up
    parameter = getattr(module, "w13_weight", None)
    return (isinstance(parameter, torch.Tensor) and parameter.shape == w13.shape
            and parameter.data_ptr() == w13.data_ptr())


def _moved_in_place(module, kept) -> bool:
    """Whether kept experts that were vLLM's own parameters (GPUs: its Triton experts leave them
    as loaded) no longer are, or were written since: a reload in checkpoint format puts vLLM's
    parameter objects back after processing copies of them (which is what was kept), one in
    kernel format writes new values into them. They are then kept again from the parameters
    (and the down projections converted from them, again)."""
    return bool(module.__dict__.get(_IN_PLACE)) and (
        not _in_parameter(module, kept)
        or _written_since_kept(module, ("w13_weight", "w2_weight")))


def _written_since_kept(module, names: tuple) -> bool:
    """Whether vLLM wrote into `module`'s parameters `names` in place since doe_kernels kept
    their weights. A reload in checkpoint format processes the layer again, which keeps them
    again, and then may put vLLM's earlier parameter objects back (copying the new values into
    them): parameters other than the ones stamped are stamped afresh."""
    stamps = module.__dict__.get(_STAMP)
    if stamps is None:
        return False
    if any(getattr(module, name, None) is stamp.parameter
           and stamp.parameter._version != stamp.version for stamp, name in zip(stamps, names)):
        return True
    module.__dict__[_STAMP] = tuple(
        stamp if getattr(module, name, None) is stamp.parameter else _Stamp.of(module, name)
        for stamp, name in zip(stamps, names))
    return False


def _check_current(module, names: tuple) -> None:
    """Raise RuntimeError when vLLM wrote new weights into `module` in place since doe_kernels
    kept a copy of them (a reload in kernel format: the copy would be the old weights)."""
    if _written_since_kept(module, names):
        raise RuntimeError(
            f"{getattr(module, 'prefix', None) or getattr(module, 'layer_name', 'a layer')}: its "
            "weights were written in place (a reload in kernel format) after doe_kernels kept a "
            "copy of them, which it cannot update; reload the weights in checkpoint format "
            "(reload_weights(is_checkpoint_format=True), the default)")


def check_plain_linear(linear, where: str, bias_allowed: bool) -> None:
    """Raise UnsupportedModelError for a quantized linear, one that returns its bias to the caller
    (skip_bias_add), or one with a bias where none is supported."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    name = str(getattr(linear, "prefix", "")).rpartition(".")[2] or type(linear).__name__
    if not isinstance(linear.quant_method, UnquantizedLinearMethod):
        raise UnsupportedModelError(f"{where}: quantized weights "
                                    f"({type(linear.quant_method).__name__}) are not supported")
    if getattr(linear, "skip_bias_add", False):
        raise UnsupportedModelError(f"{where}: {name} returns its bias to the caller "
                                    "(skip_bias_add), which is not supported")
    if linear.bias is not None and not bias_allowed:
        raise UnsupportedModelError(f"{where}: a bias in {name} is not supported")


def _dense(linear, input_major_copy: bool) -> torch.Tensor:
    kept = getattr(linear, _KEPT, None)
    if kept is not None:
        _check_current(linear, ("weight",))
        return kept
    weight = linear.weight.detach()
    if weight.numel() == 0:
        raise RuntimeError(
            f"{getattr(linear, 'prefix', 'a linear layer')}: vLLM repacked this weight and removed "
            "it before doe_kernels.vllm could keep it; create the LLM with "
            "worker_extension_cls='doe_kernels.vllm.WorkerExtension' so that the workers import "
            "doe_kernels.vllm before loading the model")
    return input_major(weight) if input_major_copy else weight
