"""An expert's bias deltas (ffn_bias, attn_bias): held by the mask, added by the patched model to
the down and attention output projections, never written into the shared weights."""
import copy
import pickle

import pytest
import torch

import doe_kernels as dk
from model_utils import (
    convert_while_patched,
    add_bias,
    build,
    inputs,
    masked_dense,
    mixed_mask,
    output_of,
    snapshot,
    state_dict_equal,
)
from moe_utils import mixtral, moe_reference
from reference import assert_close


def with_deltas(model, mask, seed=0, ffn_layers=(0, 2), attn_layers=(1, 2), scale=0.5):
    """`mask` with random bias deltas in the given layers."""
    gen = torch.Generator().manual_seed(seed)
    size = dk.models.spec_of(model).hidden_size
    return mask.with_bias(ffn_bias={l: scale * torch.randn(size, generator=gen) for l in ffn_layers},
                          attn_bias={l: scale * torch.randn(size, generator=gen)
                                     for l in attn_layers})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "mistral", "qwen2"])
def test_patched_with_deltas_equals_masked_dense_with_deltas(name, dtype):
    model = build(name, dtype)
    ids, attention = inputs(name)
    mask = with_deltas(model, mixed_mask(model, ffn_keep=0.4, heads_keep=0.5))
    with torch.no_grad():
        reference = output_of(masked_dense(model.double(), mask), ids, attention)
        model.to(dtype)
        dense_same_dtype = output_of(masked_dense(model, mask), ids, attention)
        without = output_of(masked_dense(model, mask.with_bias()), ids, attention)
        with dk.plugged(model, mask):
            out = output_of(model, ids, attention)
    assert not torch.allclose(reference.to(dtype), without, atol=1e-2)  # the deltas matter
    assert_close(out, reference, dense_same_dtype, f"{name} {dtype}")


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_swapping_experts_with_and_without_deltas(name):
    model = build(name)
    ids, attention = inputs(name)
    plain = mixed_mask(model)
    compensated = with_deltas(model, plain)
    before = snapshot(model)
    with torch.no_grad():
        expected = {m: output_of(masked_dense(model, m), ids, attention)
                    for m in (plain, compensated)}
        dk.patch(model, compensated)
        first = output_of(model, ids, attention)
        assert state_dict_equal(snapshot(model), before)  # state_dict: the original model only
        for swap in range(6):
            mask = (plain, compensated)[swap % 2]
            dk.patch(model, mask)
            out = output_of(model, ids, attention)
            assert torch.allclose(out, expected[mask], atol=1e-5), f"swap {swap}"
        assert torch.equal(out, first)
        dk.patch(model, plain)
        assert all(m.bias_delta is None for m in model.modules() if hasattr(m, "bias_delta"))
        dk.unpatch(model)
    assert state_dict_equal(snapshot(model), before)
    assert not any(hasattr(m, "bias_delta") for m in model.modules())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_delta_of_zeros_equals_no_delta(name):
    model = build(name)
    ids, attention = inputs(name)
    mask = mixed_mask(model)
    hidden = dk.models.spec_of(model).hidden_size
    zeros = mask.with_bias(ffn_bias={l: torch.zeros(hidden) for l in range(3)},
                           attn_bias={l: torch.zeros(hidden) for l in range(3)})
    with torch.no_grad():
        with dk.plugged(model, mask):
            plain = output_of(model, ids, attention)
        with dk.plugged(model, zeros):
            out = output_of(model, ids, attention)
    assert torch.equal(out, plain)


def test_converting_a_patched_model_converts_its_deltas():
    model = build("llama")
    mask = with_deltas(model, mixed_mask(model))
    convert_while_patched(model, mask, mask.with_bias(), "bias_delta", 4, "llama")


def test_deltas_survive_files_copies_and_pickles(tmp_path):
    model = build("bert")
    mask = with_deltas(model, mixed_mask(model))
    mask.save(tmp_path / "mask.safetensors")
    loaded = dk.ExpertMask.load(tmp_path / "mask.safetensors")
    assert loaded == mask and loaded != mask.with_bias()
    assert all(torch.equal(loaded.ffn_bias[l], mask.ffn_bias[l]) for l in (0, 2))
    assert {k for k in mask.tensors() if "bias" in k} == {
        "ffn_bias.0", "ffn_bias.2", "attn_bias.1", "attn_bias.2"}
    assert dk.ExpertMask.from_tensors(mask.tensors("mask."), mask.spec, "mask.") == mask
    assert mask.with_skip({}) == mask  # other copies keep the deltas
    dk.patch(model, mask)
    for clone in (copy.deepcopy(mask), pickle.loads(pickle.dumps(mask))):
        assert clone == mask and repr(clone) == repr(mask)
    ids, attention = inputs("bert")
    with torch.no_grad():
        out = output_of(model, ids, attention)
        clone = pickle.loads(pickle.dumps(model))
        assert torch.equal(output_of(clone, ids, attention), out)
    dk.unpatch(model)


def test_deltas_are_read_only_and_reported():
    model = build("bert")
    mask = with_deltas(model, mixed_mask(model))
    delta = mask.ffn_bias[0]
    delta += 1  # a copy: the mask does not change
    assert torch.equal(mask.ffn_bias[0] + 1, delta)
    assert "bias-compensated" in repr(mask) and "bias-compensated" not in repr(mixed_mask(model))
    assert "bias-compensated" in repr(dk.ExpertMask(attn_bias={0: torch.zeros(3)}))
    summary = mask.summary()
    assert summary["bias_compensated"] and summary["ffn_bias_layers"] == 2
    assert "bias_compensated" not in mixed_mask(model).summary()
    with dk.plugged(model, mask):
        assert "bias-compensated" in str(model)


@pytest.mark.parametrize("make,error,match", [
    (lambda: dk.ExpertMask(ffn_bias={0: [0.0, float("nan")]}), ValueError,
     r"ffn_bias\[0\] holds 1 non-finite"),
    (lambda: dk.ExpertMask(attn_bias={2: torch.tensor([float("inf")])}), ValueError,
     r"attn_bias\[2\] holds 1 non-finite"),
    (lambda: dk.ExpertMask(ffn_bias={0: torch.tensor([1e39], dtype=torch.float64)}),
     ValueError, r"ffn_bias\[0\] holds value\(s\) out of float32's range"),
    (lambda: dk.ExpertMask(ffn_bias={0: torch.zeros(2, 3)}), ValueError, r"ffn_bias\[0\] must be 1-D"),
    (lambda: dk.ExpertMask(attn_bias={0: torch.arange(3)}), TypeError, "floating-point"),
    (lambda: dk.ExpertMask(ffn_bias={-1: [0.0]}), TypeError, "layer numbers"),
    (lambda: dk.ExpertMask(ffn_bias=[0.0]), TypeError, "must be a dict"),
])
def test_bad_deltas_are_refused_when_the_mask_is_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("bad,match", [
    (dict(ffn_bias={0: torch.zeros(47)}), r"ffn_bias\[0\] has 47 values, but the model's hidden "
                                          "size is 48"),
    (dict(attn_bias={1: torch.zeros(49)}), r"attn_bias\[1\] has 49 values"),
    (dict(attn_bias={3: torch.zeros(48)}), "attn_bias names layer 3, but the model has 3 layers"),
])
def test_bad_deltas_leave_the_model_unchanged(bad, match):
    model = build("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        dk.patch(model, dk.ExpertMask(**bad))
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)
    good = with_deltas(model, mixed_mask(model))
    dk.patch(model, good)
    with pytest.raises(ValueError, match=match):
        dk.patch(model, dk.ExpertMask(**bad))
    assert dk.current_mask(model) is good
    dk.unpatch(model)
    assert state_dict_equal(snapshot(model), before)


def test_mixtral_takes_attention_deltas_and_refuses_ffn_deltas():
    model = mixtral()
    ids, attention = inputs("llama")
    before = snapshot(model)
    mask = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5, experts_keep=0.5)
    with pytest.raises(ValueError, match="FFN bias deltas.*mixture-of-experts"):
        dk.patch(model, with_deltas(model, mask))
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)
    compensated = with_deltas(model, mask, ffn_layers=())
    with torch.no_grad():
        reference = moe_reference(model.double(), compensated)
        for index, layer in enumerate(reference.model.layers):
            if index in compensated.attn_bias:
                add_bias(layer.self_attn.o_proj, compensated.attn_bias[index])
        expected = output_of(reference, ids, attention)
        model.float()
        with dk.plugged(model, compensated):
            out = output_of(model, ids, attention)
    assert_close(out, expected, None, "mixtral with attention deltas")
    assert state_dict_equal(snapshot(model), before)


def test_an_expert_file_keeps_its_mask_deltas(tmp_path):
    from expert_utils import seq_cls_expert, tiny_bert

    model = tiny_bert(vocab=120)
    expert = seq_cls_expert(model)
    expert.mask = with_deltas(model, expert.mask, ffn_layers=(0, 1), attn_layers=(1,))
    expert.save(tmp_path / "expert.safetensors")
    loaded = dk.Expert.load(tmp_path / "expert.safetensors")
    assert loaded.mask == expert.mask and loaded.mask.bias_compensated
