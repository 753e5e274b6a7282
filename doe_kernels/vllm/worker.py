"""The vLLM worker side: `WorkerExtension`, mixed into every worker, plugs experts into its shard.

vLLM appends the class named by `worker_extension_cls` to its worker class, so these methods run in
every rank through `llm.collective_rpc`. A swap takes two calls: `doe_check_mask` validates the
mask against the rank's model and stages the rank's plan (local kept indices, scales and bias
deltas, on the model's device and in its dtype; nothing changes yet), then `doe_apply_mask` makes
the staged plan current. A plugged MLP gets an instance `forward` that runs
`doe_kernels.ops.gather_swiglu_ffn` on the rank's kept neurons and then the all-reduce vLLM's
RowParallelLinear does; layers that keep every neuron (no scales, no bias delta) keep vLLM's own
forward. The shared weights are never modified: a swap moves index tensors only.
"""
import json

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from vllm.config import CompilationMode, CUDAGraphMode
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from doe_kernels.mask import ExpertMask
from doe_kernels.models import ModelSpec, UnsupportedModelError
from doe_kernels.ops import gather_swiglu_ffn
from doe_kernels.tensor_parallel import FfnShard, ffn_shards
from doe_kernels.vllm.weights import FfnWeights, ffn_weights, keep_dense_ffn_weights

keep_dense_ffn_weights()  # workers import this module before they load the model


def encode_mask(mask: ExpertMask) -> tuple[bytes, str]:
    """A mask as (safetensors bytes, spec JSON): what collective_rpc carries intact."""
    return save_tensors(mask.tensors()), json.dumps(mask.spec)


def decode_mask(tensors: bytes, spec: str) -> ExpertMask:
    return ExpertMask.from_tensors(load_tensors(tensors), json.loads(spec))


def check_engine_config(vllm_config) -> None:
    """Raise RuntimeError unless the engine runs the model eagerly on one pipeline stage."""
    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode not in (
            None, CUDAGraphMode.NONE):
        raise RuntimeError(
            "doe_kernels.vllm.plug needs an eager engine: create the LLM with enforce_eager=True. "
            f"This one compiles the model (compilation mode {compilation.mode.name}, CUDA graphs "
            f"{getattr(compilation.cudagraph_mode, 'name', None)}), and the compiled graph would "
            "keep running the dense FFN after a plug")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise RuntimeError("doe_kernels.vllm does not support pipeline parallelism yet "
                           "(pipeline_parallel_size > 1); use tensor_parallel_size")


class _RankPlan:
    """The pruned FFN of one MLP on this rank: its weights, the expert's local FfnShard on the
    weights' device and in their dtype, and whether this MLP all-reduces its output (vLLM's
    RowParallelLinear does when reduce_results is set and tp > 1)."""

    def __init__(self, mlp, weights: FfnWeights, shard: FfnShard):
        device, dtype = weights.w_gate.device, weights.w_gate.dtype
        down = mlp.down_proj
        self.weights = weights
        self.kept = shard.kept.to(device)
        self.scales = None if shard.scales is None else shard.scales.to(device, dtype)
        self.reduce_here = bool(down.reduce_results and down.tp_size > 1)
        # the bias delta is for the summed output: added after the all-reduce (on every rank, all
        # holding the sum), or by rank 0 alone when the sum is taken later
        delta = shard.bias_delta
        adds_delta = delta is not None and (self.reduce_here or down.tp_rank == 0)
        self.bias_delta = delta.to(device, dtype) if adds_delta else None


def _pruned_forward(mlp, x):
    """A vLLM LLaMA MLP on the plugged expert's neurons of this rank, then the all-reduce."""
    plan = mlp._doe_plan
    w = plan.weights
    out = gather_swiglu_ffn(x, w.w_gate, w.w_up, w.w_down_t, plan.kept, backend="auto",
                            check_indices=False, scales=plan.scales)
    if plan.reduce_here:
        out = tensor_model_parallel_all_reduce(out)
    return out if plan.bias_delta is None else out + plan.bias_delta


def _mlp_of(layer, index: int):
    """The layer's MLP if it is a vLLM LLaMA-style one (merged gate/up, SwiGLU, row-parallel
    down, unquantized, no biases); raises UnsupportedModelError naming what differs."""
    mlp = getattr(layer, "mlp", None)
    gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
    where = f"layer {index}'s MLP ({type(mlp).__name__})"
    if not (isinstance(gate_up, MergedColumnParallelLinear) and isinstance(down, RowParallelLinear)
            and len(gate_up.output_sizes) == 2
            and gate_up.output_sizes[0] == gate_up.output_sizes[1]):
        raise UnsupportedModelError(f"{where} is not a LLaMA-style MLP (merged gate_up_proj, "
                                    "row-parallel down_proj)")
    if not isinstance(getattr(mlp, "act_fn", None), SiluAndMul):
        raise UnsupportedModelError(f"{where}: only SwiGLU (SiluAndMul) is supported")
    for linear in (gate_up, down):
        if not isinstance(linear.quant_method, UnquantizedLinearMethod):
            raise UnsupportedModelError(f"{where}: quantized weights "
                                        f"({type(linear.quant_method).__name__}) are not supported")
        if linear.bias is not None:
            raise UnsupportedModelError(f"{where}: MLP biases are not supported")
    return mlp


class WorkerExtension:
    """Methods vLLM mixes into each worker (`worker_extension_cls=
    "doe_kernels.vllm.WorkerExtension"`); call them through doe_kernels.vllm.plug / unplug."""

    def _doe_mlps(self) -> list:
        """The decoder layers' MLPs, in layer order (checked once, then cached)."""
        mlps = self.__dict__.get("_doe_mlps_cache")
        if mlps is None:
            layers = getattr(getattr(self.model_runner.model, "model", None), "layers", None)
            if not isinstance(layers, torch.nn.ModuleList):
                raise UnsupportedModelError(
                    f"{type(self.model_runner.model).__name__} has no `model.layers`; "
                    "doe_kernels.vllm supports the LLaMA family (Llama, Mistral, Qwen2)")
            mlps = [_mlp_of(layer, index) for index, layer in enumerate(layers)]
            self._doe_mlps_cache = mlps
        return mlps

    def _doe_spec(self, mlps) -> ModelSpec:
        config = self.vllm_config.model_config.hf_text_config
        heads = config.num_attention_heads
        return ModelSpec(
            family="llama", model_type=getattr(config, "model_type", "unknown"),
            num_layers=len(mlps), hidden_size=config.hidden_size,
            intermediate_size=mlps[0].gate_up_proj.output_sizes[0], num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)

    def doe_check_mask(self, tensors: bytes, spec: str, token: str) -> dict | None:
        """Validate an encoded mask on this rank and stage its plan under `token`; returns None,
        or {"error": message, "model": whether the model (not the mask) is the problem}."""
        self._doe_staged = None
        try:
            check_engine_config(self.vllm_config)
            mlps = self._doe_mlps()
            model_spec = self._doe_spec(mlps)
            weights = [ffn_weights(mlp) for mlp in mlps]
        except (UnsupportedModelError, RuntimeError) as error:
            return dict(error=str(error), model=True)
        try:
            down = mlps[0].down_proj
            shards = ffn_shards(decode_mask(tensors, spec), model_spec, down.tp_rank,
                                down.tp_size)
        except (ValueError, TypeError) as error:
            return dict(error=str(error), model=False)
        self._doe_staged = (token, [None if shard is None else _RankPlan(mlp, weight, shard)
                                    for mlp, weight, shard in zip(mlps, weights, shards)])
        return None

    def doe_apply_mask(self, token: str) -> int:
        """Make the plan staged under `token` current; returns the number of pruned layers."""
        staged = self.__dict__.get("_doe_staged")
        if staged is None or staged[0] != token:
            raise RuntimeError("no mask was checked under this token on this rank "
                               "(call doe_kernels.vllm.plug, not the worker methods)")
        self._doe_staged = None
        for mlp, plan in zip(self._doe_mlps(), staged[1]):
            _set_plan(mlp, plan)
        return sum(plan is not None for plan in staged[1])

    def doe_discard_mask(self) -> None:
        """Drop a staged plan (another rank refused the mask)."""
        self._doe_staged = None

    def doe_unplug(self) -> int:
        """Give every MLP vLLM's own forward back; returns the number of layers restored."""
        self._doe_staged = None
        restored = sum("forward" in mlp.__dict__ for mlp in self._doe_mlps())
        for mlp in self._doe_mlps():
            _set_plan(mlp, None)
        return restored

    def doe_status(self) -> dict:
        """This rank's tensor-parallel place and, per layer, its local kept neuron count (None:
        vLLM's dense forward)."""
        mlps = self._doe_mlps()
        down = mlps[0].down_proj
        return dict(rank=down.tp_rank, world_size=down.tp_size,
                    local_neurons=down.input_size_per_partition,
                    kept=[int(mlp._doe_plan.kept.numel()) if "forward" in mlp.__dict__ else None
                          for mlp in mlps])


def _set_plan(mlp, plan: _RankPlan | None) -> None:
    """Point an MLP at a plan (instance forward), or back at vLLM's class forward (None)."""
    if plan is None:
        mlp.__dict__.pop("forward", None)
        mlp.__dict__.pop("_doe_plan", None)
        return
    mlp._doe_plan = plan
    mlp.forward = _pruned_forward.__get__(mlp)
