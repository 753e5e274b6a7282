"""A patched model in train() mode: attention dropout (BERT's attention_probs_dropout_prob, the
LLaMA family's attention_dropout) and Mixtral's router jitter as the unpatched model applies them,
none of it in eval mode, and gradients."""
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


@pytest.mark.parametrize("name", ["bert", "llama", "mixtral"])
def test_an_optimizer_trains_a_patched_model_as_the_unpatched_one(name):
    """Three SGD steps on the patched model (full mask), by an optimizer made before patching,
    change every Parameter (the output and down projections, laid out input-major while
    patched, too) as the same steps on the unpatched model do: in the patched model's
    state_dict and after unpatching."""
    model = _model_of(name)
    twin = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    ids, attention = inputs("bert" if name == "bert" else "llama")

    def train(m, optimizer):
        for _ in range(3):
            _logits(m, ids, attention).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    train(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.5))
    expected = twin.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    with dk.plugged(model, dk.ExpertMask()):
        train(model, optimizer)
        patched = model.state_dict()
    after = model.state_dict()
    unchanged = [k for k, _ in twin.named_parameters() if torch.equal(expected[k], before[k])]
    assert not unchanged, unchanged
    for key, value in expected.items():
        scale = max(1.0, value.abs().max().item())
        for got in (patched[key], after[key]):
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5 * scale, msg=key)
