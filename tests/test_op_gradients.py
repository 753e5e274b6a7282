"""Gradients of the single-expert gather ops (doe_kernels/ops/autograd.py) against autograd through
the float64 references: every differentiable input (x, weights, biases, scales), on every backend
and dtype, over odd shapes and empty, single, full and random index lists; and a patched model's
gradients against the masked dense model's."""
import pytest
import torch

import doe_kernels as dk
from doe_kernels.ops import library
from conftest import backend_cases
from model_utils import build, inputs, masked_dense, mixed_mask
from reference import (assert_close, cols_linear_ref, ffn_ref, index_list, rows_linear_ref,
                       swiglu_ffn_ref)

HIDDEN, INTERMEDIATE = 13, 19  # odd sizes: no tile divides them
OPS = ("rows_linear", "cols_linear", "ffn", "swiglu_ffn")


def _tensor(gen, *shape, dtype, device, fan=1.0):
    t = torch.randn(*shape, generator=gen) / fan ** 0.5
    return t.to(device, dtype).requires_grad_()


class _Registered:
    """The ops called as torch.ops.doe_kernels.* (their own backward passes, which recompute the
    pre-activations; under autograd the public functions run the FFNs unfused), with dk.ops'
    signatures."""

    @staticmethod
    def gather_rows_linear(x, weight, bias, rows, activation, backend):
        return torch.ops.doe_kernels.gather_rows_linear(x, weight, bias, rows, activation, backend)

    @staticmethod
    def gather_cols_linear(h, weight_t, bias, cols, backend, scales=None):
        return torch.ops.doe_kernels.gather_cols_linear(h, weight_t, bias, cols, backend, scales)

    @staticmethod
    def gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales=None):
        return torch.ops.doe_kernels.gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation,
                                                backend, scales)

    @staticmethod
    def gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend, scales=None):
        return torch.ops.doe_kernels.gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend,
                                                       scales)


def _case(op, kept, backend, dtype, device, gen, activation, registered=False):
    """(the op's output, its differentiable inputs by name, the float64 reference's function of
    those inputs); `registered`: call the registered op, not the public function."""
    ops = _Registered if registered else dk.ops

    def make(*shape, fan=1.0):
        return _tensor(gen, *shape, dtype=dtype, device=device, fan=fan)

    x = make(2, 3, HIDDEN)
    scales = (1 + 0.3 * torch.randn(kept.numel(), generator=gen)).to(device, dtype)
    scales.requires_grad_()
    if op == "rows_linear":
        w, b = make(INTERMEDIATE, HIDDEN, fan=HIDDEN), make(INTERMEDIATE)
        inputs = dict(x=x, weight=w, bias=b)
        return (lambda x, weight, bias: ops.gather_rows_linear(
                    x, weight, bias, kept, activation, backend),
                lambda x, weight, bias: rows_linear_ref(x, weight, bias, kept, activation), inputs)
    if op == "cols_linear":
        h = make(2, 3, kept.numel())
        w_t, b = make(INTERMEDIATE, HIDDEN, fan=INTERMEDIATE), make(HIDDEN)
        inputs = dict(h=h, weight_t=w_t, bias=b, scales=scales)
        return (lambda h, weight_t, bias, scales: ops.gather_cols_linear(
                    h, weight_t, bias, kept, backend, scales=scales),
                lambda h, weight_t, bias, scales: cols_linear_ref(h, weight_t, bias, kept, scales),
                inputs)
    w_out_t = make(INTERMEDIATE, HIDDEN, fan=INTERMEDIATE)
    if op == "ffn":
        w_in, b_in, b_out = make(INTERMEDIATE, HIDDEN, fan=HIDDEN), make(INTERMEDIATE), make(HIDDEN)
        inputs = dict(x=x, w_in=w_in, b_in=b_in, w_out_t=w_out_t, b_out=b_out, scales=scales)
        return (lambda x, w_in, b_in, w_out_t, b_out, scales: ops.gather_ffn(
                    x, w_in, b_in, w_out_t, b_out, kept, activation, backend, scales=scales),
                lambda x, w_in, b_in, w_out_t, b_out, scales: ffn_ref(
                    x, w_in, b_in, w_out_t, b_out, kept, activation, scales), inputs)
    w_gate, w_up = make(INTERMEDIATE, HIDDEN, fan=HIDDEN), make(INTERMEDIATE, HIDDEN, fan=HIDDEN)
    inputs = dict(x=x, w_gate=w_gate, w_up=w_up, w_down_t=w_out_t, scales=scales)
    return (lambda x, w_gate, w_up, w_down_t, scales: ops.gather_swiglu_ffn(
                x, w_gate, w_up, w_down_t, kept, backend, scales=scales),
            lambda x, w_gate, w_up, w_down_t, scales: swiglu_ffn_ref(
                x, w_gate, w_up, w_down_t, kept, scales), inputs)


def _check_gradients(op, kind, backend, dtype, device, activation, seed, registered=False):
    gen = torch.Generator().manual_seed(seed)
    size = INTERMEDIATE
    kept = index_list(kind, size, device=device, generator=gen)
    call, reference, inputs = _case(op, kept, backend, dtype, device, gen, activation, registered)
    out = call(**inputs)
    grad_out = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out, allow_unused=True)
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref_out = reference(**ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, list(ref_inputs.values()), grad_out.double(),
                                    allow_unused=True)
    for name, got, want in zip(inputs, grads, ref_grads):
        want = torch.zeros_like(ref_inputs[name]) if want is None else want
        assert got is not None, f"{op} {kind}: no gradient for {name}"
        assert got.dtype == inputs[name].dtype and got.shape == inputs[name].shape
        assert_close(got, want, what=f"{op} {kind} {backend} {dtype}: d/d{name}")


@pytest.mark.parametrize("registered", [False, True], ids=["public", "registered"])
@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("kind", ["empty", "single", "full", "random"])
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_the_float64_reference(device, backend, dtype, kind, op, registered):
    """Through the public functions (unfused under autograd) and the registered ops."""
    _check_gradients(op, kind, backend, dtype, device, "gelu", OPS.index(op), registered)


@pytest.mark.parametrize("registered", [False, True], ids=["public", "registered"])
@pytest.mark.parametrize("activation", ["identity", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("op", ["rows_linear", "ffn"])
def test_gradients_through_every_activation(op, activation, registered):
    if op == "ffn" and activation == "identity":
        pytest.skip("the BERT-style FFN has no identity activation")
    _check_gradients(op, "random", "auto", torch.float32, "cpu", activation, 7, registered)


def _embedding_gradients(model, ids, attention, parameters):
    """The gradients of the output's product with a fixed random tensor with respect to the input
    embeddings and `parameters` (tensors)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, attention_mask=attention)
    tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    if tensor.dim() == 3:  # padded positions left out
        tensor = tensor * attention[..., None]
    weights = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(9))
    return torch.autograd.grad((tensor * weights).sum(), [embeds] + list(parameters))


def _scaled_mask(model):
    """Neurons and heads pruned (a layer keeping no neuron, one keeping no head), head and
    neuron scales, bias deltas."""
    from test_bias_delta import with_deltas

    spec = dk.models.spec_of(model)
    gen = torch.Generator().manual_seed(4)
    mask = with_deltas(model, mixed_mask(model, ffn_keep=0.4, heads_keep=0.5), scale=0.2)
    return mask.with_scales(
        ffn_scales={l: 1 + 0.2 * torch.randn(mask.ffn[l].numel(), generator=gen)
                    for l in range(spec.num_layers)},
        head_scales={l: 1 + 0.2 * torch.randn(mask.heads[l].numel(), generator=gen)
                     for l in range(spec.num_layers)})


def _output_weight_gradient(dense_grad, mask, spec, kind: str, layer: int):
    """The gradient of a down (kind "ffn") or attention output ("heads") projection's weight in
    the patched model from the masked-dense model's, whose kept columns hold the weight times
    the mask's scales: those columns' gradient times the scales, zero at the pruned ones."""
    if kind == "ffn":
        cols, scales = mask.ffn[layer], mask.ffn_scales[layer]
    else:
        heads = mask.heads[layer]
        cols = (heads[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)
        scales = mask.head_scales[layer].repeat_interleave(spec.head_dim)
    expected = torch.zeros_like(dense_grad)
    expected[:, cols] = dense_grad[:, cols] * scales.to(dense_grad.dtype)
    return expected


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_patched_model_backpropagates_as_the_masked_dense_model(name, backend):
    """Gradients of a patched model (neurons and heads pruned, a layer keeping no neuron, one
    keeping no head, head and neuron scales, bias deltas) with respect to its input embeddings and
    to its weights (the FFN's input and output projections, the attention's query, key, value and
    output projections) equal those of the dense model with the pruned units zeroed."""
    model = build(name)
    ids, attention = inputs(name)
    spec = dk.models.spec_of(model)
    mask = _scaled_mask(model)
    if name == "bert":
        parameters = ["bert.encoder.layer.2.intermediate.dense.weight",
                      "bert.encoder.layer.2.intermediate.dense.bias",
                      "bert.encoder.layer.0.attention.self.query.weight",
                      "bert.encoder.layer.0.attention.self.value.bias",
                      "bert.encoder.layer.2.output.dense.bias"]
        outputs = {"bert.encoder.layer.2.output.dense.weight": ("ffn", 2),
                   "bert.encoder.layer.0.attention.output.dense.weight": ("heads", 0)}
    else:
        parameters = ["model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight",
                      "model.layers.0.self_attn.q_proj.weight",
                      "model.layers.0.self_attn.k_proj.weight"]
        outputs = {"model.layers.2.mlp.down_proj.weight": ("ffn", 2),
                   "model.layers.0.self_attn.o_proj.weight": ("heads", 0)}
    parameters += list(outputs)
    dense = masked_dense(model, mask)
    expected = _embedding_gradients(dense, ids, attention,
                                    [dense.get_parameter(name) for name in parameters])
    expected = [want if what not in outputs
                else _output_weight_gradient(want, mask, spec, *outputs[what])
                for what, want in zip(["embeddings"] + parameters, expected)]
    read = [model.get_parameter(name) for name in parameters]  # the patched modules hold these
    with dk.plugged(model, mask, backend=backend):
        got = _embedding_gradients(model, ids, attention, read)
    for what, g, want in zip(["embeddings"] + parameters, got, expected):
        assert want.abs().max() > 0, what
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5, msg=what)


def _assert_gradients_match(out, reference, inputs: dict, grad_out, what: str) -> None:
    """The gradients of sum(out * grad_out) with respect to `inputs` equal those of the float64
    `reference` (a function of the inputs, by name)."""
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out)
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref_grads = torch.autograd.grad(reference(**ref_inputs), list(ref_inputs.values()),
                                    grad_out.double())
    for name, got, want in zip(inputs, grads, ref_grads):
        assert_close(got, want, what=f"{what}: d/d{name}")


@pytest.mark.parametrize("op", ["ffn", "swiglu_ffn"])
def test_gradients_of_every_neuron_in_another_order(op):
    """A full kept list in any order (the public wrappers take sorted lists; the patched modules
    may pass any order) takes the ops' dense path; each scale stays with its entry."""
    gen = torch.Generator().manual_seed(11)
    kept = torch.randperm(INTERMEDIATE, generator=gen)
    _, reference, inputs = _case(op, kept, "auto", torch.float32, "cpu", gen, "gelu")
    out = (library.gather_ffn(*list(inputs.values())[:5], kept, "gelu", "auto", inputs["scales"])
           if op == "ffn" else
           library.gather_swiglu_ffn(*list(inputs.values())[:4], kept, "auto", inputs["scales"]))
    grad_out = torch.randn(2, 3, HIDDEN, generator=gen)
    _assert_gradients_match(out, reference, inputs, grad_out, f"{op} permuted")


def test_compiled_backward_equals_eager():
    """torch.compile traces the ops' gradients (fullgraph) and computes what eager autograd does."""
    gen = torch.Generator().manual_seed(12)
    kept = index_list("random", INTERMEDIATE, generator=gen)
    x, w_gate, w_up = (_tensor(gen, *shape, dtype=torch.float32, device="cpu")
                       for shape in ((4, HIDDEN), (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN)))
    w_down_t = torch.randn(INTERMEDIATE, HIDDEN, generator=gen)

    def loss(x, w_gate, w_up):
        out = dk.ops.gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, check_indices=False)
        hidden = dk.ops.gather_rows_linear(x, w_gate, None, kept, "gelu", check_indices=False)
        out = out + dk.ops.gather_cols_linear(hidden, w_up, None, kept, check_indices=False)
        return out.square().sum()

    eager = torch.autograd.grad(loss(x, w_gate, w_up), (x, w_gate, w_up))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, w_gate, w_up),
                                   (x, w_gate, w_up))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_second_derivatives_are_refused():
    """The backward passes are not differentiable themselves: create_graph=True raises rather
    than give wrong second derivatives."""
    gen = torch.Generator().manual_seed(13)
    kept = index_list("random", INTERMEDIATE, generator=gen)
    x = _tensor(gen, 4, HIDDEN, dtype=torch.float32, device="cpu")
    w = _tensor(gen, INTERMEDIATE, HIDDEN, dtype=torch.float32, device="cpu")
    out = dk.ops.gather_rows_linear(x, w, None, kept, "gelu").square().sum()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(out, x, create_graph=True)


@pytest.mark.parametrize("op", ["cols_linear", "ffn", "swiglu_ffn"])
def test_gradients_without_scales(op):
    """Scales left out (the op's trailing default): the other inputs' gradients."""
    gen = torch.Generator().manual_seed(14)
    kept = index_list("random", INTERMEDIATE, generator=gen)
    call, reference, inputs = _case(op, kept, "auto", torch.float32, "cpu", gen, "relu")
    inputs = {k: v for k, v in inputs.items() if k != "scales"}
    out = call(**inputs, scales=None)
    grad_out = torch.randn(out.shape, generator=gen)
    _assert_gradients_match(out, lambda **a: reference(**a, scales=None), inputs, grad_out,
                            f"{op} without scales")


@pytest.mark.parametrize("op", ["rows_linear", "ffn", "swiglu_ffn"])
def test_public_functions_keep_the_activation_input_under_autograd(op):
    """Recorded by autograd, the public functions run the activation in torch (which keeps its
    input for the backward) after the row-gathered op, rather than the fused op, whose backward
    recomputes the pre-activations."""
    gen = torch.Generator().manual_seed(15)
    kept = index_list("random", INTERMEDIATE, generator=gen)
    call, _, inputs = _case(op, kept, "auto", torch.float32, "cpu", gen, "gelu")
    out = call(**inputs)
    # the autograd nodes the backward runs (read from the profiler: torch 2.11 refuses to walk
    # the graph past a custom op's node, `name()` and `next_functions` raise there)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out.sum().backward()
    prefix = "autograd::engine::evaluate_function: "
    names = {e.name.removeprefix(prefix) for e in profile.events() if e.name.startswith(prefix)}
    assert not any(f"gather_{op}_default" in name for name in names if op != "rows_linear"), names
    assert any(name.startswith(("Gelu", "Mul")) for name in names), names
    assert any("gather_rows_linear" in name for name in names), names


@pytest.mark.parametrize("op", ["ffn", "swiglu_ffn"])
def test_no_rows_under_autograd_stay_in_the_graph(op):
    """A batch of no rows with every neuron kept gave plain zeros: backward then raised."""
    gen = torch.Generator().manual_seed(17)
    call, _, inputs = _case(op, torch.arange(INTERMEDIATE), "cpu", torch.float32, "cpu", gen,
                            "gelu")
    inputs["x"] = inputs["x"][:0].detach().requires_grad_()
    out = call(**inputs)
    assert out.shape[0] == 0 and out.requires_grad
    out.sum().backward()
    assert inputs["x"].grad.shape == inputs["x"].shape


def test_scales_of_an_unchecked_list_that_repeats_a_neuron_read_no_unwritten_memory():
    assert library._in_order(torch.ones(4), torch.tensor([0, 0, 1, 2])).tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("op", ["ffn", "swiglu_ffn"])
def test_every_neuron_under_autograd_runs_the_dense_ffn(op):
    """A full kept list recorded by autograd takes the dense FFN (torch's own gradients), as the
    fused op does: also in a dtype the named backend cannot run (float16 on `cpu`)."""
    gen = torch.Generator().manual_seed(16)
    kept = torch.arange(INTERMEDIATE)
    call, reference, inputs = _case(op, kept, "cpu", torch.float16, "cpu", gen, "gelu")
    out = call(**inputs)
    grad_out = torch.randn(out.shape, generator=gen).half()
    _assert_gradients_match(out, reference, inputs, grad_out, f"{op} float16 full list")
