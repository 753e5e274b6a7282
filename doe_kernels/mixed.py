"""Mixed-task batches: one forward pass serves sequences of several experts, each on its own.

`with mixed(model, masks): model(...)` runs batch sequence b on `masks[b]` (an ExpertMask; None
keeps the whole model): consecutive sequences on the same mask form a segment, each layer's FFN
runs the segmented gather ops over them and its attention runs each segment on its own heads
(models/segments.py). The body may run any number of forward passes of that batch composition,
`generate()` with its KV cache included. A model that is not patched is patched for the body (a
keep-everything mask) and unpatched after; a patched one gets its expert back.

`mixed_logits(model, tokenizer, requests)` does the same for whole experts: each request
`(expert, text)` gets its expert's soft prompt, classifier head (or label words) and mask, and
its label logits come back in request order. Requests of similar length share a forward pass
(up to `batch_size`, whatever their experts), which runs its layers on the real tokens only.
Experts with different label counts may share a batch.
"""
import contextlib
import functools

import torch
from torch.nn.utils.rnn import pad_sequence

from doe_kernels.caller_state import chunk_holders, lasting
from doe_kernels.expert import (CAUSAL_LM, Expert, NoTokenError, check_batch_size, label_logits,
                                real_positions)
from doe_kernels.mask import KEEP_ALL, ExpertMask
from doe_kernels.models import PATCH_STATE_ATTR, UnsupportedModelError, describe, spec_of
from doe_kernels.models.segments import LayerSegments, RealTokens, SegmentPlan, merge_runs
from doe_kernels.patching import (
    _model_device,
    _plans,
    cast_vectors,
    patch,
    plugged_state,
    restoring,
    unwrap_compiled,
)


def _as_masks(masks) -> list[ExpertMask]:
    if isinstance(masks, ExpertMask) or not hasattr(masks, "__iter__"):
        raise TypeError("masks must be a list with one ExpertMask (or None) per batch sequence, "
                        f"got {type(masks).__name__}")
    masks = [KEEP_ALL if m is None else m for m in masks]
    if not masks:
        raise ValueError("masks is empty: give one ExpertMask (or None) per batch sequence")
    for i, mask in enumerate(masks):
        if not isinstance(mask, ExpertMask):
            raise TypeError(f"masks[{i}] is a {type(mask).__name__}, not an ExpertMask or None")
    return masks


@functools.lru_cache(maxsize=8)
def _whole_model_skipping(num_layers: int) -> ExpertMask:
    """The whole model under dynamic skipping: every expert, thresholds of 0 (nothing skipped);
    one mask per layer count, so that its plans are built once."""
    return KEEP_ALL.with_skip({layer: 0.0 for layer in range(num_layers)})


def _runs(items: list) -> list[tuple[int, int, object]]:
    """(start, stop, item) of each run of consecutive identical (`is`) items."""
    return merge_runs(((i, i + 1, item) for i, item in enumerate(items)),
                      lambda a, b: a is b)


def _layer_segments(masks, spec, device, dtype, dynamic_skip: bool) -> list[LayerSegments]:
    """Per layer, the segments of `masks` (validated against `spec` here, before any change)."""
    runs = _runs(masks)
    plans = {id(mask): _plans(mask, spec, device, dynamic_skip) for _, _, mask in runs}
    bounds = [start for start, _, _ in runs] + [len(masks)]
    out = []
    for layer in range(spec.num_layers):
        segment_plans = []
        for _, _, mask in runs:
            kept, selection, moe, *vectors = plans[id(mask)][layer]
            segment_plans.append(SegmentPlan(kept, selection, *cast_vectors(vectors, dtype),
                                             moe=moe))
        out.append(LayerSegments(bounds, segment_plans, spec.intermediate_size))
    return out


@contextlib.contextmanager
def mixed(model, masks, backend: str = "auto", attention_mask=None, pack_layers: bool = False,
          dynamic_skip: bool = False):
    """While the body runs, batch sequence b of every forward pass computes on `masks[b]` (one
    ExpertMask, or None for the whole model, per sequence). Every mask is checked against the
    model before anything changes; a forward pass whose batch has another number of sequences
    raises ValueError. In a mixture-of-experts model each sequence is routed among its mask's
    kept experts; `dynamic_skip` is `patch`'s, for every mask (each then needs its skipping
    thresholds; None, the whole model, skips nothing). On exit the model is what it was:
    unpatched, or patched with its expert, backend and skipping. One thread at a time per model
    (the router serialises its forward passes).

    `attention_mask` (optional; (batch, tokens) of 0s and 1s, the mask of the padded batch the body
    runs): a forward pass of the model given that same mask computes the FFNs and the attention's
    projections of the real tokens only, and on the CPU the attention itself too (each sequence over
    its own real tokens); the padding's positions get zeros from them (from an FFN with a bias
    delta, the delta alone; no real token attends to them). Other passes (a generation's decoding
    steps, another batch) compute every position, and so does a pass returning a mixture-of-experts
    model's router logits (`output_router_logits`; transformers reads them padded). With
    `pack_layers` a pass on the real tokens also runs the layers' norms and residuals over them
    only: the first layer's input is packed to (1, real tokens, hidden) and the last layer's output
    unpacked, so the model's outputs keep their shapes, but hooks on the layers and the intermediate
    hidden states (output_hidden_states) see the packed layout (refused, ValueError, for a model
    whose FFN runs in chunks of tokens: chunk_size_feed_forward > 0 in its config or a layer).
    A model that reads a padding position (a BERT classifier's first token, left-padded) reads
    what `mixed` leaves there, not what the model alone computes there."""
    for name, flag in (("pack_layers", pack_layers), ("dynamic_skip", dynamic_skip)):
        if not isinstance(flag, bool):  # (a string "no" would turn it on)
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    masks = _as_masks(masks)
    real = _real_tokens(attention_mask, len(masks))
    given, model = model, unwrap_compiled(model)
    state = getattr(model, PATCH_STATE_ATTR, None)
    if state is not None and state.mixed:
        raise RuntimeError("the model already serves a mixed batch (doe_kernels.mixed does not "
                           "nest)")
    if pack_layers and real is not None and chunks_feed_forward(model):
        raise ValueError("pack_layers cannot serve a model whose FFN runs in chunks of tokens "
                         "(config.chunk_size_feed_forward > 0): leave pack_layers off")
    spec = spec_of(model)
    if dynamic_skip and spec.num_experts:
        whole = _whole_model_skipping(spec.num_layers)
        masks = [whole if m is KEEP_ALL else m for m in masks]
    layers = describe(model)[1] if state is None else [p.layer for p in state.layers]
    device, dtype = _model_device(layers)
    with lasting():  # (reused by every pass of the body, also one that trains)
        segments = _layer_segments(masks, spec, device, dtype, dynamic_skip)  # checks each mask
        real = None if real is None else RealTokens(real.to(device), pack_layers)
    previous = plugged_state(model)
    patch(model, KEEP_ALL if state is None else state.mask, backend)
    state = getattr(model, PATCH_STATE_ATTR)

    hooks = [] if real is None else _real_token_hooks(model, real, state.layers)

    def clear():
        state.mixed = False  # (first: a failure below leaves a model that unpatch still takes)
        for hook in hooks:
            hook.remove()
        for layer_patch in state.layers:
            layer_patch.set_segments(None)

    with restoring(model, previous, clear):
        if not all(layer_patch.mixed_run for layer_patch in state.layers):
            raise UnsupportedModelError(f"{type(model).__name__}'s layers do not serve mixed-task "
                                        "batches")
        for layer_patch, layer_segments in zip(state.layers, segments):
            layer_segments.real = real
            layer_patch.set_segments(layer_segments)
        state.mixed = True
        yield given


def _real_token_hooks(model, real: RealTokens, layers) -> list:
    """Hooks on `model` that mark `real` active during a forward pass given its attention mask
    (a keyword, or the second positional argument, as transformers' models take it), and on
    its first and last patched `layers` that pack and unpack the hidden states of such a pass
    when `real.pack_layers`."""
    def before(module, args, kwargs):
        real.active = (not _router_logits_asked(model, kwargs) and not _checkpointing(model)
                       and real.matches(kwargs.get("attention_mask",
                                                   args[1] if len(args) > 1 else None))
                       and _input_shape(args, kwargs) in (None, real.shape))

    def after(module, args, output):
        real.active = False

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, always_call=True)]  # also when the pass raises
    if real.pack_layers:
        hooks += [layers[0].layer.register_forward_pre_hook(_packer(real), with_kwargs=True),
                  layers[-1].layer.register_forward_hook(_unpacker(real))]
    return hooks


def _input_shape(args, kwargs) -> tuple | None:
    """(batch, tokens) of a forward pass's input_ids (or inputs_embeds), None where it has
    neither: a pass given the batch's attention mask but only its tokens past a filled KV cache
    is not the batch's pass."""
    for x in (kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return tuple(x.shape[:2])
    return None


def _checkpointing(model) -> bool:
    """Whether transformers' gradient checkpointing will run the layers again in the backward
    pass, after this pass ended (and its real-token marks with it): such a pass computes every
    position."""
    return (torch.is_grad_enabled() and model.training
            and bool(getattr(model, "is_gradient_checkpointing", False)))


def _router_logits_asked(model, kwargs) -> bool:
    """Whether a forward pass returns a mixture-of-experts model's router logits: it then computes
    every position, since transformers' load-balancing loss reads them in the padded layout."""
    asked = kwargs.get("output_router_logits")
    return bool(getattr(model.config, "output_router_logits", False) if asked is None else asked)


def _packer(real: RealTokens):
    """A pre-hook packing a layer's hidden states (its first argument, or `hidden_states`)."""
    def pack(module, args, kwargs):
        if not real.packing():
            return None
        if args:
            return (real.pack(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": real.pack(kwargs["hidden_states"])}
    return pack


def _unpacker(real: RealTokens):
    """A hook unpacking a layer's output (a tensor, or a tuple led by one)."""
    def unpack(module, args, output):
        if not real.packing():
            return None
        if isinstance(output, tuple):
            return (real.unpack(output[0]), *output[1:])
        return real.unpack(output)
    return unpack


def _real_tokens(attention_mask, batch: int):
    """`attention_mask` checked (None, or (batch, tokens) of 0s and 1s)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a (batch, tokens) tensor of 0s and 1s, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if attention_mask.shape[0] != batch:
        raise ValueError(f"attention_mask has {attention_mask.shape[0]} sequences, but there "
                         f"are {batch} masks (one per sequence)")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0s and 1s")
    return attention_mask


# ---- whole experts ----------------------------------------------------------------------------
def _as_requests(requests) -> tuple[list[Expert], list[str]]:
    requests = list(requests)
    experts, texts = [], []
    for i, request in enumerate(requests):
        if not isinstance(request, (tuple, list)) or len(request) != 2:
            raise ValueError(f"request {i} must be an (expert, text) pair, got {request!r:.80}")
        expert, text = request
        if not isinstance(expert, Expert):
            raise TypeError(f"request {i}: {type(expert).__name__} is not a doe_kernels.Expert")
        if not isinstance(text, str):
            raise TypeError(f"request {i}: the text is a {type(text).__name__}, not a str")
        experts.append(expert)
        texts.append(text)
    return experts, texts


def mixed_logits(model, tokenizer, requests, batch_size: int = 32,
                 backend: str = "auto") -> list[torch.Tensor]:
    """The label logits (a float32 CPU vector over the expert's labels) of each `(expert, text)`
    request, in order. Requests of similar length are served together, up to `batch_size` in
    one forward pass whatever their experts (`_batches`). Every request is checked first."""
    experts, texts = _as_requests(requests)
    if not experts:
        return []
    check_batch_size(batch_size)
    for expert in {id(e): e for e in experts}.values():
        expert.check_fits(model)  # also: its task type is the model's
    ids = _encoded(experts, texts, tokenizer)
    out = [None] * len(experts)
    with torch.no_grad():
        for chunk in _batches(experts, [len(i) for i in ids], batch_size):
            rows = _forward(model, tokenizer, [experts[i] for i in chunk],
                            [ids[i] for i in chunk], backend)
            for i, row in zip(chunk, rows):
                out[i] = row
    return out


def _encoded(experts: list[Expert], texts: list[str], tokenizer) -> list[torch.Tensor]:
    """Each request's token ids (1-D, without padding), as its expert encodes them (template,
    truncation); the texts of experts that encode alike in one tokenizer call. A text that
    encodes to no token raises NoTokenError naming its request (before any forward pass)."""
    groups: dict[tuple, list[int]] = {}
    for i, expert in enumerate(experts):
        groups.setdefault(_encoding(expert), []).append(i)
    ids = [None] * len(texts)
    for members in groups.values():
        try:
            batch, attention = experts[members[0]].encode(tokenizer, [texts[i] for i in members])
        except NoTokenError as error:
            raise NoTokenError(members[error.index], error.reason, "request") from None
        for row, i in enumerate(members):
            ids[i] = batch[row][attention[row].to(torch.bool)]
    return ids


def _encoding(expert: Expert) -> tuple:
    """What `Expert.encode` depends on: experts equal in it encode a text alike."""
    return (expert.task_type, expert.template, expert.max_length,
            tuple(expert.label_words or ()), tuple(expert.label_token_ids or ()))


def _batches(experts: list[Expert], token_counts: list[int], batch_size: int):
    """Request indices of each forward pass: the requests in order of length (their token counts
    and their experts' virtual tokens), `batch_size` a pass; within a batch, the requests
    grouped by expert (few segments). A pass runs its layers on the real tokens only
    (`mixed`'s pack_layers), so on the CPU padding costs no more than the embeddings and the head
    (a GPU attends padded to the batch's longest request, in one call per span): on 12
    batches of 8 requests of the five tasks (Intel Xeon, 2 threads) no padding limit ran 1.12-1.16x
    faster than one of as many padding tokens as real ones on all-MiniLM-L6-v2 (one pass a batch
    instead of two) and within the drift on SmolLM2-135M."""
    lengths = [n + e.num_virtual_tokens for n, e in zip(token_counts, experts)]
    rank = {}
    for expert in experts:
        rank.setdefault(id(expert), len(rank))
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [sorted(order[start:start + batch_size], key=lambda i: (rank[id(experts[i])], i))
            for start in range(0, len(order), batch_size)]


def chunks_feed_forward(model) -> bool:
    """Whether the model runs its FFNs in chunks of tokens (`chunk_holders`), which packed layers
    would cut across sequences."""
    return bool(chunk_holders(unwrap_compiled(model)))


def _forward(model, tokenizer, experts: list[Expert], ids: list[torch.Tensor], backend: str):
    """Each row's label logits for one batch (`ids`: each row's token ids, `_encoded`), its
    experts in runs of consecutive rows."""
    runs = _runs(experts)
    causal = experts[0].task_type == CAUSAL_LM
    pad_id = tokenizer.pad_token_id or 0  # padding's ids are never attended to
    inputs = [expert.model_inputs(model, *_padded(ids[start:stop], pad_id, left=causal))
              for start, stop, expert in runs]
    embeds, attention = _pad_and_stack(inputs, left=causal)
    kwargs = dict(logits_to_keep=1, position_ids=real_positions(attention)) if causal else {}
    with (mixed(model, [e.mask for e in experts], backend, attention,
                pack_layers=not chunks_feed_forward(model)),
          _mixed_heads(model, runs)):
        logits = model(inputs_embeds=embeds, attention_mask=attention, **kwargs).logits
    rows = []
    for start, stop, expert in runs:
        part = label_logits(logits[start:stop], expert.task_type, expert.label_token_ids)
        rows += list(part[:, :len(expert.label_names)].float().cpu())
    return rows


def _padded(ids: list[torch.Tensor], pad_id: int, left: bool):
    """(input_ids, attention_mask) of rows of token ids padded to the longest (on the left for
    a causal LM, else on the right), as the tokenizer pads them."""
    side = "left" if left else "right"
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id, padding_side=side)
    attention = pad_sequence([torch.ones_like(row) for row in ids], batch_first=True,
                             padding_side=side)
    return input_ids, attention


def _pad_and_stack(inputs: list[dict], left: bool):
    """(inputs_embeds, attention_mask) of the runs' model inputs padded to one length (on the left
    for a causal LM, whose answer is read at the last position; else on the right)."""
    length = max(i["inputs_embeds"].shape[1] for i in inputs)
    embeds, masks = [], []
    for item in inputs:
        e, m = item["inputs_embeds"], item["attention_mask"]
        pad = length - e.shape[1]
        pads = (e.new_zeros(e.shape[0], pad, e.shape[2]), m.new_zeros(m.shape[0], pad))
        embeds.append(torch.cat((pads[0], e) if left else (e, pads[0]), dim=1))
        masks.append(torch.cat((pads[1], m) if left else (m, pads[1]), dim=1))
    return torch.cat(embeds), torch.cat(masks)


@contextlib.contextmanager
def _mixed_heads(model, runs):
    """While the body runs, each module holding a classifier head's Parameters computes each
    run's rows with that run's expert's head (outputs padded with zeros to the widest head); a
    forward the module's instance already had (a hook's wrapper) runs inside and comes back."""
    paths = sorted({key.rpartition(".")[0] for _, _, e in runs for key in (e.head or {})})
    modules = [model.get_submodule(path) for path in paths]
    saved = [module.__dict__.get("forward") for module in modules]
    try:
        for path, module in zip(paths, modules):
            module.forward = _head_forward(module, path, runs)
        yield
    finally:
        for module, forward in zip(modules, saved):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward


def _head_forward(module, path: str, runs):
    own = dict(module.named_parameters(recurse=False))
    prefix = f"{path}." if path else ""
    forward = module.forward  # the instance's own (a wrapper), or the class's

    def run(x, *args, **kwargs):
        outs = []
        for start, stop, expert in runs:
            values = {name: (expert.head or {}).get(prefix + name) for name in own}
            saved = [(p, p.data) for name, p in own.items() if values[name] is not None]
            try:
                for name, param in own.items():
                    if values[name] is not None:
                        param.data = values[name].to(param.device, param.dtype)
                outs.append(forward(x[start:stop], *args, **kwargs))
            finally:
                for param, data in saved:
                    param.data = data
        width = max(o.shape[-1] for o in outs)
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[-1])) for o in outs])

    return run
