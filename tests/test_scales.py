"""An expert's scales of its kept units (ffn_scales, head_scales): held by the mask, applied by the
patched model in the down and attention output projections, never written into the shared weights."""
import pickle

import pytest
import torch

import doe_kernels as dk
from model_utils import (
    build,
    convert_while_patched,
    inputs,
    masked_dense,
    mixed_mask,
    output_of,
    snapshot,
    state_dict_equal,
)
from moe_utils import mixtral, moe_reference
from reference import assert_close


def kept_count(table, layer, total):
    return table[layer].numel() if layer in table else total


def with_scales(model, mask, seed=0, spread=0.5):
    """`mask` with random scales (around 1) of every layer's kept neurons and heads."""
    gen = torch.Generator().manual_seed(seed)
    spec = dk.models.spec_of(model)

    def draw(count):
        return 1 + spread * torch.randn(count, generator=gen)

    return mask.with_scales(
        ffn_scales={l: draw(kept_count(mask.ffn, l, spec.intermediate_size))
                    for l in range(spec.num_layers)},
        head_scales={l: draw(kept_count(mask.heads, l, spec.num_heads))
                     for l in range(spec.num_layers)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "mistral", "qwen2"])
def test_patched_with_scales_equals_scaled_masked_dense(name, dtype):
    model = build(name, dtype)
    ids, attention = inputs(name)
    # layer 0 keeps no neuron, layer 1 keeps all (the dense path then applies the scales),
    # layer 2 keeps no head; deltas too
    plain = mixed_mask(model, ffn_keep=0.4, heads_keep=0.5)
    hidden = dk.models.spec_of(model).hidden_size
    mask = with_scales(model, plain).with_bias(ffn_bias={2: 0.1 * torch.ones(hidden)},
                                               attn_bias={0: -0.1 * torch.ones(hidden)})
    with torch.no_grad():
        reference = output_of(masked_dense(model.double(), mask), ids, attention)
        unscaled = output_of(masked_dense(model, mask.with_scales()), ids, attention)
        model.to(dtype)
        dense_same_dtype = output_of(masked_dense(model, mask), ids, attention)
        with dk.plugged(model, mask):
            out = output_of(model, ids, attention)
    assert (reference - unscaled).abs().max() > 1e-4  # the scales matter
    assert_close(out, reference, dense_same_dtype, f"{name} {dtype}")


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_scales_of_ones_equal_no_scales(name):
    model = build(name)
    ids, attention = inputs(name)
    mask = dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5)
    spec = dk.models.spec_of(model)
    ones = mask.with_scales(ffn_scales={l: torch.ones(mask.ffn[l].numel()) for l in range(3)},
                            head_scales={l: torch.ones(mask.heads[l].numel()) for l in range(3)})
    assert ones.scaled and ones != mask and spec.num_layers == 3
    with torch.no_grad():
        with dk.plugged(model, mask):
            plain = output_of(model, ids, attention)
        with dk.plugged(model, ones):
            out = output_of(model, ids, attention)
    assert torch.allclose(out, plain, atol=1e-6)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_swaps_and_unpatch_are_exact(name):
    model = build(name)
    ids, attention = inputs(name)
    plain = mixed_mask(model)
    scaled = with_scales(model, plain)
    before = snapshot(model)
    with torch.no_grad():
        expected = {m: output_of(masked_dense(model, m), ids, attention) for m in (plain, scaled)}
        dk.patch(model, scaled)
        assert state_dict_equal(snapshot(model), before)  # state_dict: the original model only
        for swap in range(5):  # ends on the plain mask
            mask = (plain, scaled)[swap % 2]
            dk.patch(model, mask)
            assert torch.allclose(output_of(model, ids, attention), expected[mask], atol=1e-5)
        assert all(m.scales is None for m in model.modules() if hasattr(m, "scales"))
        dk.unpatch(model)
    assert state_dict_equal(snapshot(model), before)
    assert not any(hasattr(m, "scales") for m in model.modules())


def test_converting_a_patched_model_converts_its_scales():
    model = build("llama")
    mask = with_scales(model, mixed_mask(model))
    convert_while_patched(model, mask, mask.with_scales(), "scales", 6, "llama")


def test_scales_survive_files_copies_and_pickles(tmp_path):
    model = build("bert")
    mask = with_scales(model, mixed_mask(model))
    mask.save(tmp_path / "mask.safetensors")
    loaded = dk.ExpertMask.load(tmp_path / "mask.safetensors")
    assert loaded == mask and loaded != mask.with_scales()
    assert all(torch.equal(loaded.ffn_scales[l], mask.ffn_scales[l]) for l in range(3))
    assert {k for k in mask.tensors() if "scales" in k} == {
        f"{kind}.{l}" for kind in ("ffn_scales", "head_scales") for l in range(3)}
    assert mask.with_skip({}) == mask and mask.with_bias() == mask  # other copies keep them
    assert pickle.loads(pickle.dumps(mask)) == mask
    assert "scaled" in repr(mask) and mask.summary()["scaled"]
    assert mask.ffn_scales[1] is not mask.ffn_scales[1]  # read-only: lookups are copies


def test_scales_are_validated_before_anything_changes():
    model = build("bert")
    spec = dk.models.spec_of(model)
    mask = dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5)
    with pytest.raises(ValueError, match=r"ffn_scales\[0\] has 3 values, but layer 0 keeps"):
        mask.with_scales(ffn_scales={0: torch.ones(3)})
    with pytest.raises(ValueError, match=r"head_scales\[2\] has 5 values, but layer 2 keeps all"):
        dk.ExpertMask(head_scales={2: torch.ones(5)}, spec=spec.as_dict())
    with pytest.raises(ValueError, match="non-finite"):
        mask.with_scales(head_scales={0: torch.tensor([1.0, float("nan")])})
    with pytest.raises(TypeError, match="floating-point"):
        mask.with_scales(head_scales={0: torch.ones(2, dtype=torch.int64)})
    # without the model's sizes the mask cannot tell; patch can, and refuses before any change
    unsized = dk.ExpertMask(ffn_scales={1: torch.ones(5)})
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ffn_scales\[1\] has 5 values, but layer 1 keeps all"):
        dk.patch(model, unsized)
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)
    with pytest.raises(TypeError, match="unknown mask table"):
        mask.replace(scales={})


def test_new_kept_lists_drop_the_reconstruction_fitted_for_the_old():
    model = build("bert")
    hidden = dk.models.spec_of(model).hidden_size
    mask = with_scales(model, dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5)).with_bias(
        ffn_bias={0: torch.ones(hidden)}, attn_bias={0: torch.ones(hidden)})
    other = dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5, seed=1)
    new_ffn = mask.replace(ffn=other.ffn)
    assert not new_ffn.ffn_scales and not new_ffn.ffn_bias  # fitted for the old neurons
    assert new_ffn == dk.ExpertMask(other.ffn, mask.heads, mask.spec, head_scales=mask.head_scales,
                                    attn_bias=mask.attn_bias)
    assert new_ffn.head_scales.keys() == mask.head_scales.keys() and new_ffn.attn_bias
    new_heads = mask.replace(heads=other.heads)
    assert not new_heads.head_scales and not new_heads.attn_bias
    assert new_heads.ffn_scales.keys() == mask.ffn_scales.keys() and new_heads.ffn_bias
    given = mask.replace(ffn=other.ffn, ffn_scales={1: torch.ones(other.ffn[1].numel())})
    assert list(given.ffn_scales) == [1]
    assert mask.replace(moe={}) == mask  # other tables keep everything


def test_the_dense_path_checks_the_scales_length():
    from doe_kernels.ops import scale_columns

    x = torch.randn(2, 3, 5)
    assert scale_columns(x, None) is x
    torch.testing.assert_close(scale_columns(x, torch.arange(5.0)), x * torch.arange(5.0))
    with pytest.raises(ValueError, match="one scale per feature"):
        scale_columns(x, torch.ones(1))


def test_mixtral_takes_head_scales_only():
    model = mixtral()
    ids, attention = inputs("llama")
    spec = dk.models.spec_of(model)
    mask = dk.ExpertMask.random(model, heads_keep=0.5, experts_keep=0.5)
    gen = torch.Generator().manual_seed(0)
    scaled = mask.with_scales(head_scales={l: 1 + 0.5 * torch.randn(mask.heads[l].numel(),
                                                                      generator=gen)
                                           for l in mask.heads})
    with torch.no_grad():
        reference = moe_reference(model.double(), scaled)
        for index, layer in enumerate(reference.model.layers):
            cols = (scaled.heads[index][:, None] * spec.head_dim
                    + torch.arange(spec.head_dim)).reshape(-1)
            layer.self_attn.o_proj.weight[:, cols] *= scaled.head_scales[index].double(
                ).repeat_interleave(spec.head_dim)
        expected = output_of(reference, ids, attention)
        model.float()
        with dk.plugged(model, scaled):
            out = output_of(model, ids, attention)
    assert_close(out, expected, None, "mixtral with head scales")
    ffn = {0: torch.ones(spec.intermediate_size)}
    with pytest.raises(ValueError, match="ffn_scales"):
        dk.patch(model, mask.with_scales(ffn_scales=ffn))
    assert not dk.is_patched(model)
