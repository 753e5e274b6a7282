"""Reconstruction (doe_kernels.localize.compensate.reconstruction): least-squares scales of the kept
units and bias deltas give back a pruned layer's output on the data they were fitted on."""
import pytest
import torch

import doe_kernels as dk
from doe_kernels.localize.compensate import Calibration, bias_compensation, reconstruction
from model_utils import build
from moe_utils import mixtral
from test_compensate import (
    OUTPUTS,
    calibration,
    fit_on_a_model_in_mixed_modes,
    nothing_pruned,
    real_token_rows,
)

torch.set_num_threads(1)


def first_layer(model):
    return dk.models.find_layers(model)[1][0]  # found on the unpatched model, kept when patched


def layer_outputs(model, layer, path, batches):
    """The output of `layer`'s module at `path` on the real tokens of every batch (float64)."""
    return real_token_rows(model, layer.get_submodule(path), batches)


def duplicate_unit(model, kind):
    """Make unit 1 of layer 0 an exact copy of unit 0 (an FFN neuron, or an attention head with
    its own query, key, value and output columns); returns the mask that prunes the copy."""
    spec = dk.models.spec_of(model)
    layer = dk.models.find_layers(model)[1][0]
    with torch.no_grad():
        if kind == "ffn":
            rows = ([layer.intermediate.dense] if spec.family == "bert"
                    else [layer.mlp.gate_proj, layer.mlp.up_proj])
            cols = [layer.output.dense if spec.family == "bert" else layer.mlp.down_proj]
            first, second, size = [0], [1], spec.intermediate_size
        else:
            attn = layer.attention.self if spec.family == "bert" else layer.self_attn
            rows = ([attn.query, attn.key, attn.value] if spec.family == "bert"
                    else [attn.q_proj])  # LLaMA: heads 0 and 1 share KV head 0
            cols = [layer.attention.output.dense if spec.family == "bert" else attn.o_proj]
            first = list(range(spec.head_dim))
            second = list(range(spec.head_dim, 2 * spec.head_dim))
            size = spec.num_heads
        for linear in rows:
            linear.weight[second] = linear.weight[first]
            if linear.bias is not None:
                linear.bias[second] = linear.bias[first]
        for linear in cols:
            linear.weight[:, second] = linear.weight[:, first]
    kept = torch.tensor([0] + list(range(2, size)))
    table = {0: kept}
    return dk.ExpertMask(ffn=table if kind == "ffn" else None,
                         heads=table if kind == "attn" else None, spec=spec.as_dict())


@pytest.mark.parametrize("kind", ["ffn", "attn"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_pruned_copy_is_reconstructed_exactly(name, kind):
    model = build(name)
    mask = duplicate_unit(model, kind)
    batches = calibration(name, count=12)
    path = OUTPUTS[dk.models.spec_of(model).family][kind]
    layer = first_layer(model)
    dense = layer_outputs(model, layer, path, batches)
    fitted = reconstruction(model, mask, batches, ridge=0.0)
    scales = (fitted.ffn_scales if kind == "ffn" else fitted.head_scales)[0]
    expected = torch.ones_like(scales)
    expected[0] = 2.0  # the kept original does the work of its pruned copy too
    assert torch.allclose(scales, expected, atol=1e-3), scales[:4]
    bias = (fitted.ffn_bias if kind == "ffn" else fitted.attn_bias)[0]
    assert bias.abs().max() < 1e-3
    with dk.plugged(model, mask):
        plain = layer_outputs(model, layer, path, batches)
    with dk.plugged(model, fitted):
        out = layer_outputs(model, layer, path, batches)
    assert (out - dense).abs().max() < 1e-2 * (plain - dense).abs().max()
    assert torch.allclose(out, dense, atol=1e-5)


def contributions(model, batches):
    """Layer 0's FFN activations h of the real tokens (tokens, neurons) and its down projection's
    weight, float64."""
    down = dk.models.find_layers(model)[1][0].mlp.down_proj
    return real_token_rows(model, down, batches, inputs=True), down.weight.detach().double()


def test_scales_and_bias_are_the_least_squares_solution():
    """Against a direct least-squares solve: unknowns = the kept neurons' scales and one bias per
    output feature, one equation per (token, output feature)."""
    model = build("llama")
    spec = dk.models.spec_of(model)
    kept = torch.randperm(spec.intermediate_size, generator=torch.Generator().manual_seed(3))[:30]
    mask = dk.ExpertMask(ffn={0: kept.sort().values}, spec=spec.as_dict())
    batches = calibration("llama", count=12)
    fitted = reconstruction(model, mask, batches, ridge=0.0)
    h, weight = contributions(model, batches)
    kept = mask.ffn[0]
    tokens, hidden = h.shape[0], weight.shape[0]
    columns = (h[:, None, kept] * weight[None, :, kept]).reshape(tokens * hidden, -1)
    intercepts = torch.eye(hidden, dtype=torch.float64).repeat(tokens, 1)
    system = torch.cat((columns, intercepts), dim=1)
    target = (h @ weight.T).reshape(-1)
    solution = torch.linalg.lstsq(system, target[:, None]).solution[:, 0]
    assert torch.allclose(fitted.ffn_scales[0].double(), solution[:kept.numel()], atol=1e-3)
    assert torch.allclose(fitted.ffn_bias[0].double(), solution[kept.numel():], atol=1e-3)


@pytest.mark.parametrize("name", ["bert", "llama", "qwen2"])
def test_reconstruction_fits_the_first_layer_at_least_as_well_as_bias_alone(name):
    model = build(name)
    spec = dk.models.spec_of(model)
    gen = torch.Generator().manual_seed(0)
    mask = dk.ExpertMask(
        ffn={0: torch.randperm(spec.intermediate_size, generator=gen)[:spec.intermediate_size // 3]
             .sort().values},
        heads={0: torch.tensor([0, 2])}, spec=spec.as_dict())
    batches = calibration(name, count=4)
    family, layer = spec.family, first_layer(model)
    for kind in ("ffn", "attn"):
        path = OUTPUTS[family][kind]
        dense = layer_outputs(model, layer, path, batches)
        errors = {}
        for label, fitted in (("plain", mask), ("bias", bias_compensation(model, mask, batches)),
                              ("scales", reconstruction(model, mask, batches, bias=False,
                                                        ridge=0.0)),
                              ("both", reconstruction(model, mask, batches, ridge=0.0)),
                              ("ridge", reconstruction(model, mask, batches))):
            with dk.plugged(model, fitted):
                errors[label] = float(((layer_outputs(model, layer, path, batches) - dense) ** 2).mean())
        # exact least squares: the bias and the scales-only fits are special cases of "both";
        # with a ridge, s = 1 (the bias fit) still costs no penalty
        assert errors["both"] <= errors["bias"] * (1 + 1e-4), (kind, errors)
        assert errors["both"] <= errors["scales"] * (1 + 1e-4), (kind, errors)
        assert errors["ridge"] <= errors["bias"] * (1 + 1e-4), (kind, errors)
        assert errors["bias"] < errors["plain"] and errors["scales"] < errors["plain"], (kind, errors)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_nothing_pruned_is_the_identity(name):
    model = build(name)
    for mask in nothing_pruned(model):
        assert reconstruction(model, mask, calibration(name)) == mask


def test_fitting_never_changes_the_model_and_replaces_the_masks_own():
    model, mask, fitted = fit_on_a_model_in_mixed_modes(reconstruction)
    assert set(fitted.ffn_scales) == set(fitted.head_scales) == {0, 1, 2}
    assert fitted.bias_compensated and fitted.with_scales().with_bias() == mask
    assert reconstruction(model, fitted, calibration("bert")) == fitted
    scales_only = reconstruction(model, mask, calibration("bert"), bias=False)
    assert scales_only.scaled and not scales_only.bias_compensated


def test_expert_files_keep_the_reconstruction(tmp_path):
    from expert_utils import seq_cls_expert, tiny_bert

    model = tiny_bert()
    expert = seq_cls_expert(model)
    fitted = reconstruction(model, expert.mask, expert.calibration_batches(
        model, _Tokenizer(), ["a b c", "d e"], batch_size=2))
    expert.mask = fitted
    expert.save(tmp_path / "expert.safetensors")
    loaded = dk.Expert.load(tmp_path / "expert.safetensors")
    assert loaded.mask == fitted and loaded.mask.scaled


class _Tokenizer:
    """Enough of a tokenizer for Expert.encode on a BERT classifier: ids and a padding mask."""

    def __call__(self, texts, **kwargs):
        rows = [[7 + (ord(c) % 50) for c in text if c != " "] for text in texts]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return dict(input_ids=ids, attention_mask=mask)


def test_mixtral_gets_head_scales_only():
    """The experts get no scale or delta; each layer's head scales and attention delta are the
    direct least-squares solution on the unpruned model's inputs to its output projection (as
    `test_scales_and_bias_are_the_least_squares_solution` solves an FFN's)."""
    model = mixtral()
    spec = dk.models.spec_of(model)
    mask = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5, experts_keep=0.5)
    batches = calibration("llama")
    fitted = reconstruction(model, mask, batches, ridge=0.0)
    assert not fitted.ffn_scales and not fitted.ffn_bias and set(fitted.head_scales) == {0, 1, 2}
    for index, layer in enumerate(model.model.layers):
        o_proj = layer.self_attn.o_proj
        x = real_token_rows(model, o_proj, batches, inputs=True)
        scales, bias = head_least_squares(x, o_proj.weight.detach().double(), mask.heads[index],
                                          spec.head_dim)
        assert (scales - 1).abs().max() > 1e-2  # a fit that does something
        assert torch.allclose(fitted.head_scales[index].double(), scales, atol=1e-3), index
        assert torch.allclose(fitted.attn_bias[index].double(), bias, atol=1e-3), index
    with dk.plugged(model, fitted):
        pass


def head_least_squares(x, weight, kept, head_dim):
    """(scales of the kept heads, bias) minimising the squared error of the kept heads' scaled
    contributions plus the bias against the unpruned projection x W^T, one equation per (token,
    output feature): a direct solve."""
    tokens, hidden = x.shape[0], weight.shape[0]
    columns = [x[:, h * head_dim:(h + 1) * head_dim] @ weight[:, h * head_dim:(h + 1) * head_dim].T
               for h in kept.tolist()]  # each kept head's contribution (tokens, hidden)
    columns = torch.stack(columns, -1).reshape(tokens * hidden, -1)
    intercepts = torch.eye(hidden, dtype=torch.float64).repeat(tokens, 1)
    system = torch.cat((columns, intercepts), dim=1)
    solution = torch.linalg.lstsq(system, (x @ weight.T).reshape(-1, 1)).solution[:, 0]
    return solution[:len(kept)], solution[len(kept):]


def test_misuse_is_refused():
    model = build("bert")
    mask = dk.ExpertMask.random(model, ffn_keep=0.3)
    with pytest.raises(ValueError, match="nothing to fit"):
        reconstruction(model, mask, calibration("bert"), scales=False, bias=False)
    for ridge in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ridge must be a finite number"):
            reconstruction(model, mask, calibration("bert"), ridge=ridge)
    means = Calibration.collect(model, calibration("bert"), scales=False)
    assert means.fit(mask, scales=False).ffn_bias  # enough for bias compensation
    with pytest.raises(ValueError, match="means only"):
        means.fit(mask)
    spec = dk.models.spec_of(model)
    with torch.no_grad():  # a kept neuron that never fires: singular without a ridge
        model.bert.encoder.layer[0].intermediate.dense.weight[mask.ffn[0][0]] = 0
        model.bert.encoder.layer[0].intermediate.dense.bias[mask.ffn[0][0]] = -100
    single = dk.ExpertMask(ffn={0: mask.ffn[0]}, spec=spec.as_dict())
    with pytest.raises(ValueError, match="singular .* use a ridge > 0"):
        reconstruction(model, single, calibration("bert"), ridge=0.0)
    assert reconstruction(model, single, calibration("bert")).ffn_scales[0].isfinite().all()
    with dk.plugged(model, mask), pytest.raises(ValueError, match="unpruned model"):
        reconstruction(model, mask, calibration("bert"))
    with pytest.raises(ValueError, match="no real token"):
        reconstruction(model, mask, [])
