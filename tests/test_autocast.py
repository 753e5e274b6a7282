"""A patched model under torch.autocast (bfloat16 on the CPU): the ops then compute with torch's
own ops on copies of the kept weight rows, which autocast casts, so that a float32 model patched
runs and trains in autocast's precision: its outputs and gradients are, within bfloat16's
rounding, the masked-dense model's under the same autocast (a Mixtral's: its own in float32)."""
import contextlib

import pytest
import torch

import doe_kernels as dk
from model_utils import build, inputs, masked_dense, mixed_mask, output_of
from moe_utils import mixtral

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)
# the attention output projections: the masked-dense model computes the pruned heads' attention
# (their columns of o_proj zeroed), so only the kept heads' columns' gradients compare
OUTPUT_PROJECTIONS = ("o_proj", "attention.output.dense")


def _relative(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _run(model, ids, attention, autocast=True):
    """(the output, the gradients of its sum of squares with respect to the input embeddings and
    every Parameter, keyed by the Parameter; None where none reached it)."""
    params = list(model.parameters())
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.autocast(**AUTOCAST) if autocast else contextlib.nullcontext():
        out = model(inputs_embeds=embeds, attention_mask=attention)
        tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if tensor.dim() == 3:
            tensor = tensor * attention[..., None]
    grads = torch.autograd.grad(tensor.float().square().sum(), [embeds, *params],
                                allow_unused=True)
    return tensor, grads[0], dict(zip(params, grads[1:]))


def _compare(got, want, tolerance: float, what: str) -> None:
    error = _relative(got, want)
    assert error < tolerance, f"{what}: relative error {error:.3g}"


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_patched_model_runs_and_trains_under_autocast(name):
    """Output in bfloat16, gradients of the inputs and of every weight (the input embeddings'
    table aside: the inputs are given as embeddings) as the masked-dense model's under autocast,
    in train and inference mode."""
    model = build(name)
    ids, attention = inputs(name)
    mask = mixed_mask(model)
    dense = masked_dense(model, mask)
    weights = dict(model.named_parameters())
    want, want_embeds, want_grads = _run(dense, ids, attention)
    with dk.plugged(model, mask):
        got, got_embeds, grads = _run(model, ids, attention)
        with torch.no_grad(), torch.autocast(**AUTOCAST):
            inference = model(input_ids=ids, attention_mask=attention)
    assert got.dtype == torch.bfloat16
    _compare(got, want, 0.02, "output")
    _compare(got_embeds, want_embeds, 0.05, "input gradient")
    spec = dk.models.spec_of(model)
    for weight_name, param in weights.items():
        if "embeddings.word" in weight_name or "embed_tokens" in weight_name:
            continue
        got_grad, want_grad = grads[param], want_grads[dense.get_parameter(weight_name)]
        assert got_grad is not None, weight_name
        if any(p in weight_name for p in OUTPUT_PROJECTIONS) and weight_name.endswith("weight"):
            layer = int(weight_name.split("layer")[1].split(".")[1])
            heads = mask.heads.get(layer, torch.arange(spec.num_heads))
            cols = (heads[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)
            pruned = torch.ones(got_grad.shape[1], dtype=torch.bool)
            pruned[cols] = False
            assert not got_grad[:, pruned].any(), weight_name
            got_grad, want_grad = got_grad[:, cols], want_grad[:, cols]
        if want_grad.numel():
            _compare(got_grad, want_grad, 0.05, weight_name)
    inference = inference.logits if hasattr(inference, "logits") else inference.last_hidden_state
    if inference.dim() == 3:
        inference = inference * attention[..., None]
    assert inference.dtype == torch.bfloat16
    _compare(inference, want, 0.02, "inference output")


def test_a_patched_mixtral_runs_and_trains_under_autocast():
    """Experts dropped, neurons inside them and heads pruned: under autocast the output and the
    input gradient are the same plugged model's in float32, within bfloat16's rounding."""
    model = mixtral()
    ids, attention = inputs("llama")
    mask = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5, experts_keep=0.5, seed=1)
    with dk.plugged(model, mask):
        got, got_embeds, grads = _run(model, ids, attention)
        want, want_embeds, _ = _run(model, ids, attention, autocast=False)
    assert got.dtype == torch.bfloat16
    _compare(got, want, 0.05, "output")
    _compare(got_embeds, want_embeds, 0.1, "input gradient")
    assert sum(g is not None for g in grads.values()) > len(grads) // 2


@pytest.mark.parametrize("tokens", [9, 1], ids=["segments", "union"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_mixed_batch_runs_under_autocast(name, tokens):
    """dk.mixed under autocast: each sequence's output as it gets alone on its expert under the
    same autocast."""
    model = build(name)
    ids, attention = inputs(name, batch=4, seed=2)
    ids, attention = ids[:, :tokens], attention[:, :tokens].clone().fill_(1)
    masks = [mixed_mask(model), dk.ExpertMask.random(model, 0.4, 0.5, seed=3), None,
             mixed_mask(model)]
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        with dk.mixed(model, masks):
            got = output_of(model, ids, attention)
        for b, mask in enumerate(masks):
            with dk.plugged(model, mask or dk.ExpertMask()):
                want = output_of(model, ids[b:b + 1], attention[b:b + 1])
            _compare(got[b:b + 1], want, 0.02, f"sequence {b}")


@pytest.mark.parametrize("kind", ["empty", "full", "random"])
@pytest.mark.parametrize("op", ["rows_linear", "cols_linear", "ffn", "swiglu_ffn", "segmented"])
def test_the_ops_run_and_differentiate_under_autocast(op, kind):
    """Float32 inputs under autocast: a bfloat16 output and float32 gradients, within bfloat16's
    rounding of the float64 reference's (the segmented FFN: two segments, each on its list)."""
    from reference import assert_close, index_list
    from test_op_gradients import INTERMEDIATE, _case

    gen = torch.Generator().manual_seed(3)
    kept = index_list(kind, INTERMEDIATE, generator=gen)
    if op == "segmented":
        call, reference, inputs_ = _segmented_case(kept, gen)
    else:
        call, reference, inputs_ = _case(op, kept, "auto", torch.float32, "cpu", gen, "gelu")
    with torch.autocast(**AUTOCAST):
        out = call(**inputs_)
    assert out.dtype == torch.bfloat16
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs_.items()}
    ref = reference(**ref_inputs)
    assert_close(out, ref, what=f"{op} {kind} under autocast")
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out.float(), list(inputs_.values()), grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, list(ref_inputs.values()), grad_out.double(),
                                    allow_unused=True)
    for name, got, want in zip(inputs_, grads, ref_grads):
        want = torch.zeros_like(ref_inputs[name]) if want is None else want
        assert got is not None and got.dtype == torch.float32, name
        if want.norm() > 0:
            _compare(got, want, 0.03, f"{op} {kind}: d/d{name}")
        else:
            assert not got.any(), name


def _segmented_case(kept, gen):
    """A segmented SwiGLU FFN of two segments (3 and 2 rows: `kept`, then every other neuron)."""
    from reference import swiglu_ffn_ref
    from test_op_gradients import HIDDEN, INTERMEDIATE

    lists = [kept, torch.arange(0, INTERMEDIATE, 2)]
    segments, flat, offsets, _ = dk.pack_segments([3, 2], lists)
    make = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()  # noqa: E731
    inputs_ = dict(x=make(5, HIDDEN), w_gate=make(INTERMEDIATE, HIDDEN) / HIDDEN ** 0.5,
                   w_up=make(INTERMEDIATE, HIDDEN) / HIDDEN ** 0.5,
                   w_down_t=make(INTERMEDIATE, HIDDEN) / INTERMEDIATE ** 0.5)
    inputs_ = {k: v.detach().requires_grad_() for k, v in inputs_.items()}

    def call(x, w_gate, w_up, w_down_t):
        return dk.segmented_gather_swiglu_ffn(x, w_gate, w_up, w_down_t, segments, flat, offsets)

    def reference(x, w_gate, w_up, w_down_t):
        return torch.cat([swiglu_ffn_ref(x[:3], w_gate, w_up, w_down_t, lists[0]),
                          swiglu_ffn_ref(x[3:], w_gate, w_up, w_down_t, lists[1])])

    return call, reference, inputs_


def test_inputs_in_autocasts_dtype_run_the_kernels(monkeypatch):
    """A bfloat16 model under bfloat16 autocast: nothing to cast, so the ops run the gather
    kernels, not torch's ops on copies of the kept rows."""
    from doe_kernels.ops import library

    def refuse(*args, **kwargs):
        raise AssertionError("took the autocast path")

    for name in ("_autocast_rows_linear", "_autocast_cols_linear"):
        monkeypatch.setattr(library, name, refuse)
    model = build("llama").to(torch.bfloat16)
    ids, attention = inputs("llama")
    with dk.plugged(model, mixed_mask(model)), torch.no_grad(), torch.autocast(**AUTOCAST):
        out = output_of(model, ids, attention)
    assert out.dtype == torch.bfloat16
    with pytest.raises(AssertionError, match="autocast path"), torch.autocast(**AUTOCAST):
        library.gather_swiglu_ffn(torch.randn(2, 8), *torch.randn(3, 4, 8).bfloat16(),
                                  torch.tensor([1]), "auto")


def test_autocast_accepts_only_the_dtypes_it_casts():
    """Under autocast the ops take float32, float16 and bfloat16 tensors together, and still
    refuse a float64 one, naming it."""
    x, w, w_t = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10, 8)
    kept = torch.tensor([1, 3, 5])
    with torch.autocast(**AUTOCAST):
        out = dk.ops.gather_ffn(x.bfloat16(), w, None, w_t.half(), None, kept, "gelu")
        assert out.dtype == torch.bfloat16
        with pytest.raises(TypeError, match="w_in has dtype torch.float64"):
            dk.ops.gather_ffn(x, w.double(), None, w_t, None, kept, "gelu")
    with pytest.raises(TypeError, match="w_in has dtype torch.float32"):
        dk.ops.gather_ffn(x.bfloat16(), w, None, w_t, None, kept, "gelu")


@pytest.mark.parametrize("name", ["bert", "llama", "qwen2"])
@pytest.mark.parametrize("keep", ["everything", "mixed"])
def test_each_patched_module_gives_the_dtype_autocast_gives_the_original(name, keep):
    """Under autocast a patched module's output has the dtype the module it replaces gives (the
    projections' bfloat16: a float32 bias added after the product made the dense path of an
    output projection keeping every input float32, and what followed it, its dropout, too)."""
    model = build(name)
    ids, attention = inputs(name)

    def dtypes():
        seen = {}

        def record(name):
            def hook(module, args, out):
                out = out[0] if isinstance(out, tuple) else out
                seen.setdefault(name, getattr(out, "dtype", None))
            return hook

        hooks = [module.register_forward_hook(record(name))
                 for name, module in model.named_modules() if name]
        try:
            with torch.no_grad(), torch.autocast(**AUTOCAST):
                model(input_ids=ids, attention_mask=attention)
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    expected = dtypes()
    mask = dk.ExpertMask.random(model, ffn_keep=1.0, heads_keep=1.0) if keep == "everything" \
        else mixed_mask(model)
    with dk.plugged(model, mask, backend="torch"):
        got = dtypes()
    common = {name for name in got if name in expected} - {""}
    assert len(common) > 10
    assert {name: got[name] for name in common} == {name: expected[name] for name in common}
