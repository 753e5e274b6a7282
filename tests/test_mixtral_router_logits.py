"""A patched Mixtral with output_router_logits=True: router logits (the router module's output for
every expert, dropped ones included) and the auxiliary loss, as transformers records them on the
unpatched model, whether the recording hooks were installed before, during or after the patch."""
import pytest
import torch

import doe_kernels as dk
from moe_utils import mixtral, moe_reference
from reference import assert_close

LAYERS = 3


def _inputs(batch=3, seq=9, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, seq), generator=gen)
    attention = torch.ones(batch, seq, dtype=torch.long)
    attention[1, :4] = 0  # left padding
    return ids, attention


def _run(model, ids, attention, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention, output_router_logits=True, **kwargs)


def _tokens(output, attention):
    """(logits, router logits per layer) of the real tokens (padding's rows dropped)."""
    real = attention.reshape(-1).bool()
    logits = output.logits.reshape(real.numel(), -1)[real]
    return logits, [r[real] for r in output.router_logits]


def _pruned_mask(model, dynamic_skip=False):
    mask = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=0.5, experts_keep=5 / 8, seed=3)
    return mask.with_skip({l: 0.4 for l in range(LAYERS)}) if dynamic_skip else mask


@pytest.mark.parametrize("dynamic_skip", [False, True])
def test_pruned_router_logits_equal_reference(dynamic_skip):
    """Logits equal the reference's (as in test_moe); router logits have the unpatched shapes
    and equal the reference router's raw logits, for kept and dropped experts alike."""
    model = mixtral()
    ids, attention = _inputs()
    mask = _pruned_mask(model, dynamic_skip)
    reference = moe_reference(model, mask, dynamic_skip)
    expected = _run(reference.double(), ids, attention)
    same_dtype = _run(moe_reference(model, mask, dynamic_skip), ids, attention)
    unpatched = _run(model, ids, attention)
    with dk.plugged(model, mask, dynamic_skip=dynamic_skip):
        got = _run(model, ids, attention)
    assert [r.shape for r in got.router_logits] == [r.shape for r in unpatched.router_logits]
    assert len(got.router_logits) == LAYERS
    (logits, routers), (ref, ref_routers), (same, same_routers) = (
        _tokens(out, attention) for out in (got, expected, same_dtype))
    assert_close(logits, ref, same, "logits")
    for layer, (g, e, s) in enumerate(zip(routers, ref_routers, same_routers)):
        assert_close(g, e, s, f"router logits of layer {layer}")
    assert torch.isfinite(got.aux_loss)


def test_full_mask_router_logits_and_aux_loss_equal_unpatched():
    model = mixtral()
    ids, attention = _inputs()
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, 1:].masked_fill_(attention[:, :-1] == 0, -100)  # predicted at a padding position
    expected = _run(model, ids, attention, labels=labels)
    with dk.plugged(model, dk.ExpertMask()):
        got = _run(model, ids, attention, labels=labels)
    (logits, routers), (ref, ref_routers) = _tokens(got, attention), _tokens(expected, attention)
    # float32 on an AMD CPU runs the keep-all projections through the cpu backend's kernels, which
    # sum in another order than MKL: rounding, not routing, differs
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    for g, e in zip(routers, ref_routers):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_router_logits_from_config():
    """config.output_router_logits instead of the keyword: the unpatched shapes, and router
    logits and auxiliary loss equal to the reference's (as the keyword's in the test above)."""
    model = mixtral()
    model.config.output_router_logits = True
    ids, attention = _inputs()
    mask = _pruned_mask(model)
    with torch.no_grad():
        expected = moe_reference(model, mask).double()(input_ids=ids, attention_mask=attention)
        same_dtype = moe_reference(model, mask)(input_ids=ids, attention_mask=attention)
        unpatched = model(input_ids=ids, attention_mask=attention)
        with dk.plugged(model, mask):
            got = model(input_ids=ids, attention_mask=attention)
    assert len(got.router_logits) == LAYERS
    assert [r.shape for r in got.router_logits] == [r.shape for r in unpatched.router_logits]
    routers, ref_routers, same_routers = (_tokens(out, attention)[1]
                                          for out in (got, expected, same_dtype))
    for layer, (g, e, s) in enumerate(zip(routers, ref_routers, same_routers)):
        assert_close(g, e, s, f"router logits of layer {layer}")
    assert_close(got.aux_loss, expected.aux_loss, same_dtype.aux_loss, "aux_loss")
    assert not torch.allclose(got.aux_loss, unpatched.aux_loss)  # pruning moved the router logits


@pytest.mark.parametrize("first", ["patched", "unpatched"])
def test_recording_survives_patch_and_unpatch(first):
    """transformers installs its recording hooks once, on the modules present at the first
    request: router logits are recorded by the patched and the restored model either way."""
    model = mixtral()
    ids, attention = _inputs()
    mask = dk.ExpertMask(moe={l: [0, 2, 3, 5, 6] for l in range(LAYERS)})
    if first == "patched":
        with dk.plugged(model, mask):
            patched = _run(model, ids, attention)
        unpatched = _run(model, ids, attention)
    else:
        unpatched = _run(model, ids, attention)
        with dk.plugged(model, mask):
            patched = _run(model, ids, attention)
    assert len(patched.router_logits) == len(unpatched.router_logits) == LAYERS
    torch.testing.assert_close(_tokens(patched, attention)[1][0],
                               _tokens(unpatched, attention)[1][0])  # the same input
    assert torch.equal(unpatched.aux_loss, _run(model, ids, attention).aux_loss)
