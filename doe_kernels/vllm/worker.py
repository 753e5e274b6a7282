"""The vLLM worker side: `WorkerExtension`, mixed into every worker, plugs experts into its shard.

vLLM appends the class named by `worker_extension_cls` to its worker class, so these methods run in
every rank through `llm.collective_rpc`. A swap takes two calls: `doe_check_mask` validates the
mask against the rank's model and stages the rank's plan (local kept neurons and heads, scales and
bias deltas, on the model's device and in its dtype; nothing changes yet), then `doe_apply_mask`
makes the staged plan current: a pruned MLP gets an instance `forward` (doe_kernels.vllm.ffn), a
MoE block keeping fewer experts one that routes among its kept experts (doe_kernels.vllm.moe), a
pruned attention instance `forward`s of its qkv_proj and o_proj (doe_kernels.vllm.attention); on
a compiled engine these become the targets of the modules' routes (doe_kernels.vllm.routes).
Layers that keep everything (no scales, no bias delta) keep vLLM's own forwards. Experts held
under names for mixed-task batches (`doe_add_expert`, staged the same way) give every layer the
mixed forwards of doe_kernels.vllm.mixed, which serve each step's rows on their own experts and
the rest on the plugged plan. The shared weights are never modified: a swap moves index tensors
only.
"""
import inspect
import logging

from vllm.config import CUDAGraphMode

from doe_kernels.models import (ModelSpec, UnsupportedModelError, check_model_type, llama,
                                mixtral)
from doe_kernels.tensor_parallel import ffn_shards, head_shards
from doe_kernels.vllm.attention import AttentionPlan, attention_of
from doe_kernels.vllm.ffn import FfnPlan, ffn_of
from doe_kernels.vllm.mixed import (MixedAttention, MixedFfn, check_runner, named_experts,
                                     watch_steps)
from doe_kernels.vllm.moe import MixedMoe, MoePlan, is_moe_block, moe_plans, routing_sizes
from doe_kernels.vllm.protocol import decode_mask
from doe_kernels.vllm.routes import (compiles, decoder_layers, dense_forward,
                                     route_compiled_models, route_of)
from doe_kernels.vllm.weights import (attention_weights, copies_a_reload_misses,
                                      drop_cached_weights, ffn_weights, keep_dense_weights)

# workers import this module before they load the model
keep_dense_weights()
route_compiled_models()

STAGED = 4  # plans staged per rank (swaps checked, not yet applied): the oldest goes past it


def check_engine_config(vllm_config) -> None:
    """Raise RuntimeError for an engine that captures CUDA graphs, runs pipeline parallel or in
    micro-batches (the model run once per slice of a step's tokens, in threads of its own: the
    step's layout describes all of them). Eager and compiled engines are both served (compiled ones through routes.py). An engine
    captures graphs when its cudagraph_mode is not NONE and it has sizes to capture (the CPU
    platform empties them), compiled or not: without compilation vLLM still captures whole
    decode steps (FULL_DECODE_ONLY)."""
    config = vllm_config.compilation_config
    mode = config.cudagraph_mode
    if mode not in (None, CUDAGraphMode.NONE) and config.cudagraph_capture_sizes:
        raise RuntimeError(
            "doe_kernels.vllm.plug cannot swap experts inside captured CUDA graphs (this engine "
            f"captures them: cudagraph_mode {mode.name}): create the LLM with "
            "compilation_config={'cudagraph_mode': 'NONE'} (compiled, no graphs) or "
            "enforce_eager=True")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise RuntimeError("doe_kernels.vllm does not support pipeline parallelism yet "
                           "(pipeline_parallel_size > 1); use tensor_parallel_size")
    if getattr(vllm_config.parallel_config, "use_ubatching", False):
        raise RuntimeError("doe_kernels.vllm does not support micro-batching (enable_dbo, or "
                           "ubatch_size > 1)")


class WorkerExtension:
    """Methods vLLM mixes into each worker (`worker_extension_cls=
    "doe_kernels.vllm.WorkerExtension"`); call them through doe_kernels.vllm.plug / unplug."""

    def _doe_layers(self) -> list:
        """(attention, FFN) of each decoder layer, in layer order (the FFN: an MLP or a MoE
        block; checked once, then cached)."""
        layers = self.__dict__.get("_doe_layers_cache")
        if layers is None:
            modules = decoder_layers(self.model_runner.model)
            if modules is None:
                raise UnsupportedModelError(
                    f"{type(self.model_runner.model).__name__} has no `model.layers`; "
                    "doe_kernels.vllm supports the LLaMA family (Llama, Mistral, Qwen2) and "
                    "Mixtral")
            layers = [(attention_of(layer, index), ffn_of(layer, index))
                      for index, layer in enumerate(modules)]
            if len({is_moe_block(ffn) for _, ffn in layers}) > 1:
                raise UnsupportedModelError("models whose layers mix MLPs and MoE blocks are not "
                                            "supported")
            check_model_type(type(self.model_runner.model).__name__,
                             _model_type(self.vllm_config.model_config),
                             mixtral if is_moe_block(layers[0][1]) else llama)
            _watch_reloads(self)
            self._doe_layers_cache = layers
        return layers

    def _doe_check_routes(self, layers) -> None:
        """On a compiled engine, every MLP and projection must have been routed at load, and
        its compiled graph must call the routes (vLLM runs the model once at start-up)."""
        if not compiles(self.vllm_config):
            return
        for index, (attn, mlp) in enumerate(layers):
            routes = [route_of(m) for m in (mlp, attn.qkv_proj, attn.o_proj)]
            if any(route is None for route in routes):
                raise RuntimeError(
                    f"this engine compiles its model, but layer {index} was not routed for "
                    "doe_kernels when it was loaded (a model loader that bypasses vLLM's "
                    "process_weights_after_loading?); create the LLM with enforce_eager=True")
            if not all(route.calls for route in routes):
                raise RuntimeError(
                    f"this engine's compiled model never calls layer {index}'s doe_kernels "
                    "routes: it was loaded from vLLM's compile cache of a run without the "
                    "doe_kernels worker extension, and a plugged expert would not be served; "
                    "clear that cache (VLLM_CACHE_ROOT's torch_compile_cache) or create the LLM "
                    "with enforce_eager=True")

    def _doe_spec(self, layers) -> ModelSpec:
        config = self.vllm_config.model_config.hf_text_config
        heads, ffn = config.num_attention_heads, layers[0][1]
        if is_moe_block(ffn):  # as doe_kernels.models.mixtral describes the HuggingFace model
            family, intermediate = "mixtral", config.intermediate_size
            experts, top_k = routing_sizes(ffn)
        else:
            family, intermediate = "llama", ffn.gate_up_proj.output_sizes[0]
            experts, top_k = 0, 0
        return ModelSpec(
            family=family, model_type=getattr(config, "model_type", "unknown"),
            num_layers=len(layers), hidden_size=config.hidden_size,
            intermediate_size=intermediate, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            num_experts=experts, top_k=top_k)

    def doe_check_mask(self, tensors: str, spec: str, token: str,
                       mixed: bool = False) -> dict | None:
        """Validate a mask (as doe_kernels.vllm.protocol.encode_mask encodes it) on this rank and
        stage its plan under `token`; returns None, or {"error": message, "model": whether the
        model (not the mask) is the problem}. `mixed` (the mask is to be held for mixed-task
        batches): also prepare the dense weights the mixed forwards of every layer read, so that
        running out of memory for them refuses the mask on every rank, before any changes.
        Plans staged under other tokens (other callers' swaps) stay staged."""
        self._doe_staged().pop(token, None)
        try:
            check_engine_config(self.vllm_config)
            if mixed:  # (what doe_add_expert will wrap: refused before any rank changes)
                check_runner(self.model_runner)
            layers = self._doe_layers()
            self._doe_check_routes(layers)
            model_spec = self._doe_spec(layers)
        except (UnsupportedModelError, RuntimeError) as error:
            return dict(error=str(error), model=True)
        try:
            mask = decode_mask(tensors, spec)
            shards = _shards(layers, model_spec, mask)
        except (ValueError, TypeError) as error:
            return dict(error=str(error), model=False)
        try:
            plans = _plans(layers, model_spec, mask, shards, mixed)
        except (UnsupportedModelError, RuntimeError) as error:  # out of memory too
            return dict(error=str(error), model=True)
        self._doe_stage(token, plans, mask)
        return None

    def _doe_staged(self) -> dict:
        """token -> (plans, mask) checked and not yet applied or discarded, oldest first."""
        return self.__dict__.setdefault("_doe_staged_plans", {})

    def _doe_stage(self, token: str, plans: list, mask) -> None:
        staged = self._doe_staged()
        staged[token] = (plans, mask)
        while len(staged) > STAGED:  # a caller that never applied nor discarded its swap
            del staged[next(iter(staged))]

    def _doe_take_staged(self, token: str) -> tuple[list, object]:
        """(the plans staged under `token`, their mask)."""
        staged = self._doe_staged().pop(token, None)
        if staged is None:
            raise RuntimeError(
                "no mask is staged under this token on this rank (it was discarded, "
                f"{STAGED} other swaps were checked since, or a weight reload dropped it; call "
                "doe_kernels.vllm.plug or add, not the worker methods)")
        return staged

    def _doe_held(self) -> dict:
        """The experts held under names (doe_kernels.vllm.add): name -> per-layer plans; the
        retiring ones too."""
        return self.__dict__.setdefault("_doe_held_plans", {})

    def _doe_retiring(self) -> set:
        """Names removed while requests the rank still holds named them (a request aborted
        between steps, say): still served, no longer listed, dropped once no request names
        them (`_doe_drop_retired`)."""
        return self.__dict__.setdefault("_doe_retiring_names", set())

    def _doe_watch(self) -> None:
        watch_steps(self.model_runner, lambda requested: requested in self._doe_held(),
                    self._doe_drop_retired)

    def _doe_drop_retired(self) -> None:
        """After each step: stop holding the retiring experts no request names any longer (one
        that cannot be dropped now, out of memory building the forwards, say, waits for the
        next step)."""
        retiring = self._doe_retiring()
        if not retiring:
            return
        done = retiring - named_experts(self.model_runner)
        if not done:
            return
        try:
            self._doe_install(self._doe_singles(), {name: plans for name, plans
                                                    in self._doe_held().items()
                                                    if name not in done})
        except Exception as error:  # noqa: BLE001 (the step itself went well: keep serving)
            logging.getLogger(__name__).warning(
                "doe_kernels: could not drop the removed experts %s yet (%r); trying again "
                "after the next step", sorted(done), error)
            return
        retiring -= done
        for name in done:
            self._doe_masks().pop(name, None)

    def _doe_masks(self) -> dict:
        """The mask of each plan in use, to build it again after a weight reload: under None the
        plugged expert's, under its name each held expert's."""
        return self.__dict__.setdefault("_doe_masks_in_use", {})

    def doe_replan(self) -> None:
        """Build every plan in use again from its mask, on the weights as they are now: after
        vLLM reloads the weights in place (`reload_weights`, wrapped to call this), the dense
        copies the plans read were the old weights'. Plans staged and not yet applied are dropped
        (their apply fails, saying so): they were built on the old weights."""
        self._doe_staged().clear()
        layers = self._doe_layers()
        for attn, ffn in layers:
            drop_cached_weights(attn, ffn)
        spec = self._doe_spec(layers)
        masks = dict(self._doe_masks())
        plugged = masks.pop(None, None)
        singles = ([(None, None)] * len(layers) if plugged is None
                   else _plans(layers, spec, plugged, _shards(layers, spec, plugged), False))
        held = {name: _plans(layers, spec, mask, _shards(layers, spec, mask), True)
                for name, mask in masks.items()}
        self._doe_install(singles, held)

    def _doe_install(self, singles: list, held: dict | None = None) -> None:
        """Set every layer's forwards: `singles` (per layer, the plugged (attention, FFN) plans)
        with the experts `held` (by default those held now), which become the ones held. Every
        layer's forwards are built before any is set: an error leaves the rank as it was."""
        held = self._doe_held() if held is None else held
        layers = self._doe_layers()
        forwards = [_forwards_of(attn, mlp, attn_plan, ffn_plan,
                                 {name: plans[index] for name, plans in held.items()})
                    for index, ((attn, mlp), (attn_plan, ffn_plan)) in enumerate(
                        zip(layers, singles))]
        self._doe_held_plans = held
        for (attn, mlp), (attn_plan, ffn_plan), layer_forwards in zip(layers, singles, forwards):
            _set_plans(attn, mlp, attn_plan, ffn_plan, layer_forwards)

    def _doe_singles(self) -> list:
        return [(_plan_of(attn.o_proj), _plan_of(mlp)) for attn, mlp in self._doe_layers()]

    def doe_apply_mask(self, token: str) -> int:
        """Make the plan staged under `token` current; returns the number of pruned layers."""
        plans, mask = self._doe_take_staged(token)
        self._doe_install(plans)
        self._doe_masks()[None] = mask
        return sum(attn_plan is not None or ffn_plan is not None for attn_plan, ffn_plan in plans)

    def doe_add_expert(self, name: str, token: str) -> int:
        """Hold the plan staged under `token` as the expert `name` (replacing one of that name),
        for the requests that name it; returns the number of layers it prunes."""
        self._doe_watch()
        plans, mask = self._doe_take_staged(token)
        self._doe_install(self._doe_singles(), {**self._doe_held(), name: plans})
        self._doe_masks()[name] = mask
        self._doe_retiring().discard(name)
        return sum(attn_plan is not None or ffn_plan is not None for attn_plan, ffn_plan in plans)

    def doe_remove_expert(self, name: str) -> bool:
        """Stop holding the expert `name`; returns whether it was held. While requests this
        rank holds still name it (ones aborted since the last step), it retires instead: no
        longer listed, still serving them until they are gone."""
        if name not in self._doe_held() or name in self._doe_retiring():
            return False
        if name in named_experts(self.model_runner):
            self._doe_retiring().add(name)
            return True
        held = dict(self._doe_held())
        del held[name]
        self._doe_install(self._doe_singles(), held)
        self._doe_masks().pop(name, None)
        return True

    def doe_experts(self) -> list:
        """The names of the experts held, in the order they were added (retiring ones not)."""
        return [name for name in self._doe_held() if name not in self._doe_retiring()]

    def doe_discard_mask(self, token: str | None = None) -> None:
        """Drop the plan staged under `token` (a swap refused on another rank, or failed), or
        every staged plan (None)."""
        if token is None:
            self._doe_staged().clear()
        else:
            self._doe_staged().pop(token, None)

    def doe_unplug(self) -> int:
        """Give every layer vLLM's own forwards back; returns the number of layers restored (0,
        its layers unchecked, on a rank nothing was ever plugged into or held on)."""
        if "_doe_layers_cache" not in self.__dict__:
            return 0
        restored = sum(attn_plan is not None or ffn_plan is not None
                       for attn_plan, ffn_plan in self._doe_singles())
        self._doe_install([(None, None)] * len(self._doe_layers()))
        self._doe_masks().pop(None, None)
        return restored

    def doe_status(self) -> dict:
        """This rank's tensor-parallel place, the names of the experts it holds and, per layer,
        the plugged expert's local kept neuron (in a MoE block: inside every expert) and head
        counts and its kept MoE experts (None: vLLM's dense forward, or everything kept); on a
        model doe_kernels does not support, {"error": why}."""
        try:
            layers = self._doe_layers()
        except UnsupportedModelError as error:
            return {"error": str(error)}
        rank, world_size = _tensor_parallel_place(layers)
        ffn, attn = layers[0][1], layers[0][0]
        return dict(rank=rank, world_size=world_size, experts=self.doe_experts(),
                    local_neurons=_local_neurons(ffn),
                    local_heads=attn.q_size // attn.head_dim,
                    kept=[_kept_neurons(mlp) for _, mlp in layers],
                    kept_heads=[None if _plan_of(a.o_proj) is None
                                else int(_plan_of(a.o_proj).cols.numel()) // a.head_dim
                                for a, _ in layers],
                    kept_experts=[_kept_experts(block) for _, block in layers])


# The model type of a checkpoint in Mistral's own format (params.json, `--config-format
# mistral`), which vLLM's config calls "transformer", by its architecture
_MISTRAL_FORMAT = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}


def _model_type(model_config) -> str | None:
    """The HuggingFace model type of the engine's model (its text model's)."""
    model_type = getattr(model_config.hf_text_config, "model_type", None)
    if model_type == "transformer":
        for architecture in getattr(model_config, "architectures", None) or []:
            if architecture in _MISTRAL_FORMAT:
                return _MISTRAL_FORMAT[architecture]
    return model_type


def _shards(layers, model_spec: ModelSpec, mask) -> tuple[list, list]:
    """(per layer: this rank's FFN shard of `mask`, its heads' shard); ValueError or TypeError
    when the mask does not fit."""
    if model_spec.num_experts and mask.skip:  # as patch(..., dynamic_skip=True) needs them
        mask.check_skip_everywhere(model_spec.num_layers, "the mask skips experts")
    rank, world_size = _tensor_parallel_place(layers)
    return (ffn_shards(mask, model_spec, rank, world_size),
            head_shards(mask, model_spec, rank, world_size))


def _plans(layers, model_spec: ModelSpec, mask, shards: tuple, mixed: bool) -> list:
    """Per layer: (AttentionPlan or None, FfnPlan / MoePlan or None) of `mask`, whose rank's
    `shards` `_shards` gave; with `mixed` (an expert held for mixed-task batches), also the
    dense weights the mixed forwards of every layer read. UnsupportedModelError or RuntimeError
    (out of memory too) when the model cannot serve it."""
    ffn, heads = shards
    if model_spec.num_experts:
        ffn_plans = moe_plans([block for _, block in layers], mask, ffn)
    else:
        ffn_plans = [None if f is None else FfnPlan(mlp, ffn_weights(mlp), f)
                     for (_, mlp), f in zip(layers, ffn)]
    plans = [(None if h is None else AttentionPlan(attn, attention_weights(attn), h), ffn_plan)
             for (attn, _), h, ffn_plan in zip(layers, heads, ffn_plans)]
    if mixed:
        for attn, mlp in layers:
            attention_weights(attn)
            if not model_spec.num_experts:
                ffn_weights(mlp)
    return plans


def _watch_reloads(worker) -> None:
    """Wrap the worker's `model_runner.reload_weights` and its `finish_weight_update` (vLLM's
    weight transfer for RL trainers: `LLM.start_weight_update`, `update_weights`,
    `finish_weight_update`, which bypasses reload_weights) as instance attributes (the extension
    comes after the worker class, so a method could not override them; collective_rpc finds
    them first), so that, after vLLM loads new weights in place, every plan in use is built again
    on them (`doe_replan`). A reload in kernel format is refused, before anything is loaded,
    where the rank keeps copies of weights that vLLM repacked (the CPU's): it would write vLLM's
    parameters only."""
    _replan_after(worker, "finish_weight_update")
    runner = worker.model_runner
    reload = getattr(runner, "reload_weights", None)
    if reload is None or getattr(reload, "_doe_replans", False):
        return

    def reloading(*args, **kwargs):
        if not _checkpoint_format(reload, args, kwargs):
            missed = copies_a_reload_misses(runner.model)
            if missed:
                raise ValueError(
                    f"doe_kernels keeps copies of {len(missed)} layers' weights that vLLM "
                    f"repacked (the first: {missed[0]}), which a reload in kernel format would "
                    "leave as they were; reload in checkpoint format "
                    "(is_checkpoint_format=True, the default)")
        try:
            return reload(*args, **kwargs)
        finally:
            worker.doe_replan()

    reloading._doe_replans = True
    runner.reload_weights = reloading


def _replan_after(worker, method: str) -> None:
    """Wrap `worker.<method>` (where the worker has it) so that `doe_replan` runs after it, also
    when it fails midway (some weights may be new); not after a draft model's update (vLLM's
    `start_draft_weight_update`: the served model's weights are as they were)."""
    call = getattr(worker, method, None)
    if call is None or getattr(call, "_doe_replans", False):
        return

    def replanning(*args, **kwargs):
        draft = getattr(worker, "_weight_update_is_draft", False)
        try:
            return call(*args, **kwargs)
        finally:
            if not draft:
                worker.doe_replan()

    replanning._doe_replans = True
    setattr(worker, method, replanning)


def _checkpoint_format(reload, args: tuple, kwargs: dict) -> bool:
    """The `is_checkpoint_format` a call of vLLM's `reload_weights` passes (default True)."""
    try:
        bound = inspect.signature(reload).bind(*args, **kwargs)
    except TypeError:  # vLLM will say what is wrong with the call
        return True
    return bool(bound.arguments.get("is_checkpoint_format", True))


def _tensor_parallel_place(layers) -> tuple[int, int]:
    """(rank, world size) of this worker, as its first attention's row-parallel o_proj has it."""
    o_proj = layers[0][0].o_proj
    return o_proj.tp_rank, o_proj.tp_size


def _local_neurons(ffn) -> int:
    """The neurons of this rank's shard of an MLP, or of each expert of a MoE block."""
    if is_moe_block(ffn):
        return int(ffn.experts.moe_config.intermediate_size_per_partition)
    return int(ffn.down_proj.input_size_per_partition)


def _kept_neurons(module) -> int | None:
    """The plugged plan's local kept neurons of an MLP or inside a MoE block's experts."""
    plan = _plan_of(module)
    neurons = plan.kept if isinstance(plan, FfnPlan) else getattr(plan, "neurons", None)
    return None if neurons is None else int(neurons.numel())


def _kept_experts(module) -> int | None:
    """The plugged plan's kept experts of a MoE block."""
    plan = _plan_of(module)
    return int(plan.kept.numel()) if isinstance(plan, MoePlan) else None


def _plan_of(module):
    return module.__dict__.get("_doe_plan")


def _set_forward(module, forward) -> None:
    """Point a module at `forward`, or back at its dense forward (None): through its route on a
    compiled engine (routes.py), else as an instance forward."""
    route = route_of(module)
    if forward is None:
        if route is None:
            module.__dict__.pop("forward", None)
        else:
            route.reset()
    elif route is None:
        module.forward = _returning_bias(module, forward)
    else:
        route.target = forward


def _keep_plan(module, plan) -> None:
    if plan is None:
        module.__dict__.pop("_doe_plan", None)
    else:
        module._doe_plan = plan


def _dense_of(module, returns_bias: bool = False):
    route = route_of(module)
    return route.dense if route is not None else dense_forward(module, returns_bias)


def _forwards_of(attn, mlp, attn_plan: AttentionPlan | None,
                 ffn_plan: FfnPlan | MoePlan | None, held: dict) -> tuple:
    """One layer's (MLP, qkv_proj, o_proj) forwards (None: vLLM's own): the plugged plans alone,
    or with the experts `held` ({name: (attention plan, FFN plan)}) the mixed forwards that read
    each step's layout. Builds them only: nothing is set."""
    if not held:
        return (None if ffn_plan is None else ffn_plan.forward,
                None if attn_plan is None else attn_plan.qkv,
                None if attn_plan is None else attn_plan.o)
    mixed_ffn = MixedMoe if is_moe_block(mlp) else MixedFfn
    ffn = mixed_ffn(mlp, ffn_plan, {name: plans[1] for name, plans in held.items()},
                    _dense_of(mlp))
    heads = MixedAttention(attn, attn_plan, {name: plans[0] for name, plans in held.items()},
                           _dense_of(attn.qkv_proj, attn.qkv_proj.return_bias),
                           _dense_of(attn.o_proj, attn.o_proj.return_bias))
    return ffn.forward, heads.qkv, heads.o


def _set_plans(attn, mlp, attn_plan: AttentionPlan | None, ffn_plan: FfnPlan | MoePlan | None,
               forwards: tuple) -> None:
    """Keep one layer's plugged plans on its modules and set its (MLP, qkv_proj, o_proj)
    forwards (`_forwards_of`)."""
    for module, plan in ((mlp, ffn_plan), (attn.qkv_proj, attn_plan), (attn.o_proj, attn_plan)):
        _keep_plan(module, plan)
    for module, forward in zip((mlp, attn.qkv_proj, attn.o_proj), forwards):
        _set_forward(module, forward)


def _returning_bias(linear, compute):
    """A forward with vLLM's linear return convention: (output, None) when the layer returns
    its bias (return_bias; never with skip_bias_add here), else the output."""
    if not getattr(linear, "return_bias", False):
        return compute
    return lambda x: (compute(x), None)
