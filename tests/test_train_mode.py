"""A patched model in train() mode: attention dropout (BERT's attention_probs_dropout_prob, the
LLaMA family's attention_dropout) and Mixtral's router jitter as the unpatched model applies them,
none of it in eval mode, and gradients."""
import contextlib
import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import doe_kernels as dk
import model_utils
from doe_kernels.ops import library
from model_utils import CAUSAL, inputs, masked_dense, mixed_mask
from moe_utils import mixtral

CAUSAL_MODELS = {"llama": (LlamaForCausalLM, LlamaConfig),
                 "mistral": (MistralForCausalLM, MistralConfig),
                 "qwen2": (Qwen2ForCausalLM, Qwen2Config)}


def _with_attention_dropout(name, p):
    """A small model of `name` whose only dropout is p on the attention probabilities."""
    torch.manual_seed(0)
    if name == "bert":
        return model_utils.bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=p)
    model_class, config_class = CAUSAL_MODELS[name]
    return model_class(model_utils._causal_config(config_class, attention_dropout=p))


def _logits(model, ids, attention, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    logits = model(input_ids=ids, attention_mask=attention).logits
    return logits * attention[..., None] if logits.dim() == 3 else logits


NAMES = ["bert", *CAUSAL]


@pytest.mark.parametrize("name", NAMES)
def test_attention_dropout_one_zeroes_attention(name):
    """p = 1 zeroes every attention probability, deterministically: the patched model in train
    mode equals the unpatched (full mask) and the masked-dense (pruned mask) model in train
    mode, and differs from itself in eval mode."""
    model = _with_attention_dropout(name, 1.0).train()
    ids, attention = inputs(name)
    for mask in (dk.ExpertMask(), mixed_mask(model)):
        with torch.no_grad():
            expected = _logits(masked_dense(model, mask).train(), ids, attention)
            with dk.plugged(model, mask):
                got = _logits(model, ids, attention)
                evaluated = _logits(model.eval(), ids, attention)
                model.train()
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, evaluated)


@pytest.mark.parametrize("name", NAMES)
def test_attention_dropout_draws_as_unpatched(name):
    """p = 0.5 with every head kept: the same seed drops the same probabilities as the unpatched
    model; eval mode drops none."""
    model = _with_attention_dropout(name, 0.5)
    ids, attention = inputs(name)
    with torch.no_grad():
        expected = _logits(model.train(), ids, attention, seed=3)
        evaluated = _logits(model.eval(), ids, attention)
        with dk.plugged(model, dk.ExpertMask()):
            got_eval = _logits(model, ids, attention)
            got = _logits(model.train(), ids, attention, seed=3)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_eval, evaluated)
    assert not torch.allclose(got, got_eval)


@pytest.mark.parametrize("name", NAMES)
def test_patched_in_eval_mode_drops_nothing(name):
    """Patching a model in eval mode gives modules in eval mode: no dropout, the masked-dense
    model's output; train() and eval() on the patched model reach them."""
    model = _with_attention_dropout(name, 0.5).eval()
    ids, attention = inputs(name)
    mask = mixed_mask(model)
    with torch.no_grad():
        expected = _logits(masked_dense(model, mask), ids, attention)
        with dk.plugged(model, mask):
            got = _logits(model, ids, attention)
            trained = _logits(model.train(), ids, attention, seed=1)
            again = _logits(model.eval(), ids, attention)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)
    assert not torch.allclose(trained, expected)


def test_mixtral_router_jitter_as_unpatched():
    """Mixtral's router jitter (a random scale of the MoE block's input) in train mode only,
    drawn as the unpatched block draws it."""
    model = mixtral()
    model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.mlp.jitter_noise = 0.3
    ids, attention = inputs("llama")
    with torch.no_grad():
        expected = _logits(model.train(), ids, attention, seed=5)
        evaluated = _logits(model.eval(), ids, attention)
        with dk.plugged(model, dk.ExpertMask()):
            got_eval = _logits(model, ids, attention)
            got = _logits(model.train(), ids, attention, seed=5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_eval, evaluated, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, got_eval, rtol=1e-3, atol=1e-3)


def _gradients_of_every_parameter(model, name):
    """{parameter: its gradient} of a loss on the model's logits (the Parameter objects as keys:
    a patched model names some of them otherwise)."""
    ids, attention = inputs("bert" if name == "bert" else "llama")
    _logits(model, ids, attention).square().sum().backward()
    grads = {p: p.grad for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _model_of(name):
    if name == "mixtral":
        model = mixtral()
        model.config.attention_dropout = 0.0
        return model.train()
    return _with_attention_dropout(name, 0.0).train()


@pytest.mark.parametrize("name", [*NAMES, "mixtral"])
def test_gradients_with_every_neuron_and_head_kept(name):
    """With a full mask, backward through the patched model gives every Parameter of the model
    (the output and down projections, laid out input-major while patched, too) the unpatched
    model's gradient."""
    model = _model_of(name)
    names = {p: n for n, p in model.named_parameters()}
    expected = _gradients_of_every_parameter(model, name)
    with dk.plugged(model, dk.ExpertMask()):
        got = _gradients_of_every_parameter(model, name)
    assert set(got) == set(expected)
    for param, grad in got.items():
        assert grad is not None, names[param]
        scale = max(1.0, expected[param].abs().max().item())  # Mixtral's embeddings' reach 86
        torch.testing.assert_close(grad, expected[param], rtol=1e-4, atol=1e-6 * scale,
                                   msg=names[param])


@pytest.mark.parametrize("name", NAMES)
def test_every_weight_gets_a_gradient_where_a_layer_keeps_nothing(name):
    """A layer keeping no head, one keeping no neuron: every Parameter gets a gradient (zeros
    for the units nothing reads, as the masked-dense model gives them), so that an optimizer
    treats them as it treats the dense model's (weight decay, momentum)."""
    model = _model_of(name)
    mask = mixed_mask(model)
    spec = dk.models.spec_of(model)
    assert any(mask.heads.get(l, torch.arange(1)).numel() == 0 for l in range(spec.num_layers))
    names = {p: n for n, p in model.named_parameters()}
    expected = _masked_dense_gradients(model, mask, name)
    with dk.plugged(model, mask):
        grads = _gradients_of_every_parameter(model, name)
    assert not [names[p] for p, g in grads.items() if g is None]
    for param, grad in grads.items():
        want = expected[names[param]]
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6 * scale, msg=names[param])
        assert not grad[want == 0].any(), names[param]  # the pruned units' entries: exact zeros
    _, layers, _ = dk.models.describe(model)
    down, o_proj = _output_projections(layers[0])[0], _output_projections(layers[2])[1]
    assert not grads[down.weight].any() and not grads[o_proj.weight].any()  # keep nothing
    assert grads[_output_projections(layers[1])[0].weight].any()  # keeps everything


def _output_projections(layer):
    """(down, attention output) projections of a BERT or LLaMA-family layer."""
    if hasattr(layer, "mlp"):
        return layer.mlp.down_proj, layer.self_attn.o_proj
    return layer.output.dense, layer.attention.output.dense


def _masked_dense_gradients(model, mask, name):
    """{parameter name: gradient} of the masked-dense model, the columns of the down and
    attention output projections that read pruned units zeroed: the masked-dense model zeroes
    those weights, not their gradients, but the patched model reads no such column (a pruned
    head's values are not zero, so the dense gradient there is not either)."""
    dense = masked_dense(model, mask)
    names = {p: n for n, p in dense.named_parameters()}
    grads = {names[p]: g for p, g in _gradients_of_every_parameter(dense, name).items()}
    _, layers, spec = dk.models.describe(dense)
    for index, layer in enumerate(layers):
        down, o_proj = _output_projections(layer)
        neurons = torch.ones(spec.intermediate_size, dtype=torch.bool)
        neurons[mask.ffn.get(index, torch.arange(spec.intermediate_size))] = False
        heads = torch.ones(spec.num_heads, dtype=torch.bool)
        heads[mask.heads.get(index, torch.arange(spec.num_heads))] = False
        grads[names[down.weight]][:, neurons] = 0
        grads[names[o_proj.weight]][:, heads.repeat_interleave(spec.head_dim)] = 0
    return grads


OPTIMIZERS = {  # Adam's eps keeps rounding-sized gradients from taking whole steps
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.5),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-2, fused=True),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-2, foreach=True),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("name", ["bert", "llama", "mixtral"])
def test_an_optimizer_trains_a_patched_model_as_the_unpatched_one(name, optimizer):
    """An optimizer made before patching takes one step there, two on the patched model (full
    mask) and one after unpatching with a gradient computed while patched: every Parameter (the
    output and down projections, laid out input-major while patched, too) ends as the same
    steps leave the unpatched model, in the patched model's state_dict and after unpatching.
    Fused optimizers assume that a Parameter, its gradient and their state share strides: the
    patch keeps them so."""
    model = _model_of(name)
    twin = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    ids, attention = inputs("bert" if name == "bert" else "llama")

    def backward(m):
        _logits(m, ids, attention).square().mean().backward()

    def step(m, opt):
        opt.step()
        opt.zero_grad()

    def train(m, patched):
        opt = OPTIMIZERS[optimizer](m.parameters())
        backward(m)
        step(m, opt)
        with patched(m):
            for _ in range(2):
                backward(m)
                step(m, opt)
            backward(m)
            state = {k: v.clone() for k, v in m.state_dict().items()}  # not views of the weights
        step(m, opt)
        return state

    expected_mid = train(twin, lambda m: contextlib.nullcontext())
    expected = twin.state_dict()
    got_mid = train(model, lambda m: dk.plugged(m, dk.ExpertMask()))
    got = model.state_dict()
    unchanged = [k for k, _ in twin.named_parameters() if torch.equal(expected[k], before[k])]
    assert not unchanged, unchanged
    for key, value in expected.items():
        for got_value, want in ((got_mid[key], expected_mid[key]), (got[key], value)):
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got_value, want, rtol=1e-4, atol=1e-5 * scale, msg=key)


def _mixed_masks(model, name, count):
    """Masks of several kinds (a layer keeping nothing or everything, scales, bias deltas, the
    whole model); a Mixtral's drop experts, neurons inside them and heads."""
    from test_mixed import expert_masks

    if name != "mixtral":
        return expert_masks(model, count, seed=3)
    return [dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5, experts_keep=0.5, seed=s)
            for s in range(count - 1)] + [None]


def _weighted_gradients(model, ids, attention, weights):
    """Gradients of sum(output * weights) with respect to the input embeddings and every
    Parameter (keyed by the Parameter; None where it took none)."""
    params = list(model.parameters())
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, attention_mask=attention)
    tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    if tensor.dim() == 3:
        tensor = tensor * attention[..., None]
    grads = torch.autograd.grad((tensor * weights).sum(), [embeds, *params], allow_unused=True)
    return grads[0], dict(zip(params, grads[1:]))


def _batch_of(name, model, batch=6, tokens=9):
    """(ids, attention mask, random weights of the output) of a batch whose second sequence is
    padded (BERT's on the right: its pooler reads the first position)."""
    ids, attention = inputs("bert" if name == "bert" else "llama", batch=batch, seed=4)
    ids, attention = ids[:, :tokens], attention[:, :tokens].clone().fill_(1)
    if tokens > 1:
        attention[1, slice(-4, None) if name == "bert" else slice(None, 4)] = 0
    out = model(input_ids=ids, attention_mask=attention)
    shape = (out.logits if hasattr(out, "logits") else out.last_hidden_state).shape
    return ids, attention, torch.randn(shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layout", ["segments", "union", "packed"])
@pytest.mark.parametrize("name", ["bert", "llama", "mixtral"])
def test_a_mixed_batch_backpropagates_as_each_sequence_alone(name, layout, monkeypatch):
    """Backward through a mixed batch (dk.mixed; at one token per sequence the FFNs take the
    union of the experts' neurons; given the attention mask, the layers run on the real tokens
    only) gives each sequence's input embeddings, and every Parameter the sum over the sequences
    of, what each sequence run alone on its expert gives (zeros too: a layer that keeps no
    head)."""
    model = _model_of(name)
    tokens = 1 if layout == "union" else 9
    ids, attention, weights = _batch_of(name, model, tokens=tokens)
    masks = _mixed_masks(model, name, 4)
    rows = [masks[b % len(masks)] for b in (0, 1, 1, 2, 3, 0)]
    names = {p: n for n, p in model.named_parameters()}
    paths = []  # the segmented FFN ops called: "segmented" or "union"
    for op in ("segmented_gather_ffn", "segmented_gather_swiglu_ffn", "union_gather_ffn",
               "union_gather_swiglu_ffn"):
        monkeypatch.setattr(library, op, lambda *a, op=op, run=getattr(library, op), **k:
                            paths.append(op.split("_")[0]) or run(*a, **k))
    with dk.mixed(model, rows, **({"attention_mask": attention} if layout == "packed" else {})):
        got_embeds, got = _weighted_gradients(model, ids, attention, weights)
    if name != "mixtral":  # (a Mixtral's MoE blocks run neither)
        assert (set(paths) == {"union"}) if tokens == 1 else ("segmented" in paths), paths
    want_embeds, want = [], {}
    for b, mask in enumerate(rows):
        with dk.plugged(model, mask or dk.ExpertMask()):
            embeds, grads = _weighted_gradients(model, ids[b:b + 1], attention[b:b + 1],
                                                weights[b:b + 1])
        want_embeds.append(embeds)
        for param, grad in grads.items():
            if grad is not None:
                want[param] = want[param] + grad if param in want else grad
    torch.testing.assert_close(got_embeds, torch.cat(want_embeds), rtol=1e-4, atol=1e-5)
    for param, grad in got.items():
        if param not in want:  # the input embeddings' table (the inputs come as embeddings)
            assert grad is None, names[param]
            continue
        scale = max(1.0, want[param].abs().max().item())
        torch.testing.assert_close(grad, want[param], rtol=1e-4, atol=1e-5 * scale,
                                   msg=names[param])
    assert len(want) > len(got) // 2


def test_fused_optimizer_state_saved_while_patched_resumes_on_the_unpatched_model():
    """A fused AdamW's state saved while the model is patched (its moments of the output and down
    projections in their input-major strides) and loaded for a model that is not patched: its
    next step is the step of the same state laid out as the weights."""
    model = _model_of("llama")
    optimizer = OPTIMIZERS["adamw-fused"](model.parameters())
    ids, attention = inputs("llama")
    with dk.plugged(model, dk.ExpertMask()):
        _logits(model, ids, attention).square().mean().backward()
        optimizer.step()
        saved = copy.deepcopy(optimizer.state_dict())
    assert any(not v.is_contiguous() for s in saved["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() == 2)
    results = []
    for contiguous in (False, True):
        fresh = copy.deepcopy(model)
        resumed = OPTIMIZERS["adamw-fused"](fresh.parameters())
        state = copy.deepcopy(saved)
        if contiguous:
            for values in state["state"].values():
                values.update({k: v.contiguous() for k, v in values.items()
                               if isinstance(v, torch.Tensor)})
        resumed.load_state_dict(state)
        _logits(fresh, ids, attention).square().mean().backward()
        resumed.step()
        results.append(fresh.state_dict())
    for key, value in results[1].items():
        torch.testing.assert_close(results[0][key], value, msg=key)


@pytest.mark.parametrize("layout", ["segments", "union", "packed"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_mixed_batch_served_under_inference_mode_then_trains(name, layout):
    """A pass under torch.inference_mode inside `dk.mixed` (which fills the batch's caches:
    segment offsets, union plans, real-token spans), or entering it there, and then a pass
    that backpropagates: the same gradients as without the inference pass (the caches were
    inference tensors, which autograd cannot save)."""
    model = _model_of(name)
    ids, attention, weights = _batch_of(name, model, tokens=1 if layout == "union" else 9)
    masks = _mixed_masks(model, name, 4)
    rows = [masks[b % len(masks)] for b in (0, 1, 1, 2, 3, 0)]
    options = {"attention_mask": attention} if layout == "packed" else {}
    with dk.mixed(model, rows, **options):
        want_embeds, want = _weighted_gradients(model, ids, attention, weights)
    for entered_inside in (False, True):
        with contextlib.ExitStack() as stack:
            if entered_inside:
                with torch.inference_mode():
                    stack.enter_context(dk.mixed(model, rows, **options))
            else:
                stack.enter_context(dk.mixed(model, rows, **options))
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=attention)
            got_embeds, got = _weighted_gradients(model, ids, attention, weights)
        torch.testing.assert_close(got_embeds, want_embeds, rtol=0, atol=0)
        assert all(torch.equal(got[p], want[p]) for p in want if want[p] is not None)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_sequence_of_padding_alone_in_a_packed_mixed_batch_backpropagates(name):
    """A sequence whose attention mask is all zeros, in a mixed batch given that mask: the
    backward pass runs (the empty span's attention was given the kept heads' width) and every
    Parameter gets what the batch without that sequence gives it."""
    model = _model_of(name)
    ids, attention, weights = _batch_of(name, model, batch=3)
    attention[1], weights[1] = 0, 0  # (a classifier's logits read even that sequence)
    masks = _mixed_masks(model, name, 3)
    rows = [masks[0], masks[1], masks[0]]
    with dk.mixed(model, rows, attention_mask=attention):
        got_embeds, got = _weighted_gradients(model, ids, attention, weights)
    keep = [0, 2]
    with dk.mixed(model, [rows[b] for b in keep], attention_mask=attention[keep]):
        want_embeds, want = _weighted_gradients(model, ids[keep], attention[keep], weights[keep])
    torch.testing.assert_close(got_embeds[keep], want_embeds, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_embeds[1], torch.zeros_like(got_embeds[1]))
    for param, grad in want.items():
        if grad is not None:
            torch.testing.assert_close(got[param], grad, rtol=1e-4, atol=1e-5)
