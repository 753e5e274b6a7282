"""Mixed-task batches on a mixture-of-experts model (Mixtral): each sequence routed among its own
expert's kept MoE experts, on its neurons and heads, with dynamic skipping and KV-cache generation,
equals that sequence run alone on its expert; segments on the same neurons run their MoE experts
together; whole experts through mixed_logits and the router; bad input changes nothing."""
import copy
import random

import pytest
import torch

import doe_kernels as dk
from doe_kernels.expert import Expert, label_token_ids, model_sizes
from doe_kernels.patching import plugged_state

from conftest import backend_cases
from model_utils import output_of, snapshot, state_dict_equal
from moe_utils import mixtral, moe_reference
from reference import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def moe_masks(model, count: int, seed: int) -> list:
    """`count` masks of different kinds: MoE experts only (the neurons shared: all), experts with
    neurons and heads, attention bias deltas, and None (the whole model)."""
    spec = dk.models.spec_of(model)

    def attn_bias(s):
        gen = torch.Generator().manual_seed(s)
        mask = dk.ExpertMask.random(model, 0.6, 0.5, experts_keep=0.5, seed=s)
        return mask.with_bias(attn_bias={l: torch.randn(spec.hidden_size, generator=gen) / 10
                                         for l in range(spec.num_layers)})

    kinds = [
        lambda s: dk.ExpertMask.random(model, 1.0, 1.0, experts_keep=0.5, seed=s),
        lambda s: dk.ExpertMask.random(model, 0.4, 0.5, experts_keep=0.75, seed=s),
        lambda s: None,
        lambda s: dk.ExpertMask.random(model, 1.0, 1.0, experts_keep=0.25, seed=s),
        attn_bias,
        lambda s: dk.ExpertMask.random(model, 0.7, 1.0, experts_keep=1.0, seed=s),
    ]
    return [kinds[(seed + i) % len(kinds)](seed + i) for i in range(count)]


def moe_inputs(batch: int, seq: int = 9, seed: int = 1, device="cpu"):
    """Token ids and an attention mask with some rows left-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, seq), generator=gen)
    attention = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch, 3):
        attention[row, :1 + row % 5] = 0
    return ids.to(device), attention.to(device)


def alone(model, mask, ids, attention, backend="auto", dynamic_skip=False):
    with dk.plugged(model, mask or dk.ExpertMask(), backend, dynamic_skip=dynamic_skip):
        return output_of(model, ids, attention)


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("how", ["padded", "real tokens", "packed layers"])
def test_mixed_moe_batch_equals_each_sequence_alone(how, device, backend, dtype):
    if dtype == torch.bfloat16 and backend == "cpu":
        # in bfloat16 the cpu backend's default rule runs a call of more than 16 rows (the
        # batch) on ATen's GEMM and one of fewer (a sequence alone) on its fused kernels, which
        # round differently and can flip a router's choice: one regime for both
        from doe_kernels.backends import cpu

        cpu.set_gather_above(10**12)
        try:
            return _mixed_moe_batch_equals_each_sequence_alone(how, device, backend, dtype)
        finally:
            cpu.set_gather_above(None)
    _mixed_moe_batch_equals_each_sequence_alone(how, device, backend, dtype)


def _mixed_moe_batch_equals_each_sequence_alone(how, device, backend, dtype):
    model = mixtral(dtype=dtype).to(device)
    exact = copy.deepcopy(model).to(torch.float64)  # the same weights, float64 arithmetic
    before = snapshot(model)
    cases = 1 if backend == "triton" else 3
    for case in range(cases):
        masks = moe_masks(model, 1 + (case * 5 + 2) % 6, seed=case)
        rng = random.Random(case)
        rows = [rng.choice(masks) for _ in range(7)]
        ids, attention = moe_inputs(7, seed=case, device=device)
        options = {} if how == "padded" else dict(attention_mask=attention,
                                                  pack_layers=how == "packed layers")
        with torch.no_grad():
            with dk.mixed(model, rows, backend, **options):
                got = output_of(model, ids, attention)
            for b, mask in enumerate(rows):
                one = (ids[b:b + 1], attention[b:b + 1])
                same_dtype = alone(model, mask, *one, backend)
                if dtype == torch.bfloat16 and how != "padded":
                    # bfloat16 rounds the real-token layout and the padded one differently, which
                    # can flip a router's top-2 choice (float32 agrees to 1e-6): the sequence
                    # alone in the same layout is the reference, to which the batch is equal
                    single = dict(options, attention_mask=attention[b:b + 1])
                    with dk.mixed(model, [mask], backend, **single):
                        same_dtype = output_of(model, *one)
                    torch.testing.assert_close(got[b:b + 1], same_dtype, atol=1e-6, rtol=0)
                reference = alone(exact, mask, *one, "torch")
                # the tolerance: twice plain torch's error in this dtype (independent of the code
                # under test); in bfloat16, whose rounding can flip a router's top-2 choice
                # against float64 (the cpu backend's kernels on one token in 63 here), twice the
                # sequence alone's error (test_moe checks it against an independent reference)
                scale = same_dtype if dtype == torch.bfloat16 else \
                    reference + _dtype_error(model, mask, *one)
                assert_close(got[b:b + 1], reference, scale, what=f"case {case} row {b}")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def _dtype_error(model, mask, ids, attention) -> float:
    """The largest error of plain torch in the model's dtype on this sequence: the masked dense
    model (moe_reference, without the mask's bias deltas, which it does not apply) in that dtype
    against the same in float64; 0 in float64. The tolerance's scale, independent of the code
    under test (whose own error, taken as the scale, grows with its bugs)."""
    if model.dtype == torch.float64:
        return 0.0
    mask = (mask or dk.ExpertMask()).replace(ffn_bias={}, attn_bias={})
    plain = moe_reference(model, mask)
    got = output_of(plain, ids, attention).double()
    return float((got - output_of(plain.double(), ids, attention)).abs().max())


def test_segments_on_the_same_neurons_run_their_experts_together(monkeypatch):
    """One experts_forward call per layer where every segment keeps every neuron (experts
    pruned only), one per distinct neuron list otherwise; each call sees its segments' rows."""
    from doe_kernels.models import moe_block

    model = mixtral()
    calls = []
    original = moe_block.experts_forward
    monkeypatch.setattr(moe_block, "experts_forward", lambda x, *a, **k: calls.append(
        x.shape[0]) or original(x, *a, **k))
    experts_only = [dk.ExpertMask.random(model, 1.0, 1.0, experts_keep=k, seed=s)
                    for s, k in enumerate((0.25, 0.5, 0.75))]
    ids, attention = moe_inputs(6)
    with torch.no_grad(), dk.mixed(model, experts_only * 2):
        output_of(model, ids, attention)
    assert calls == [6 * 9] * 3  # three layers, each one call over every row
    calls.clear()
    neurons = [dk.ExpertMask.random(model, 0.5, 1.0, experts_keep=0.5, seed=s) for s in range(2)]
    with torch.no_grad(), dk.mixed(model, [neurons[0], neurons[0], neurons[1], None]):
        output_of(model, *moe_inputs(4))
    assert calls == [2 * 9, 9, 9] * 3


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_dynamic_skipping_equals_each_sequence_alone(dtype, packed):
    model = mixtral(dtype=dtype)
    thresholds = [{0: 0.3, 1: 0.6, 2: 0.9}, {0: 0.8, 1: 0.2, 2: 0.5}]
    masks = [dk.ExpertMask.random(model, n, 1.0, experts_keep=k, seed=s).with_skip(t)
             for s, (n, k, t) in enumerate(zip((1.0, 0.5), (1.0, 0.625), thresholds))]
    rows = [masks[0], None, masks[1], masks[1], masks[0]]
    ids, attention = moe_inputs(5)
    options = dict(attention_mask=attention, pack_layers=True) if packed else {}
    with torch.no_grad():
        with dk.mixed(model, rows, dynamic_skip=True, **options):
            got = output_of(model, ids, attention)
        with dk.mixed(model, rows, **options):
            unskipped = output_of(model, ids, attention)
        for b, mask in enumerate(rows):
            ref = alone(model, mask, ids[b:b + 1], attention[b:b + 1],
                        dynamic_skip=mask is not None)
            assert_close(got[b:b + 1], ref.double(), what=f"row {b}")
    assert (got - unskipped).abs().max() > 1e-3  # the thresholds did skip experts
    assert not dk.is_patched(model)


def test_mixed_moe_generation_equals_each_sequence_generated_alone():
    model = mixtral()
    masks = moe_masks(model, 4, seed=1)
    rows = [masks[0], masks[1], masks[1], masks[2], masks[3]]
    ids, attention = moe_inputs(len(rows), seq=6)
    options = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with dk.mixed(model, rows):
            together = model.generate(input_ids=ids, attention_mask=attention, **options)
        for b, mask in enumerate(rows):
            real = attention[b].bool()
            with dk.plugged(model, mask or dk.ExpertMask()):
                single = model.generate(input_ids=ids[b:b + 1, real], **options)
            assert together[b, (~real).sum():].tolist() == single[0].tolist(), f"row {b}"


def test_a_patched_moe_model_gets_its_expert_and_skipping_back():
    model = mixtral()
    mask = dk.ExpertMask.random(model, 0.5, 0.5, experts_keep=0.5, seed=3).with_skip(
        {0: 0.5, 1: 0.5, 2: 0.5})
    ids, attention = moe_inputs(3)
    try:
        with torch.no_grad():
            dk.patch(model, mask, backend="torch", dynamic_skip=True)
            expected = output_of(model, ids, attention)
            with dk.mixed(model, moe_masks(model, 3, seed=2)):
                output_of(model, ids, attention)
            assert plugged_state(model) == (mask, "torch", True)
            assert torch.equal(output_of(model, ids, attention), expected)
            with pytest.raises(ValueError, match="4 sequences"):  # an error in the body
                with dk.mixed(model, moe_masks(model, 3, seed=2), dynamic_skip=False):
                    output_of(model, *moe_inputs(4))
            assert plugged_state(model) == (mask, "torch", True)
            assert torch.equal(output_of(model, ids, attention), expected)
    finally:
        dk.unpatch(model)


def test_router_logits_come_in_the_padded_layout_and_change_nothing():
    """A pass returning router logits (for transformers' load-balancing loss) computes every
    position, also where `mixed` knows the real tokens; its outputs are the packed pass's."""
    model = mixtral()
    masks = moe_masks(model, 3, seed=4)
    ids, attention = moe_inputs(4)
    with torch.no_grad(), dk.mixed(model, masks + [None], attention_mask=attention,
                                   pack_layers=True):
        packed = output_of(model, ids, attention)
        out = model(input_ids=ids, attention_mask=attention, output_router_logits=True)
        model.config.output_router_logits = True
        try:
            from_config = model(input_ids=ids, attention_mask=attention)
        finally:
            model.config.output_router_logits = False
    for result in (out, from_config):
        assert [tuple(r.shape) for r in result.router_logits] == [(4 * 9, 8)] * 3
        assert torch.isfinite(result.aux_loss)
        assert_close(result.logits * attention[..., None], packed.double(), what="logits")


def test_layers_that_cannot_serve_mixed_batches_are_refused(monkeypatch):
    """An adapter whose layers have no mixed-batch modules: refused, the model left as it was."""
    from doe_kernels.models import mixtral as adapter

    patch_layer = adapter.patch_layer

    def without_mixed(patch, *args):
        patch_layer(patch, *args)
        patch.mixed_run.clear()

    monkeypatch.setattr(adapter, "patch_layer", without_mixed)
    model = mixtral()
    before = snapshot(model)
    with pytest.raises(dk.UnsupportedModelError, match="do not serve mixed-task batches"):
        with dk.mixed(model, [None]):
            pytest.fail("the body must not run")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_bad_moe_input_is_refused_and_changes_nothing():
    model = mixtral()
    before = snapshot(model)
    no_thresholds = dk.ExpertMask.random(model, 1.0, 1.0, experts_keep=0.5)
    with pytest.raises(ValueError, match="no skipping threshold"):
        with dk.mixed(model, [None, no_thresholds], dynamic_skip=True):
            pytest.fail("the body must not run")
    with pytest.raises(ValueError, match="fewer than the model's top-k"):
        with dk.mixed(model, [dk.ExpertMask(moe={0: [1]})]):
            pytest.fail("the body must not run")
    with pytest.raises(ValueError, match="ffn_bias"):
        with dk.mixed(model, [dk.ExpertMask(ffn_bias={0: torch.zeros(48)})]):
            pytest.fail("the body must not run")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


def test_mixed_logits_and_the_router_on_a_moe_model_equal_each_request_alone(tokenizer):
    model = mixtral(vocab=tokenizer.vocab_size)
    words = [" positive", " negative"]
    ids = label_token_ids(tokenizer, words)
    gen = torch.Generator().manual_seed(5)
    experts = [Expert(dk.ExpertMask.random(model, n, 0.5, experts_keep=k, seed=s),
                      torch.randn(s + 2, 48, generator=gen), "causal_lm", ["positive", "negative"],
                      label_words=words, label_token_ids=ids,
                      template="{text} Mood:" if s else None, sizes=model_sizes(model))
               for s, (n, k) in enumerate([(1.0, 0.5), (0.5, 0.75), (0.8, 0.25)])]
    rng = random.Random(0)
    texts = ["a fine day", "the worst film I have seen in years", "ok", "so so, I guess",
             "brilliant acting and a silly plot"]
    requests = [(rng.choice(experts), text) for text in texts * 2]
    got = dk.mixed_logits(model, tokenizer, requests, batch_size=4)
    with dk.ExpertRouter(model, tokenizer, batch_size=3) as router:
        for i, expert in enumerate(experts):
            router.add(f"task{i}", expert)
        routed = router.run_mixed_logits([(f"task{experts.index(e)}", t) for e, t in requests])
    for (expert, text), row, via_router in zip(requests, got, routed):
        single = expert.predict_logits(model, tokenizer, [text])[0]
        torch.testing.assert_close(row, single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(via_router, single, atol=1e-5, rtol=1e-5)
    assert not dk.is_patched(model)
