"""Mixed-task batches (doe_kernels.mixed): each sequence of one forward pass on its own expert
equals that sequence run alone on its expert, for BERT and LLaMA-family models, with KV-cache
generation, whole experts (prompts, heads, label words) and the router; bad input changes
nothing."""
import itertools
import random
import sys

import pytest
import torch

import doe_kernels as dk
from conftest import backend_cases
from expert_utils import TEXTS, seq_cls_expert, tiny_bert, tiny_llama
from model_utils import (
    CAUSAL,
    build,
    gpu_syncs,
    inputs,
    mixed_mask,
    output_of,
    snapshot,
    state_dict_equal,
)
from reference import assert_close
from test_bias_delta import with_deltas
from test_scales import with_scales

from doe_kernels.expert import Expert, label_token_ids, model_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


def expert_masks(model, count: int, seed: int) -> list:
    """`count` masks of different kinds: layers keeping nothing / everything, random lists,
    scales, bias deltas, and None (the whole model)."""
    kinds = [
        lambda s: mixed_mask(model, seed=s),
        lambda s: dk.ExpertMask.random(model, ffn_keep=0.35, heads_keep=0.5, seed=s),
        lambda s: with_scales(model, dk.ExpertMask.random(model, 0.5, 0.75, seed=s), seed=s),
        lambda s: with_deltas(model, dk.ExpertMask.random(model, 0.2, 0.25, seed=s), seed=s),
        lambda s: None,
        lambda s: dk.ExpertMask.random(model, ffn_keep=0.9, heads_keep=1.0, seed=s),
    ]
    return [kinds[(seed + i) % len(kinds)](seed + i) for i in range(count)]


def assignment(masks: list, batch: int, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.choice(masks) for _ in range(batch)]


def alone(model, mask, ids, attention, backend):
    """The sequence run by itself on its expert (plugged, then restored)."""
    with dk.plugged(model, mask or dk.ExpertMask(), backend):
        return output_of(model, ids, attention)


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "qwen2"])
def test_mixed_batch_equals_each_sequence_alone(name, device, backend, dtype):
    model = build(name, dtype).to(device)
    before = snapshot(model)
    cases = 1 if backend == "triton" else 3
    for case in range(cases):
        masks = expert_masks(model, 1 + (case * 5 + 2) % 6, seed=case)
        rows = assignment(masks, 7, seed=case)
        ids, attention = inputs(name, batch=7, seed=case, device=device)
        with torch.no_grad():
            with dk.mixed(model, rows, backend):
                got = output_of(model, ids, attention)
            for b, mask in enumerate(rows):
                ref = alone(model, mask, ids[b:b + 1], attention[b:b + 1], backend)
                assert_close(got[b:b + 1], ref.double(), what=f"{name} case {case} row {b}")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("name,tokens", [("llama", 1), ("llama", 9), ("bert", 9)])
def test_a_mixed_pass_on_a_gpu_waits_for_it_no_more_than_the_dense_model(name, tokens, backend):
    """After its first pass (which plans the layout), a mixed batch's forward pass waits for the
    GPU no more often than the dense model's own forward: the segments' offsets stay on the
    host, and the plans are kept."""
    if backend not in dk.available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available")
    model = build(name, torch.float32).to("cuda")
    rows = assignment(expert_masks(model, 5, seed=0), 7, seed=0)
    ids = torch.randint(3, 120, (7, tokens), device="cuda")
    assert gpu_syncs(lambda: torch.ones(1, device="cuda").item()), "no wait is seen"
    with torch.no_grad():
        dense = gpu_syncs(lambda: model(input_ids=ids))
        with dk.mixed(model, rows, backend):
            mixed = gpu_syncs(lambda: model(input_ids=ids))
    assert len(mixed) <= len(dense), mixed


def padded_inputs(name, batch: int, device="cpu"):
    """inputs() with sequence r padded by r tokens (on the left for causal models)."""
    ids, attention = inputs(name, batch=batch, seq=9, seed=3, device=device)
    attention.fill_(1)
    for r in range(1, batch):
        attention[r, slice(None, r) if name in CAUSAL else slice(-r, None)] = 0
    return ids, attention


def real_hidden(model, ids, attention):
    """The last layer's hidden states at the real tokens (zeros at the padding)."""
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    return out.hidden_states[-1] * attention[..., None].to(out.hidden_states[-1].dtype)


def ffn_rows(monkeypatch) -> list:
    """The row count of every segmented FFN op call from now on (per segment or through the
    union)."""
    from doe_kernels.ops import library

    seen = []
    for op in ("segmented_gather_ffn", "segmented_gather_swiglu_ffn", "union_gather_ffn",
               "union_gather_swiglu_ffn"):
        original = getattr(library, op)
        monkeypatch.setattr(library, op, lambda x, *a, original=original, **k:
                            seen.append(x.shape[0]) or original(x, *a, **k))
    return seen


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_on_the_cpu_a_prefill_runs_the_fused_op_and_decoding_the_kept_plan(name, monkeypatch):
    """On the CPU (cpu backend, float32: the extension plans in C++), a pass of several tokens per
    sequence hands each FFN to the segmented op with strategy "auto" (the fused union path, 1.5x
    faster than the union's separate gathers there), and a pass of one token per sequence runs
    the layer's union plan, built once (decoding's, unchanged)."""
    from doe_kernels.ops import library

    if "cpu" not in dk.available_backends("cpu") or not dk.backends.cpu.has_union_plan():
        pytest.skip("the cpu backend (with its C++ union plans) is not built")
    model = build(name, torch.float32)
    calls = []
    for op in ("segmented_gather_ffn", "segmented_gather_swiglu_ffn", "union_gather_ffn",
               "union_gather_swiglu_ffn"):
        original = getattr(library, op)
        monkeypatch.setattr(library, op, lambda *a, op=op, original=original, **k: calls.append(
            (op.split("_")[0], k.get("strategy"))) or original(*a, **k))
    rows = [dk.ExpertMask.random(model, 0.97, seed=s) for s in range(3)] * 2
    for tokens, want in ((9, {("segmented", "auto")}), (1, {("union", None)})):
        calls.clear()
        ids = torch.randint(3, 120, (6, tokens), generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad(), dk.mixed(model, rows, "cpu"):
            got = output_of(model, ids, torch.ones_like(ids))
        assert set(calls) == want, calls
        for b, mask in enumerate(rows):
            ref = alone(model, mask, ids[b:b + 1], torch.ones_like(ids[b:b + 1]), "cpu")
            assert_close(got[b:b + 1], ref.double(), what=f"{name} {tokens} tokens row {b}")


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_an_attention_mask_runs_the_ffns_and_attention_on_the_real_tokens_only(
        name, device, backend, dtype, monkeypatch):
    from doe_kernels.models import segments

    model = build(name, dtype).to(device)
    rows = assignment(expert_masks(model, 4, seed=3), 6, seed=3)
    ids, attention = padded_inputs(name, 6, device)
    seen = ffn_rows(monkeypatch)
    projected = []  # the (sequences, tokens) of each span's q/k/v projection
    original = segments.project_qkv
    monkeypatch.setattr(segments, "project_qkv", lambda hidden, **k: projected.append(
        tuple(hidden.shape[:2])) or original(hidden, **k))
    out_rows = []  # the leading dimensions of each span's output projection
    project_out = segments.project_out
    monkeypatch.setattr(segments, "project_out", lambda part, *a, **k: out_rows.append(
        tuple(part.shape[:-1])) or project_out(part, *a, **k))
    attended = []  # the (sequences, queries) of each attention call
    attend = segments.attend
    monkeypatch.setattr(segments, "attend", lambda q, *a, **k: attended.append(
        (q.shape[0], q.shape[2])) or attend(q, *a, **k))
    with torch.no_grad():
        with dk.mixed(model, rows, backend):
            every = real_hidden(model, ids, attention)
        assert seen and set(seen) == {6 * 9}
        assert projected and {t for _, t in projected} == {9}
        assert out_rows and {t for _, t in out_rows} == {9}
        padded, seen[:], projected[:] = sum(b * t for b, t in projected), [], []
        padded_out, out_rows[:] = sum(b * t for b, t in out_rows), []
        assert attended and {t for _, t in attended} == {9}
        attended[:] = []
        with dk.mixed(model, rows, backend, attention_mask=attention):
            real = real_hidden(model, ids, attention)
        assert seen and set(seen) == {int(attention.sum())}
        # each span's real tokens as one sequence, fewer than the padded ones
        assert projected and {b for b, _ in projected} == {1}
        assert sum(t for _, t in projected) < padded
        assert out_rows and {len(shape) for shape in out_rows} == {1}  # the real rows, packed
        assert sum(rows for rows, in out_rows) < padded_out
        if segments._per_sequence(torch.device(device)):  # each over its real tokens only
            assert attended and {b for b, _ in attended} == {1}
            assert {t for _, t in attended} <= set(attention.sum(1).tolist())
        else:  # padded again into one call
            assert attended and {t for _, t in attended} == {9}
    assert_close(real, every.double(), what=f"{name}: real tokens only against every position")
    assert not dk.is_patched(model)


def layer_inputs(model, layer: int) -> tuple[list, object]:
    """(the (sequences, tokens) of each input of `model`'s layer `layer` from now on, the hook)."""
    seen = []
    module = dk.models.describe(model)[1][layer]
    return seen, module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple((args[0] if args else
                                                   kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True)


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "qwen2"])
def test_packed_layers_run_the_real_tokens_only_and_give_the_same(name, device, backend, dtype):
    """pack_layers: a pass of the batch given runs its layers on (1, real tokens, hidden), its
    outputs padded as usual; another batch, and a batch without padding, run as they are."""
    model = build(name, dtype).to(device)
    rows = assignment(expert_masks(model, 4, seed=8), 6, seed=8)
    ids, attention = padded_inputs(name, 6, device)
    full = torch.ones_like(attention)
    seen, hook = layer_inputs(model, 1)
    with torch.no_grad():
        with dk.mixed(model, rows, backend):
            every = output_of(model, ids, attention)
            every_other = output_of(model, ids, attention.flip(0))
            every_full = output_of(model, ids, full)
        with dk.mixed(model, rows, backend, attention_mask=attention, pack_layers=True):
            seen.clear()
            packed = output_of(model, ids, attention)
            assert seen == [(1, int(attention.sum()))]
            seen.clear()
            other = output_of(model, ids, attention.flip(0))
            assert seen == [(6, 9)]
        with dk.mixed(model, rows, backend, attention_mask=full, pack_layers=True):
            seen.clear()
            unpadded = output_of(model, ids, full)
            assert seen == [(6, 9)]
    hook.remove()
    assert packed.shape == every.shape
    for got, want, what in ((packed, every, "packed"), (other, every_other, "another batch"),
                            (unpadded, every_full, "no padding")):
        assert_close(got, want.double(), what=f"{name} {what}")
    assert not dk.is_patched(model)


def windowed(name: str, window):
    """A tiny Mistral, or a Qwen2 whose layers after the first slide, seeing `window` positions."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from model_utils import _causal_config

    torch.manual_seed(0)
    if name == "mistral":
        return MistralForCausalLM(_causal_config(MistralConfig, sliding_window=window)).eval()
    return Qwen2ForCausalLM(_causal_config(Qwen2Config, use_sliding_window=window is not None,
                                           sliding_window=window or 64,
                                           max_window_layers=1)).eval()


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_packed_passes_keep_a_sliding_window(name):
    """Layers whose queries see only the last `sliding_window` positions give in a packed pass
    (with or without pack_layers) what each sequence gives alone on its expert: a span with a
    sequence longer than the window attends under the pass's mask."""
    model = windowed(name, 3)
    rows = assignment(expert_masks(model, 3, seed=2), 4, seed=2)
    ids, attention = padded_inputs(name, 4)
    with torch.no_grad():
        outputs = []
        for pack_layers in (False, True):
            with dk.mixed(model, rows, attention_mask=attention, pack_layers=pack_layers):
                outputs.append(output_of(model, ids, attention))
        for b, mask in enumerate(rows):
            ref = alone(model, mask, ids[b:b + 1], attention[b:b + 1], "auto")
            for got in outputs:
                assert_close(got[b:b + 1], ref.double(), what=f"{name} row {b}")
        unlimited = windowed(name, None)
        unlimited.load_state_dict(model.state_dict())
        with dk.mixed(unlimited, rows, attention_mask=attention):
            assert (output_of(unlimited, ids, attention) - outputs[0]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_a_sliding_window_counts_the_padding_inside_a_sequence(name):
    """A sequence of no more real tokens than the window but padding between them (as
    mixed_logits puts between a causal expert's soft prompt and its text) spans more positions
    than the window: the CPU attended over all its real tokens, where the model alone (and a
    GPU's pass) lets the window cut the first ones off."""
    model = windowed(name, 3)
    rows = [dk.ExpertMask.random(model, 0.5, 0.5, seed=1), None]
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(2))
    attention = torch.tensor([[1, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    real = attention[0].bool()
    with torch.no_grad():
        with dk.plugged(model, rows[0]):
            want = model(input_ids=ids[:1], attention_mask=attention[:1],
                         position_ids=positions[:1]).logits[0, real]
        for pack_layers in (False, True):
            with dk.mixed(model, rows, attention_mask=attention, pack_layers=pack_layers):
                got = model(input_ids=ids, attention_mask=attention,
                            position_ids=positions).logits[0, real]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pack_layers", [False, True])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_packed_pass_padded_again_for_its_attention_gives_the_same(name, pack_layers,
                                                                     monkeypatch):
    """Where a launch per sequence costs more than the padding (a GPU), a packed span's attention
    runs padded into one call under the pass's mask: the same real tokens' states, and the same
    greedy generation."""
    from doe_kernels.models import segments

    model = build(name)
    rows = assignment(expert_masks(model, 4, seed=6), 6, seed=6)
    ids, attention = padded_inputs(name, 6)
    with torch.no_grad():
        with dk.mixed(model, rows, attention_mask=attention):
            each = output_of(model, ids, attention)
        monkeypatch.setattr(segments, "_per_sequence", lambda device: False)
        seen, hook = layer_inputs(model, 1)
        attended = []  # the (sequences, queries) of each attention call
        attend = segments.attend
        monkeypatch.setattr(segments, "attend", lambda q, *a, **k: attended.append(
            (q.shape[0], q.shape[2])) or attend(q, *a, **k))
        with dk.mixed(model, rows, attention_mask=attention, pack_layers=pack_layers):
            padded = output_of(model, ids, attention)
            assert attended and {t for _, t in attended} == {9}  # padded again
            assert seen == [(1, int(attention.sum())) if pack_layers else (6, 9)]
            if name == "llama":
                settings = dict(attention_mask=attention, max_new_tokens=3, do_sample=False,
                                pad_token_id=0)
                generated = model.generate(ids, **settings)
        if name == "llama":
            with dk.mixed(model, rows):
                assert torch.equal(generated, model.generate(ids, **settings))
    hook.remove()
    assert_close(padded, each.double(), what=f"{name}: padded again against sequence by sequence")


@pytest.mark.parametrize("pack_layers", [False, True])
def test_an_attention_mask_leaves_generation_as_it_was(pack_layers, monkeypatch):
    """The prefill computes the real tokens' FFNs only (and with pack_layers, the whole layers);
    decoding steps (another shape) every position: the tokens generated are the same."""
    model = build("llama")
    rows = assignment(expert_masks(model, 3, seed=4), 4, seed=4)
    ids, attention = padded_inputs("llama", 4)
    generate = dict(attention_mask=attention, max_new_tokens=4, do_sample=False,
                    pad_token_id=0)
    with torch.no_grad():
        with dk.mixed(model, rows):
            every = model.generate(ids, **generate)
        seen = ffn_rows(monkeypatch)
        with dk.mixed(model, rows, attention_mask=attention, pack_layers=pack_layers):
            real = model.generate(ids, **generate)
    assert torch.equal(real, every)
    assert seen[0] == int(attention.sum()) < 4 * 9  # the prefill: the real tokens only


def test_an_attention_mask_packs_only_the_passes_given_it(monkeypatch):
    """A pass of the same shape with other padding (or none given) computes every position; a
    float or bool mask works as an integer one."""
    model = build("bert")
    rows = assignment(expert_masks(model, 3, seed=5), 4, seed=5)
    ids, attention = padded_inputs("bert", 4)
    other = attention.flip(0)  # the same shape, other padding
    seen = ffn_rows(monkeypatch)
    real_tokens = {int(attention.sum())}
    with torch.no_grad():
        with dk.mixed(model, rows):
            every = real_hidden(model, ids, other)
        for given in (attention, attention.float(), attention.bool()):
            with dk.mixed(model, rows, attention_mask=given):
                seen.clear()
                got = real_hidden(model, ids, other)
                assert set(seen) == {4 * 9}
                assert_close(got, every.double(), what="another batch of the same shape")
                seen.clear()
                real_hidden(model, ids, attention)
                assert set(seen) == real_tokens
                seen.clear()
                model.bert(input_ids=ids, attention_mask=attention)  # not the model given
                assert set(seen) == {4 * 9}
        none = attention.clone()
        none[:2] = 0  # two sequences of padding only: a span without a real token
        with dk.mixed(model, rows):
            every = real_hidden(model, ids, none)
        for pack_layers in (False, True):
            with dk.mixed(model, rows, attention_mask=none, pack_layers=pack_layers):
                got = real_hidden(model, ids, none)
            assert_close(got, every.double(), what=f"sequences of padding only ({pack_layers})")


def test_a_bad_attention_mask_is_refused_and_changes_nothing():
    model = build("bert")
    before = snapshot(model)
    ids, attention = inputs("bert", batch=3)
    for bad, message in ((attention[:2], "2 sequences, but there are 3 masks"),
                         (attention * 2, "only 0s and 1s"),
                         (attention[None], "must be a \\(batch, tokens\\) tensor"),
                         ([[1, 1]] * 3, "must be a \\(batch, tokens\\) tensor")):
        with pytest.raises(ValueError, match=message):
            with dk.mixed(model, [None] * 3, attention_mask=bad):
                pytest.fail("the body must not run")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


@pytest.mark.parametrize("pack_layers", [False, True])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_pass_without_real_tokens_runs(name, pack_layers):
    """An attention mask of padding only (no real token to compute) gives a pass with the
    outputs' shapes, finite (their values are the padding's, which `mixed` leaves at zeros from
    the FFNs and the attention), not a failed reshape of the empty rows."""
    model = build(name)
    ids, _ = inputs(name, batch=2)
    nothing = torch.zeros_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=nothing)[0]
        with dk.mixed(model, [None, None], attention_mask=nothing, pack_layers=pack_layers):
            got = model(input_ids=ids, attention_mask=nothing)[0]
    assert got.shape == expected.shape and bool(got.isfinite().all())


def test_a_pass_that_raises_ends_its_real_token_marks():
    """A forward pass given the batch's attention mask that fails midway leaves no mark that a
    later call on a part of the model (another attention mask) runs the real tokens only."""
    model = build("bert")
    masks = expert_masks(model, 3, seed=0)
    ids, attention = padded_inputs("bert", 3)
    other = attention.flip(0)
    with torch.no_grad():
        with dk.mixed(model, masks):
            expected = model.bert(input_ids=ids, attention_mask=other).last_hidden_state
        with dk.mixed(model, masks, attention_mask=attention):
            hook = model.bert.pooler.register_forward_hook(lambda *args: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                model(input_ids=ids, attention_mask=attention)
            hook.remove()
            got = model.bert(input_ids=ids, attention_mask=other).last_hidden_state
    real = other[..., None].bool()
    assert torch.equal(got * real, expected * real)


@pytest.mark.parametrize("pack_layers", [False, True])
def test_gradient_checkpointing_with_an_attention_mask(pack_layers):
    """transformers' gradient checkpointing runs each layer again in the backward pass, after the
    forward pass ended: a checkpointed pass computes every position (the real tokens' marks
    would be gone by then), with the gradients of one given no attention mask."""
    model = build("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    masks = expert_masks(model, 3, seed=0)
    ids, attention = padded_inputs("llama", 3)

    def grads(**given):
        model.zero_grad()
        with dk.mixed(model, masks, **given):
            logits = model(input_ids=ids, attention_mask=attention).logits
            (logits * attention[..., None]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, got = grads(), grads(attention_mask=attention, pack_layers=pack_layers)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["shared", "one-each"])
@pytest.mark.parametrize("name", CAUSAL)
def test_mixed_generation_equals_each_sequence_generated_alone(name, layout, monkeypatch):
    model = build(name)
    masks = expert_masks(model, 4, seed=3)
    # one sequence per expert: decoding takes the union of the experts' neurons
    rows = ([masks[0], masks[1], masks[1], masks[2], masks[3], masks[0]] if layout == "shared"
            else [masks[1], masks[2], masks[0], masks[3]])
    ids, attention = inputs(name, batch=len(rows), seed=4)
    options = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    unions = []
    union_ffn = dk.ops.library.union_gather_swiglu_ffn
    monkeypatch.setattr(dk.ops.library, "union_gather_swiglu_ffn",
                        lambda *args: unions.append(1) or union_ffn(*args))
    with torch.no_grad():
        with dk.mixed(model, rows):
            together = model.generate(input_ids=ids, attention_mask=attention, **options)
        assert unions or layout == "shared"  # one token per expert: the union reads less
        for b, mask in enumerate(rows):
            real = attention[b].bool()
            with dk.plugged(model, mask or dk.ExpertMask()):
                single = model.generate(input_ids=ids[b:b + 1, real], **options)
            assert together[b, (~real).sum():].tolist() == single[0].tolist(), f"row {b}"


@pytest.mark.parametrize("name", CAUSAL)
def test_mixed_generation_into_a_static_cache_without_padding(name):
    """Without padding, transformers gives the layers no mask on the first pass into a static
    cache, whose keys run past the pass's tokens: each expert's rows must see only theirs (its
    empty slots, then, changed every score)."""
    model = build(name)
    rows = expert_masks(model, 2, seed=5)
    ids = torch.randint(3, 120, (len(rows), 8), generator=torch.Generator().manual_seed(6))
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True, cache_implementation="static")

    def scores(run_ids):
        out = model.generate(input_ids=run_ids, attention_mask=torch.ones_like(run_ids),
                             **options)
        return torch.stack(out.scores, 1)

    with torch.no_grad():
        with dk.mixed(model, rows):
            together = scores(ids)
        for b, mask in enumerate(rows):
            with dk.plugged(model, mask or dk.ExpertMask()):
                torch.testing.assert_close(together[b], scores(ids[b:b + 1])[0], rtol=1e-4,
                                           atol=1e-5, msg=f"row {b}")


def test_a_patched_model_gets_its_expert_back():
    model = build("llama")
    mask = dk.ExpertMask.random(model, 0.4, 0.5, seed=7)
    ids, attention = inputs("llama", batch=3)
    with torch.no_grad():
        dk.patch(model, mask, backend="torch")
        expected = output_of(model, ids, attention)
        with dk.mixed(model, expert_masks(model, 3, seed=1)):
            pass
        assert dk.current_mask(model) is mask
        assert torch.equal(output_of(model, ids, attention), expected)
    dk.unpatch(model)


def test_converting_the_model_inside_a_mixed_batch_is_refused():
    """The segments' plans are cast and placed for the batch: a conversion inside `mixed` is
    refused before any tensor changes, and the batch still computes."""
    model = build("llama")
    ids, attention = inputs("llama", batch=3)
    masks = expert_masks(model, 3, seed=1)
    with torch.no_grad(), dk.mixed(model, masks):
        expected = output_of(model, ids, attention)
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="serving a mixed batch .* cannot be converted "
                                               "to torch.float64"):
            model.double()
        assert state_dict_equal(before, snapshot(model))
        assert torch.equal(output_of(model, ids, attention), expected)
    model.double()  # after: as usual
    assert not dk.is_patched(model)


@pytest.mark.parametrize("pack_layers", [False, True])
def test_unpatching_inside_a_mixed_batch_is_refused(pack_layers):
    """`unpatch` inside `mixed` was accepted: the rest of the block ran every row on the whole
    model, and with pack_layers the packing hooks stayed on the original layers (the next pass
    failed). It is refused before anything changes, the batch still computes, and the block
    unpatches the model on exit."""
    model = build("llama")
    ids, attention = inputs("llama", batch=3)
    masks = expert_masks(model, 3, seed=1)
    with torch.no_grad(), dk.mixed(model, masks, attention_mask=attention,
                                   pack_layers=pack_layers):
        expected = output_of(model, ids, attention)
        with pytest.raises(RuntimeError, match=r"serves a mixed batch .*unpatch after the "
                                               r"`mixed` block"):
            dk.unpatch(model)
        assert dk.is_patched(model)
        assert torch.equal(output_of(model, ids, attention), expected)
    assert not dk.is_patched(model)


@pytest.mark.parametrize("swap", ["patch", "plugged"])
def test_plugging_an_expert_inside_a_mixed_batch_is_refused(swap):
    """`patch` / `plugged` inside `mixed` was accepted (current_mask said the new expert) while
    the batch's masks still drove every forward: it is refused before anything changes, the
    batch still computes, and after the block the model has its expert back."""
    model = build("llama")
    first, other = (dk.ExpertMask.random(model, keep, 0.5, seed=s) for s, keep in ((1, 0.3),
                                                                                  (2, 0.6)))
    ids, attention = inputs("llama", batch=3)
    with torch.no_grad():
        dk.patch(model, first)
        with dk.mixed(model, [other] * 3):
            expected = output_of(model, ids, attention)
            with pytest.raises(RuntimeError, match=r"serves a mixed batch \(inside "
                                                   r"doe_kernels.mixed\).*before or after"):
                if swap == "patch":
                    dk.patch(model, first)
                else:
                    with dk.plugged(model, first):
                        pass
            assert dk.current_mask(model) is first  # the expert `mixed` restores afterwards
            assert torch.equal(output_of(model, ids, attention), expected)
        assert dk.current_mask(model) is first
        dk.patch(model, other)  # after the block: as usual
        torch.testing.assert_close(output_of(model, ids, attention), expected, rtol=1e-4,
                                   atol=1e-5)
    dk.unpatch(model)


def test_bad_input_is_refused_and_changes_nothing():
    model = build("bert")
    other = build("llama")
    before = snapshot(model)
    ids, attention = inputs("bert", batch=3)
    with pytest.raises(ValueError, match="4 sequences, but doe_kernels.mixed was given 3 masks"):
        with torch.no_grad(), dk.mixed(model, [None] * 3):
            output_of(model, *inputs("bert", batch=4))
    with pytest.raises(ValueError):  # a mask of another model
        with dk.mixed(model, [None, dk.ExpertMask.random(other, 0.5, 0.5)]):
            pytest.fail("the body must not run")
    with pytest.raises(TypeError, match="masks\\[1\\]"):
        with dk.mixed(model, [None, "task"]):
            pytest.fail("the body must not run")
    with pytest.raises(ValueError, match="empty"):
        with dk.mixed(model, []):
            pytest.fail("the body must not run")
    with pytest.raises(RuntimeError, match="nest"):
        with dk.mixed(model, [None]), dk.mixed(model, [None]):
            pytest.fail("the body must not run")
    for flag in ("pack_layers", "dynamic_skip"):  # (a string "no" turned it on)
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
            with dk.mixed(model, [None] * 3, attention_mask=attention, **{flag: "no"}):
                pytest.fail("the body must not run")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)


# ---- whole experts ----------------------------------------------------------------------------
def classifier_experts(model):
    """Sequence-classification experts with different prompt lengths and label counts."""
    experts = [seq_cls_expert(model, rate=rate, seed=i, virtual=virtual)
               for i, (rate, virtual) in enumerate([(0.3, 3), (0.6, 5), (0.9, 2)])]
    gen = torch.Generator().manual_seed(9)
    hidden = model.config.hidden_size
    experts.append(Expert(
        dk.ExpertMask.random(model, 0.5, 0.5, seed=9), torch.randn(4, hidden, generator=gen),
        "seq_cls", ["a", "b", "c"], sizes=model_sizes(model),
        head={"classifier.weight": torch.randn(3, hidden, generator=gen),
              "classifier.bias": torch.randn(3, generator=gen)}))
    return experts


def causal_experts(model, tokenizer):
    words = [" positive", " negative"]
    ids = label_token_ids(tokenizer, words)
    return [Expert(dk.ExpertMask.random(model, 0.5, 0.5, seed=s), torch.randn(s + 2, 32),
                   "causal_lm", ["positive", "negative"], label_words=words, label_token_ids=ids,
                   template="{text} Mood:" if s else None, sizes=model_sizes(model))
            for s in range(3)]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_mixed_logits_equal_each_request_alone(family, tokenizer):
    model = tiny_bert() if family == "bert" else tiny_llama()
    experts = (classifier_experts(model) if family == "bert"
               else causal_experts(model, tokenizer))
    before = snapshot(model)
    rng = random.Random(0)
    requests = [(rng.choice(experts), text) for text in TEXTS * 2]
    got = dk.mixed_logits(model, tokenizer, requests, batch_size=5)
    for (expert, text), row in zip(requests, got):
        torch.testing.assert_close(row, expert.predict_logits(model, tokenizer, [text])[0],
                                   atol=1e-5, rtol=1e-5)
        assert row.shape == (len(expert.label_names),)
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)
    assert dk.mixed_logits(model, tokenizer, []) == []


@pytest.mark.parametrize("set_on", ["config-and-layers", "layers"])
def test_a_model_whose_ffn_runs_in_chunks_serves_mixed_batches_unpacked(tokenizer, set_on):
    """BERT's chunk_size_feed_forward runs the FFN over slices of the token axis, which packed
    layers cut across sequences: mixed_logits serves such a model without packing (it failed),
    and mixed(pack_layers=True) refuses it before anything changes; also where only the layers
    hold it (each keeps its own copy of the config's)."""
    model = tiny_bert()
    if set_on == "config-and-layers":
        model.config.chunk_size_feed_forward = 1
    for layer in model.bert.encoder.layer:
        layer.chunk_size_feed_forward = 1
    experts = classifier_experts(model)
    before = snapshot(model)
    requests = [(experts[i % len(experts)], text) for i, text in enumerate(TEXTS)]
    got = dk.mixed_logits(model, tokenizer, requests, batch_size=4)
    for (expert, text), row in zip(requests, got):
        torch.testing.assert_close(row, expert.predict_logits(model, tokenizer, [text])[0],
                                   atol=1e-5, rtol=1e-5)
    ids, attention = torch.randint(3, 100, (2, 6)), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with pytest.raises(ValueError, match="chunk_size_feed_forward"):
        with dk.mixed(model, [experts[0].mask, None], attention_mask=attention, pack_layers=True):
            model(input_ids=ids, attention_mask=attention)
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)


def test_mixed_logits_batches_by_length_and_computes_the_real_tokens_ffns(tokenizer,
                                                                          monkeypatch):
    """Each forward pass holds batch_size requests of like lengths (the last one fewer), grouped
    by expert, every request once; its FFNs compute the real tokens only, and the texts of
    experts that encode alike are tokenized in one call."""
    mixed_module = sys.modules["doe_kernels.mixed"]
    model = tiny_bert()
    experts = classifier_experts(model)
    rng = random.Random(1)
    texts = [" ".join(["word"] * n) for n in (1, 2, 3, 5, 8, 13, 21, 34, 50, 4, 9, 30)]
    chosen = [rng.choice(experts) for _ in texts]
    lengths = [len(tokenizer(t)["input_ids"]) + e.num_virtual_tokens
               for e, t in zip(chosen, texts)]
    calls = []
    with monkeypatch.context() as patched:
        call = type(tokenizer).__call__
        patched.setattr(type(tokenizer), "__call__",
                        lambda self, *a, **k: calls.append(1) or call(self, *a, **k))
        counts = [len(ids) for ids in mixed_module._encoded(chosen, texts, tokenizer)]
    assert len({id(e) for e in chosen}) > 1 and len(calls) == 1  # the experts encode alike
    assert counts == [len(tokenizer(t)["input_ids"]) for t in texts]  # tokenized once
    batches = mixed_module._batches(chosen, counts, 4)
    assert [len(batch) for batch in batches] == [4, 4, 4]
    assert sorted(i for batch in batches for i in batch) == list(range(len(texts)))
    for batch, after in zip(batches, batches[1:]):
        assert max(lengths[i] for i in batch) <= min(lengths[i] for i in after)
    for batch in batches:
        runs = [e for e, _ in itertools.groupby(id(chosen[i]) for i in batch)]
        assert len(runs) == len(set(runs))  # grouped by expert
    seen = ffn_rows(monkeypatch)
    dk.mixed_logits(model, tokenizer, list(zip(chosen, texts)), batch_size=4)
    layers = model.config.num_hidden_layers
    assert sorted(seen) == sorted(sum(lengths[i] for i in batch) for batch in batches
                                  for _ in range(layers))


def test_mixed_logits_refuses_bad_requests(tokenizer):
    model = tiny_bert()
    experts = classifier_experts(model)
    llama_expert = causal_experts(tiny_llama(), tokenizer)[0]
    before = snapshot(model)
    for requests, error, match in [
            ([(experts[0], "fine"), (llama_expert, "fine")], ValueError, "made for a model"),
            ([(experts[0], "fine"), ("task", "fine")], TypeError, "request 1"),
            ([(experts[0], 3)], TypeError, "request 0"),
            ([experts[0]], ValueError, "request 0")]:
        with pytest.raises(error, match=match):
            dk.mixed_logits(model, tokenizer, requests)
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)


def test_mixed_logits_keeps_a_heads_own_forward_wrapper(tokenizer):
    """A forward already set on the head module's instance (as accelerate's hooks do) runs inside
    the mixed heads and is put back afterwards."""
    model = tiny_bert()
    experts = classifier_experts(model)
    calls, original = [], model.classifier.forward

    def wrapper(x):
        calls.append(x.shape[0])
        return original(x)

    model.classifier.forward = wrapper
    requests = [(experts[0], TEXTS[0]), (experts[3], TEXTS[1]), (experts[3], TEXTS[2])]
    got = dk.mixed_logits(model, tokenizer, requests)
    assert model.classifier.__dict__["forward"] is wrapper
    assert sorted(calls) == [1, 2]  # one call per expert's rows, through the wrapper
    del model.classifier.forward
    for (expert, text), row in zip(requests, got):
        torch.testing.assert_close(row, expert.predict_logits(model, tokenizer, [text])[0])


def test_a_pass_past_a_filled_cache_is_not_packed():
    """A pass given the batch's attention mask but only the tokens past a filled KV cache (as
    generate() continuing from a cache) is not the batch's pass: with pack_layers it computes
    every position, as without (its layers were packed with the batch's index: IndexError)."""
    from transformers import DynamicCache

    model = build("llama")
    ids, attention = inputs("llama", batch=2)
    masks = [mixed_mask(model), None]
    outputs = []
    with torch.no_grad():
        for pack_layers in (False, True):
            cache = DynamicCache(config=model.config)
            with dk.mixed(model, masks, attention_mask=attention, pack_layers=pack_layers):
                model(input_ids=ids[:, :5], attention_mask=attention[:, :5],
                      past_key_values=cache)
                outputs.append(model(input_ids=ids[:, 5:], attention_mask=attention,
                                     past_key_values=cache).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


@pytest.mark.parametrize("per_sequence", [True, False], ids=["per-sequence", "padded-again"])
def test_a_packed_pass_into_a_static_cache(monkeypatch, per_sequence):
    """A packed pass filling a static cache (its 4-D mask spans the cache's length, its keys the
    pass's tokens): padded again into one attention call (how a GPU runs it) as sequence by
    sequence (the CPU's), both as the sequences alone."""
    from transformers import StaticCache

    from doe_kernels.models import segments

    monkeypatch.setattr(segments, "_per_sequence", lambda device: per_sequence)
    model = build("llama")
    ids, attention = inputs("llama", batch=2, seq=7)
    masks = [mixed_mask(model), None]
    with torch.no_grad():
        with dk.mixed(model, masks, attention_mask=attention):
            cache = StaticCache(config=model.config, max_cache_len=16)
            got = model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits
        for b, mask in enumerate(masks):
            real = attention[b].bool()
            with dk.plugged(model, mask or dk.ExpertMask()):
                alone = model(input_ids=ids[b:b + 1, real]).logits
            torch.testing.assert_close(got[b, real], alone[0], rtol=1e-4, atol=1e-5)


def test_mixed_logits_refuse_a_text_that_encodes_to_no_token():
    """A causal LM's request whose text encodes to no token with its expert's template ("{text}"
    and "", SmolLM2's tokenizer) got zeros, read at a padding position: refused, named by its
    request, before anything runs, also among requests of an expert encoding otherwise."""
    from test_expert import smollm2_expert

    model, tokenizer, bare = smollm2_expert()
    _, _, templated = smollm2_expert(template="{text} Mood:")
    before = snapshot(model)
    requests = [(templated, ""), (bare, "a fine film"), (templated, "ok"), (bare, "")]
    with pytest.raises(ValueError, match="request 3: '' encodes to no token with the template "
                       "'{text}'"):
        dk.mixed_logits(model, tokenizer, requests)
    assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)
    rows = dk.mixed_logits(model, tokenizer, requests[:3])  # "" in a template with tokens: served
    torch.testing.assert_close(rows[1], bare.predict_logits(model, tokenizer, ["a fine film"])[0])
