"""One training step (forward and backward) of a patched model against the unpatched one and a
physically sliced copy, in the same run.

Cases (shape name, rows = tokens per step):
  * `minilm-train`: a BertForSequenceClassification of all-MiniLM-L6-v2's sizes (6 layers, hidden
    384, 12 heads, intermediate 1536), 16 sequences of 64 tokens.
  * `smollm2-8-layers-train`: 8 layers of SmolLM2-135M (hidden 576, 9 heads, 3 KV heads,
    intermediate 1536), vocabulary 2000, 8 sequences of 64 tokens, every position's logits.
  * smoke (CI): `tiny-llama-train`, a 2-layer LLaMA with SmolLM2's head layout, 2 x 16 tokens.
Each is run twice: `-inputs`, only the input embeddings take a gradient (prompt tuning, the
weights frozen), and `-weights`, every weight does too (fine-tuning the expert). The loss is the
mean square of the logits; the timed step computes the embeddings, the forward and the backward
pass, and drops the gradients. Models are random-init, train mode without dropout, float32.

Variants: `dense` (the unpatched model, measured once per case and recorded under every rate),
`sliced` (test_model_bench's physically pruned copy, its sliced weights trainable in `-weights`)
and `patched-<backend>` (`doe_kernels.patch`, unpatched afterwards). Masks: `ExpertMask.random`
with 1 - p of the neurons and heads kept. Before `sliced` is timed, its step's input gradient is
compared with the model's patched on the `torch` backend, so the baseline is checked to train the
expert.
"""
import functools

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import doe_kernels as dk
from conftest import bench_device, measure, sweep_mode
from test_model_bench import _sliced_model, _variants

CHECK_TOLERANCE = 1e-4  # relative (Frobenius) difference of the input gradients, float32

QUICK_RATES = (0.35, 0.65)
GRADS = ("inputs", "weights")

CASES = {  # shape -> (model maker, (sequences, tokens))
    "minilm-train": (lambda: BertForSequenceClassification(BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), (16, 64)),
    "smollm2-8-layers-train": (lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=2000)), (8, 64)),
    "tiny-llama-train": (lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=128)), (2, 16)),
}


def _shapes_and_rates(config):
    mode = sweep_mode(config)
    if mode == "smoke":
        return ("tiny-llama-train",), (0.65,)
    rates = config.getoption("--rates") or QUICK_RATES
    return ("minilm-train", "smollm2-8-layers-train"), rates


def pytest_generate_tests(metafunc):
    if "train_case" not in metafunc.fixturenames:
        return
    asked = metafunc.config.getoption("--bench-dtype")
    if asked not in (None, "float32"):  # its rows would land in the dtype's files as float32
        metafunc.parametrize("train_case", [pytest.param(
            None, id="float32-only", marks=pytest.mark.skip(
                reason=f"the training benchmark runs float32 only, not --bench-dtype {asked}"))])
        return
    shapes, rates = _shapes_and_rates(metafunc.config)
    variants = _variants(bench_device(metafunc.config))
    params = []
    for shape in shapes:  # grouped by model, so each model is built once
        for grads in GRADS:
            params.append(pytest.param((shape, grads, rates, "dense"), id=f"{shape}-{grads}-dense"))
            params += [pytest.param((shape, grads, (rate,), variant),
                                    id=f"{shape}-{grads}-p{round(100 * rate)}-{variant}")
                       for rate in rates for variant in variants[1:]]
    metafunc.parametrize("train_case", params)


@functools.lru_cache(maxsize=1)
def _model(shape: str, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        return CASES[shape][0]().train()


class Step:
    """One training step of `model` on fixed random tokens; `grads` says what takes a gradient."""

    def __init__(self, model, shape: str, grads: str):
        self.model = model
        sequences, tokens = CASES[shape][1]
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(2)
        self.ids = torch.randint(model.config.vocab_size, (sequences, tokens), generator=gen)
        self.ids = self.ids.to(device)
        self.attention_mask = torch.ones_like(self.ids)
        for param in model.parameters():
            param.requires_grad_(grads == "weights")

    def __call__(self):
        embeds = self.model.get_input_embeddings()(self.ids).detach().requires_grad_()
        logits = self.model(inputs_embeds=embeds, attention_mask=self.attention_mask).logits
        logits.float().square().mean().backward()
        self.model.zero_grad(set_to_none=True)
        return embeds.grad


def _check_sliced(model, mask, shape: str, grads: str, sliced_step) -> None:
    """The sliced copy trains the expert: its input gradient is the patched model's."""
    got = sliced_step()
    with dk.plugged(model, mask, backend="torch"):
        want = Step(model, shape, grads)()
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert error < CHECK_TOLERANCE, f"the sliced model's gradient differs: {error:.2e}"


def test_train_step(benchmark, recorder, request, train_case):
    shape, grads, rates, variant = train_case
    device = bench_device(request.config)
    model = _model(shape, str(device))
    patched = False
    if variant == "dense":
        timed = model
    else:
        mask = dk.ExpertMask.random(model, ffn_keep=1 - rates[0], heads_keep=1 - rates[0], seed=0)
        if variant == "sliced":
            timed = _sliced_model(model, mask)
        else:
            timed, patched = dk.patch(model, mask, backend=variant.removeprefix("patched-")), True
    try:
        step = Step(timed, shape, grads)
        if variant == "sliced":
            _check_sliced(model, mask, shape, grads, step)
        step()  # warm-up
        seconds = measure(benchmark, step, request.config)
    finally:
        if patched:
            dk.unpatch(model)
    sequences, tokens = CASES[shape][1]
    for rate in rates:
        recorder.add(bench="train", shape=f"{shape}-{grads}", dtype="float32",
                     device=device.type, variant=variant, prune_rate=rate,
                     rows=sequences * tokens, median_s=seconds)
