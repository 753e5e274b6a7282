"""Layer-wise reconstruction (doe_kernels.localize.layerwise): each pruned projection fitted by
least squares on the inputs the pruned model gives it, in forward order."""
import pytest
import torch

import doe_kernels as dk
from doe_kernels.localize.compensate import Calibration
from doe_kernels.localize.layerwise import UnprunedTargets, layerwise_reconstruction
from doe_kernels.localize.recover import masked
from doe_kernels.models import UnsupportedModelError
from model_utils import build, inputs
from moe_utils import mixtral
from test_compensate import (
    calibration,
    fit_on_a_model_in_mixed_modes,
    layer0_mask,
    nothing_pruned,
    real_token_rows,
)

torch.set_num_threads(1)


def assert_same_fit(a, b, atol=1e-5):
    for kind in ("ffn_scales", "head_scales", "ffn_bias", "attn_bias"):
        assert set(getattr(a, kind)) == set(getattr(b, kind)), kind
        for layer, value in getattr(a, kind).items():
            assert torch.allclose(value, getattr(b, kind)[layer], atol=atol), (kind, layer)


@pytest.mark.parametrize("kind", ["ffn", "attn"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_the_first_layer_gets_the_one_shot_fit(name, kind):
    """Layer 0 sees the same inputs pruned or not: the fit is `Calibration.fit`'s."""
    model = build(name)
    batches = calibration(name, count=3)
    mask = layer0_mask(model, kind)
    fitted = layerwise_reconstruction(model, mask, batches, ridge=0.0)
    assert fitted.scaled and fitted.bias_compensated
    assert_same_fit(fitted, Calibration.collect(model, batches).fit(mask, ridge=0.0))
    scales_only = layerwise_reconstruction(model, mask, batches, bias=False)
    assert_same_fit(scales_only, Calibration.collect(model, batches).fit(mask, bias=False))
    bias_only = layerwise_reconstruction(model, mask, batches, scales=False)
    assert_same_fit(bias_only, Calibration.collect(model, batches).fit(mask, scales=False))


def down_projection(model, layer):
    spec = dk.models.spec_of(model)
    found = dk.models.find_layers(model)[1][layer]
    return found.output.dense if spec.family == "bert" else found.mlp.down_proj


def two_pruned_ffn_layers(model, keep=0.3):
    spec = dk.models.spec_of(model)
    gen = torch.Generator().manual_seed(1)
    size = spec.intermediate_size
    return dk.ExpertMask(ffn={l: torch.randperm(size, generator=gen)[:round(size * keep)].sort()
                              .values for l in (0, 1)}, spec=spec.as_dict())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_deeper_layer_is_the_least_squares_fit_on_its_pruned_inputs(name):
    """Layer 1's scales and bias solve least squares from its inputs in the pruned model (layer 0
    reconstructed) to the unpruned model's down projection: a direct solve agrees, and its output
    is closer to the unpruned one than the one-shot fit's (made on the unpruned inputs)."""
    model = build(name)
    batches = calibration(name, count=6)
    mask = two_pruned_ffn_layers(model)
    layerwise = layerwise_reconstruction(model, mask, batches, ridge=0.0)
    one_shot = Calibration.collect(model, batches).fit(mask, ridge=0.0)
    down = down_projection(model, 1)
    weight = down.weight.detach().double()
    target = real_token_rows(model, down, batches, inputs=True) @ weight.T
    errors = {}
    for label, fitted in (("layerwise", layerwise), ("one-shot", one_shot)):
        assert torch.allclose(fitted.ffn_scales[0], layerwise.ffn_scales[0], atol=1e-5)
        layer0 = fitted.replace(ffn_scales={0: fitted.ffn_scales[0]},
                                ffn_bias={0: fitted.ffn_bias[0]})
        with masked(model, layer0):  # layer 1's inputs: pruned columns zero, kept ones unscaled
            h = real_token_rows(model, down, batches, inputs=True)
        kept = mask.ffn[1]
        h = h[:, kept]
        predicted = ((h * fitted.ffn_scales[1].double()) @ weight[:, kept].T
                     + fitted.ffn_bias[1].double())
        errors[label] = float(((predicted - target) ** 2).mean())
        if label == "layerwise":  # against a direct solve: kept scales, one bias per feature
            tokens, hidden = h.shape[0], weight.shape[0]
            columns = (h[:, None, :] * weight[None, :, kept]).reshape(tokens * hidden, -1)
            system = torch.cat((columns, torch.eye(hidden, dtype=torch.float64)
                                .repeat(tokens, 1)), dim=1)
            solution = torch.linalg.lstsq(system, target.reshape(-1, 1)).solution[:, 0]
            assert torch.allclose(fitted.ffn_scales[1].double(), solution[:kept.numel()],
                                  atol=1e-3)
            assert torch.allclose(fitted.ffn_bias[1].double(), solution[kept.numel():],
                                  atol=1e-3)
    assert errors["layerwise"] < errors["one-shot"], errors


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_nothing_pruned_is_the_identity(name):
    model = build(name)
    for mask in nothing_pruned(model):
        assert layerwise_reconstruction(model, mask, calibration(name)) == mask


def test_fitting_never_changes_the_model_and_replaces_the_masks_own():
    model, mask, fitted = fit_on_a_model_in_mixed_modes(layerwise_reconstruction)
    assert set(fitted.ffn_scales) == set(fitted.head_scales) == {0, 1, 2}
    assert set(fitted.ffn_bias) == set(fitted.attn_bias) == {0, 1, 2}
    assert fitted.with_scales().with_bias() == mask
    assert layerwise_reconstruction(model, fitted, calibration("bert")) == fitted
    with dk.plugged(model, fitted), torch.no_grad():
        assert model(**calibration("bert")[0]).logits.isfinite().all()


def test_a_llama_model_with_padding_and_a_kv_cache_in_its_config():
    """Left and right padding, and a config that asks for a KV cache: the fit runs the layers
    without one, and equals the fit on the examples one at a time without padding."""
    model = build("llama")
    assert model.config.use_cache
    mask = dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5)
    ids, attention = inputs("llama")  # row 1 left-padded
    attention[2, -3:] = 0  # row 2 right-padded
    padded = layerwise_reconstruction(model, mask, [dict(input_ids=ids,
                                                         attention_mask=attention)])
    real = [dict(input_ids=ids[i:i + 1, attention[i].bool()],
                 attention_mask=attention[i:i + 1, attention[i].bool()])
            for i in range(ids.shape[0])]
    assert_same_fit(padded, layerwise_reconstruction(model, mask, real), atol=1e-4)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_layer_keeping_no_neuron_and_batches_from_a_generator(name):
    """A layer whose FFN keeps no neuron gets an empty scale vector and a bias delta (its whole
    FFN output replaced by a constant), with the scopes and rates localize searches; the batches
    may come from a one-pass generator (as Expert.calibration_batches gives them)."""
    model = build(name)
    spec = dk.models.spec_of(model)
    mask = dk.ExpertMask(ffn={0: [], 1: list(range(spec.intermediate_size // 2))},
                         spec=spec.as_dict())
    batches = calibration(name)
    fitted = layerwise_reconstruction(model, mask, (batch for batch in batches))
    assert_same_fit(fitted, layerwise_reconstruction(model, mask, batches), atol=0)
    assert fitted.ffn_scales[0].numel() == 0 and fitted.ffn_bias[0].isfinite().all()
    with dk.plugged(model, fitted), torch.no_grad():
        assert model(**batches[0])[0].isfinite().all()


def test_misuse_is_refused():
    model = build("bert")
    mask = dk.ExpertMask.random(model, ffn_keep=0.3)
    with pytest.raises(ValueError, match="nothing to fit"):
        layerwise_reconstruction(model, mask, calibration("bert"), scales=False, bias=False)
    with dk.plugged(model, mask), pytest.raises(ValueError, match="unpruned model"):
        layerwise_reconstruction(model, mask, calibration("bert"))
    with pytest.raises(ValueError, match="no real token"):
        layerwise_reconstruction(model, mask, [])
    ids, attention = inputs("bert")
    with pytest.raises(ValueError, match="no real token"):
        layerwise_reconstruction(model, mask, [dict(input_ids=ids,
                                                    attention_mask=torch.zeros_like(attention))])
    with pytest.raises(ValueError, match="needs each batch's attention_mask"):
        layerwise_reconstruction(model, mask, [dict(input_ids=ids)])
    with pytest.raises(ValueError, match="attention_mask covers 9 tokens"):  # (BERT broadcasts it)
        layerwise_reconstruction(model, mask, [dict(input_ids=ids, attention_mask=attention[:1])])
    with pytest.raises(TypeError, match="keyword dicts"):
        layerwise_reconstruction(model, mask, [ids])
    with pytest.raises(ValueError, match="ffn names layer 5"):
        layerwise_reconstruction(model, dk.ExpertMask({5: [0]}), calibration("bert"))
    with pytest.raises(UnsupportedModelError, match="BERT and LLaMA"):
        layerwise_reconstruction(mixtral(), mask, calibration("llama"))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_token_weights_count_a_token_as_often_as_they_say(name):
    from test_compensate import weighted_and_repeated

    model = build(name)
    mask = dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5)
    weighted, repeated = weighted_and_repeated(name)
    assert_same_fit(layerwise_reconstruction(model, mask, weighted),
                    layerwise_reconstruction(model, mask, repeated), atol=1e-4)


def count_unpruned_layers(monkeypatch) -> list:
    """A list that grows by one per unpruned layer run (layerwise._unpruned_layer): the work
    that shared targets exist to do once."""
    from doe_kernels.localize import layerwise

    calls, real = [], layerwise._unpruned_layer
    monkeypatch.setattr(layerwise, "_unpruned_layer",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_targets_computed_once_serve_every_mask_and_token_weighting(name, monkeypatch):
    """One UnprunedTargets serves masks at several rates, with heads or not, and the batches with
    token weights (the same real tokens): each fit equals the one that computes its own, and runs
    no unpruned layer itself."""
    model = build(name)
    batches = calibration(name, count=3)
    weighted = [dict(batch, token_weights=batch["attention_mask"].float() * (1 + seed))
                for seed, batch in enumerate(batches)]
    unpruned_layers = count_unpruned_layers(monkeypatch)
    shared = UnprunedTargets(model, batches)
    layers = dk.models.spec_of(model).num_layers
    assert len(unpruned_layers) == layers
    assert shared.kinds == ("heads", "ffn")
    assert not any(y.requires_grad for layer in shared.layers for kind in layer.values()
                   for y in kind)  # no autograd graph kept alive
    for keep in (0.2, 0.7):
        for heads_keep in (1.0, 0.5):
            mask = dk.ExpertMask.random(model, ffn_keep=keep, heads_keep=heads_keep, seed=3)
            for data in (batches, weighted):
                before = len(unpruned_layers)
                fitted = layerwise_reconstruction(model, mask, data, unpruned=shared)
                assert len(unpruned_layers) == before  # the shared targets, nothing recomputed
                own = layerwise_reconstruction(model, mask, data)
                assert len(unpruned_layers) == before + layers  # (this one computes its own)
                assert_same_fit(fitted, own, atol=0)


def test_targets_of_other_batches_or_kinds_are_refused():
    model = build("llama")
    batches = calibration("llama", count=2)
    ffn_only = UnprunedTargets(model, batches, kinds=("ffn",))
    with_heads = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5)
    with pytest.raises(ValueError, match=r"hold \['ffn'\], not \['heads'\]"):
        layerwise_reconstruction(model, with_heads, batches, unpruned=ffn_only)
    ffn_mask = dk.ExpertMask.random(model, ffn_keep=0.5)
    for other in (calibration("llama", count=3), calibration("llama", count=2)[::-1]):
        with pytest.raises(ValueError, match="other calibration batches"):
            layerwise_reconstruction(model, ffn_mask, other, unpruned=ffn_only)
    with pytest.raises(ValueError, match="kinds must be among"):
        UnprunedTargets(model, batches, kinds=("mlp",))
    with dk.plugged(model, ffn_mask), pytest.raises(ValueError, match="unpruned model"):
        UnprunedTargets(model, batches)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
