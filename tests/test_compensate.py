"""Bias compensation (doe_kernels.localize.compensate): the deltas give back the pruned units' mean
contribution on the calibration data, and fitting them never changes the model."""
import pytest
import torch

import doe_kernels as dk
from doe_kernels.localize.compensate import bias_compensation
from model_utils import build, inputs, snapshot, state_dict_equal
from moe_utils import mixtral

# per family: the module whose output holds the FFN's (resp. the attention's) contribution
OUTPUTS = {"bert": {"ffn": "output.dense", "attn": "attention.output.dense"},
           "llama": {"ffn": "mlp", "attn": "self_attn"}}


def calibration(name, count=2):
    return [dict(zip(("input_ids", "attention_mask"), inputs(name, seed=seed)))
            for seed in range(1, count + 1)]


def real_token_rows(model, module, batches, inputs=False):
    """The output (or input) rows of `module` at the real tokens of every batch, float64."""
    rows, keep = [], [None]

    def record(x):
        x = x[0] if isinstance(x, tuple) else x
        rows.append(x.reshape(-1, x.shape[-1])[keep[0]].double())

    handle = (module.register_forward_pre_hook(lambda m, args: record(args[0])) if inputs
              else module.register_forward_hook(lambda m, args, out: record(out)))
    try:
        with torch.no_grad():
            for batch in batches:
                keep[0] = batch["attention_mask"].reshape(-1).bool()
                model(**batch)
    finally:
        handle.remove()
    return torch.cat(rows)


def output_mean(model, layer, path, batches):
    """The mean over real tokens of the output of `layer`'s module at `path` (float64)."""
    return real_token_rows(model, layer.get_submodule(path), batches).mean(0)


def layer0_mask(model, kind, keep=0.4, seed=0):
    """A mask pruning only layer 0's FFN neurons (kind="ffn") or attention heads (kind="attn")."""
    spec = dk.models.spec_of(model)
    size = spec.intermediate_size if kind == "ffn" else spec.num_heads
    gen = torch.Generator().manual_seed(seed)
    kept = torch.randperm(size, generator=gen)[:max(1, round(size * keep))].sort().values
    table = {0: kept}
    return dk.ExpertMask(ffn=table if kind == "ffn" else None,
                         heads=table if kind == "attn" else None, spec=spec.as_dict())


@pytest.mark.parametrize("kind", ["ffn", "attn"])
@pytest.mark.parametrize("name", ["bert", "llama", "qwen2"])
def test_compensated_layer_keeps_its_mean_output(name, kind):
    model = build(name)
    batches = calibration(name)
    family = dk.models.spec_of(model).family
    path = OUTPUTS[family][kind]
    mask = layer0_mask(model, kind)
    layer = dk.models.find_layers(model)[1][0]  # the patch swaps modules inside it
    dense = output_mean(model, layer, path, batches)
    compensated = bias_compensation(model, mask, batches)
    table = compensated.ffn_bias if kind == "ffn" else compensated.attn_bias
    assert list(table) == [0]
    assert not (compensated.attn_bias if kind == "ffn" else compensated.ffn_bias)
    with dk.plugged(model, mask):
        plain = output_mean(model, layer, path, batches)
    with dk.plugged(model, compensated):
        fixed = output_mean(model, layer, path, batches)
    scale = dense.abs().max().item()
    assert (plain - dense).abs().max().item() > 1e-2 * scale  # pruning moved the mean
    assert torch.allclose(fixed, dense, atol=1e-5 * max(scale, 1.0), rtol=0)


def nothing_pruned(model):
    """The masks that keep every unit: an empty one, and one listing every index."""
    spec = dk.models.spec_of(model)
    return (dk.ExpertMask(), dk.ExpertMask(
        ffn={l: torch.arange(spec.intermediate_size) for l in range(spec.num_layers)},
        heads={l: torch.arange(spec.num_heads) for l in range(spec.num_layers)}))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_nothing_pruned_gives_no_delta(name):
    model = build(name)
    for mask in nothing_pruned(model):
        compensated = bias_compensation(model, mask, calibration(name))
        assert not compensated.ffn_bias and not compensated.attn_bias
        assert compensated == mask


def fit_on_a_model_in_mixed_modes(fit):
    """(model, mask, fit(model, mask, batches)) on a BERT model in mixed train/eval modes, after
    checking that fitting left the model's weights, modes and hooks as they were."""
    model = build("bert").train()
    model.bert.encoder.layer[1].eval()  # mixed modes come back as they were
    modes = [m.training for m in model.modules()]
    before = snapshot(model)
    mask = dk.ExpertMask.random(model, ffn_keep=0.3, heads_keep=0.5)
    fitted = fit(model, mask, calibration("bert"))
    assert state_dict_equal(snapshot(model), before)
    assert [m.training for m in model.modules()] == modes
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    return model, mask, fitted


def test_fitting_never_changes_the_model():
    model, mask, compensated = fit_on_a_model_in_mixed_modes(bias_compensation)
    assert set(compensated.ffn_bias) == set(compensated.attn_bias) == {0, 1, 2}
    assert compensated.with_bias() == mask
    assert compensated == bias_compensation(model, compensated, calibration("bert"))  # replaced


def test_inputs_embeds_batches_fit_the_same_deltas():
    model = build("bert")
    mask = dk.ExpertMask.random(model, ffn_keep=0.3, heads_keep=0.5)
    batches = calibration("bert")
    with torch.no_grad():
        embedded = [dict(inputs_embeds=model.get_input_embeddings()(b["input_ids"]),
                         attention_mask=b["attention_mask"]) for b in batches]
    by_ids = bias_compensation(model, mask, batches)
    by_embeds = bias_compensation(model, mask, embedded)
    for l in range(3):
        assert torch.allclose(by_ids.ffn_bias[l], by_embeds.ffn_bias[l], atol=1e-5)
        assert torch.allclose(by_ids.attn_bias[l], by_embeds.attn_bias[l], atol=1e-5)


def test_padding_is_left_out_of_the_means():
    model = build("llama")
    mask = layer0_mask(model, "ffn")
    ids, attention = inputs("llama")
    padded = bias_compensation(model, mask, [dict(input_ids=ids, attention_mask=attention)])
    real = [dict(input_ids=ids[i:i + 1, attention[i].bool()]) for i in range(ids.shape[0])]
    unpadded = bias_compensation(model, mask, real)
    assert torch.allclose(padded.ffn_bias[0], unpadded.ffn_bias[0], atol=1e-5)


def pruned_head_columns(mask, spec, layer):
    """The attention output projection's input columns of the heads `mask` prunes in `layer`."""
    pruned = torch.ones(spec.num_heads, dtype=torch.bool)
    pruned[mask.heads.get(layer, torch.arange(spec.num_heads))] = False
    return pruned.repeat_interleave(spec.head_dim)


def test_mixtral_gets_attention_deltas_only():
    """The experts get no delta; each layer's attention delta is the pruned heads' mean
    contribution to its output projection on the unpruned model's inputs, and the compensated
    first layer's attention (whose input pruning does not change) keeps its mean output."""
    model = mixtral()
    spec = dk.models.spec_of(model)
    mask = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5, experts_keep=0.5)
    batches = calibration("llama")
    compensated = bias_compensation(model, mask, batches)
    assert not compensated.ffn_bias and set(compensated.attn_bias) == {0, 1, 2}
    for index, layer in enumerate(model.model.layers):
        o_proj = layer.self_attn.o_proj
        cols = pruned_head_columns(mask, spec, index)
        x = real_token_rows(model, o_proj, batches, inputs=True)
        expected = x[:, cols].mean(0) @ o_proj.weight.detach().double()[:, cols].T
        scale = expected.abs().max().item()
        assert scale > 1e-3
        assert torch.allclose(compensated.attn_bias[index].double(), expected, rtol=0,
                              atol=1e-5 * max(scale, 1.0)), index
    layer = model.model.layers[0]
    dense = output_mean(model, layer, "self_attn", batches)
    with dk.plugged(model, mask):
        plain = output_mean(model, layer, "self_attn", batches)
    with dk.plugged(model, compensated):
        fixed = output_mean(model, layer, "self_attn", batches)
    scale = dense.abs().max().item()
    assert (plain - dense).abs().max().item() > 1e-2 * scale  # pruning moved the mean
    assert torch.allclose(fixed, dense, atol=1e-5 * max(scale, 1.0), rtol=0)


def test_misuse_is_refused():
    model = build("bert")
    mask = dk.ExpertMask.random(model, ffn_keep=0.3)
    with dk.plugged(model, mask), pytest.raises(ValueError, match="unpruned model"):
        bias_compensation(model, mask, calibration("bert"))
    with pytest.raises(ValueError, match="no real token"):
        bias_compensation(model, mask, [])
    read = iter(calibration("bert"))
    bias_compensation(model, mask, read)
    with pytest.raises(ValueError, match="such as a generator already read"):
        bias_compensation(model, mask, read)
    ids, attention = inputs("bert")
    with pytest.raises(ValueError, match="attention_mask covers 9 tokens"):
        bias_compensation(model, mask, [dict(input_ids=ids, attention_mask=attention[:1])])
    with pytest.raises(TypeError, match="keyword dicts"):
        bias_compensation(model, mask, [ids])
    with pytest.raises(ValueError, match="ffn names layer 5"):
        bias_compensation(model, dk.ExpertMask({5: [0]}), calibration("bert"))
    assert not any(m._forward_pre_hooks for m in model.modules())


def weighted_and_repeated(name):
    """(one batch whose example 0 weighs 2 and example 1 weighs 1, the unweighted batch holding
    example 0 twice): the same least-squares problem."""
    ids, attention = inputs(name, batch=2)
    weights = attention.to(torch.float32) * torch.tensor([[2.0], [1.0]])
    weighted = dict(input_ids=ids, attention_mask=attention, token_weights=weights)
    repeated = dict(input_ids=ids[[0, 0, 1]], attention_mask=attention[[0, 0, 1]])
    return [weighted], [repeated]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_token_weights_count_a_token_as_often_as_they_say(name):
    from doe_kernels.localize.compensate import Calibration

    model = build(name)
    mask = dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5)
    weighted, repeated = weighted_and_repeated(name)
    a = Calibration.collect(model, weighted).fit(mask)
    b = Calibration.collect(model, repeated).fit(mask)
    for kind in ("ffn_scales", "head_scales", "ffn_bias", "attn_bias"):
        assert getattr(a, kind) and set(getattr(a, kind)) == set(getattr(b, kind)), kind
        for layer, value in getattr(a, kind).items():
            assert torch.allclose(value, getattr(b, kind)[layer], atol=1e-4), (kind, layer)
    ones = dict(weighted[0], token_weights=torch.ones_like(weighted[0]["token_weights"]))
    unweighted = {k: v for k, v in weighted[0].items() if k != "token_weights"}
    assert bias_compensation(model, mask, [ones]) == bias_compensation(model, mask, [unweighted])


def test_bad_token_weights_are_refused():
    model = build("bert")
    mask = dk.ExpertMask.random(model, ffn_keep=0.4)
    ids, attention = inputs("bert")
    for weights, message in ((torch.ones(3, 4), "token_weights has shape"),
                             (-torch.ones(3, 9), "finite and >= 0"),
                             (torch.full((3, 9), float("nan")), "finite and >= 0")):
        with pytest.raises(ValueError, match=message):
            bias_compensation(model, mask, [dict(input_ids=ids, attention_mask=attention,
                                                 token_weights=weights)])
    with pytest.raises(ValueError, match="no real token"):
        bias_compensation(model, mask, [dict(input_ids=ids, attention_mask=attention,
                                             token_weights=torch.zeros(3, 9))])
