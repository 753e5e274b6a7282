"""localize: attribution on a model whose important units are known by construction, integrated
gradients' completeness, the pruning-rate binary search on synthetic curves, and one end-to-end
run (all-MiniLM-L6-v2 on a small templated sentiment task built here)."""
import collections
import dataclasses
import sys
import time
import warnings

import pytest
import torch

import doe_kernels as dk
from doe_kernels.data import TaskData
from doe_kernels.expert import Expert, model_sizes, label_token_ids
from doe_kernels.localize import (AttributionConfig, PromptConfig, RecoveryConfig, SearchConfig,
                                  attribute, localize, mask_at_rate, paired_change, retune,
                                  search_rate, weak_baseline)
from doe_kernels.localize.attribution import hook_points
from doe_kernels.localize.config import configs_from_flat
from doe_kernels.localize.reconstruct import AUTO_VARIANTS, FIDELITY_EXAMPLES, split_for_judging
from model_utils import snapshot, state_dict_equal
from real_models import minilm_dir
from expert_utils import LABELS, TEXTS, sentiment_task, tiny_bert, tiny_llama

IMPORTANT_NEURONS = [3, 17, 40]  # of 48, last layer
IMPORTANT_HEAD = 2  # of 4, last layer
ROUTED = [0, 1]  # the hidden dims the classifier reads


def routed_bert():
    """A tiny BERT classifier that reads only hidden dims ROUTED, where the last layer's down
    projection writes only from IMPORTANT_NEURONS and its attention output only from
    IMPORTANT_HEAD (strongly); everything else writes nothing there."""
    model = tiny_bert()
    layer = model.bert.encoder.layer[-1]
    head_dim = 32 // 4
    with torch.no_grad():
        model.bert.pooler.dense.weight.copy_(torch.eye(32))
        model.bert.pooler.dense.bias.zero_()
        model.classifier.weight.zero_()
        model.classifier.weight[:, ROUTED] = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
        down = layer.output.dense.weight  # (hidden, intermediate)
        down[ROUTED] = 0
        down[ROUTED[0], IMPORTANT_NEURONS] = 3.0
        down[ROUTED[1], IMPORTANT_NEURONS] = -3.0
        layer.intermediate.dense.bias[IMPORTANT_NEURONS] = 1.0  # clearly active
        out = layer.attention.output.dense.weight  # (hidden, heads * head_dim)
        out[ROUTED] = 0
        cols = slice(IMPORTANT_HEAD * head_dim, (IMPORTANT_HEAD + 1) * head_dim)
        out[ROUTED[0], cols] = 3.0
        out[ROUTED[1], cols] = -3.0
    return model


def classifier_expert(model, virtual=3):
    torch.manual_seed(1)
    return Expert(None, 0.5 * torch.randn(virtual, model.config.hidden_size), "seq_cls",
                  ["negative", "positive"],
                  head={f"classifier.{k}": v for k, v in model.classifier.state_dict().items()},
                  sizes=model_sizes(model))


def _chunked(model, size: int):
    """`model` with its FFNs run in chunks of `size` tokens (BERT's chunk_size_feed_forward, on
    the config and each layer, which keeps its own copy)."""
    model.config.chunk_size_feed_forward = size
    for layer in model.bert.encoder.layer:
        layer.chunk_size_feed_forward = size
    return model


@pytest.mark.parametrize("method", ["grad", "fisher"])
def test_a_bert_whose_ffn_runs_in_chunks_is_scored_and_fitted_as_unchunked(tokenizer, method,
                                                                         one_thread):
    """Chunking the FFN (a memory saving: the same outputs) changed what the hooks saw: scores
    from the last chunk's tokens only, and the reconstruction's fits refused the batches. Every
    step now runs the model unchunked and leaves its chunk sizes as they were."""
    from doe_kernels.localize.compensate import reconstruction
    from doe_kernels.localize.layerwise import layerwise_reconstruction

    plain, chunked = routed_bert(), _chunked(routed_bert(), 2)
    data = TaskData(TEXTS, LABELS, ["negative", "positive"])
    expert = classifier_expert(plain)
    mask = dk.ExpertMask.random(plain, ffn_keep=0.5, heads_keep=0.5, seed=0)
    batches = list(expert.calibration_batches(plain, tokenizer, TEXTS, batch_size=4))
    results = []
    for model in (plain, chunked):
        scores = attribute(model, tokenizer, expert, data, method=method, batch_size=3,
                           progress=False)
        results.append((scores, reconstruction(model, mask, batches),
                        layerwise_reconstruction(model, mask, batches)))
    (want, *want_masks), (got, *got_masks) = results
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-12)
    for w, g in zip(want_masks, got_masks):
        for kind in ("ffn_scales", "head_scales", "ffn_bias", "attn_bias"):
            for layer, value in getattr(w, kind).items():
                torch.testing.assert_close(getattr(g, kind)[layer], value, rtol=1e-4, atol=1e-6)
    assert chunked.config.chunk_size_feed_forward == 2
    assert all(layer.chunk_size_feed_forward == 2 for layer in chunked.bert.encoder.layer)


@pytest.mark.parametrize("method", ["grad", "ig", "fisher"])
def test_attribution_ranks_the_routed_units_first(tokenizer, method, one_thread):
    model = routed_bert()
    before = snapshot(model)
    data = TaskData(TEXTS, LABELS, ["negative", "positive"])
    ffn, heads = attribute(model, tokenizer, classifier_expert(model), data, method=method,
                           steps=3, batch_size=3, progress=False)
    assert ffn.shape == (2, 48) and heads.shape == (2, 4)
    assert (ffn >= 0).all() and (heads >= 0).all()
    top = torch.topk(ffn[-1], len(IMPORTANT_NEURONS)).indices.sort().values.tolist()
    assert top == IMPORTANT_NEURONS
    assert int(heads[-1].argmax()) == IMPORTANT_HEAD
    assert ffn[-1, IMPORTANT_NEURONS].min() > 10 * ffn[-1].sort().values[-4]  # by a wide margin
    assert not dk.is_patched(model) and state_dict_equal(before, snapshot(model))
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def _gold_logit(model, expert, ids, attention, gold, zero=None):
    handle = None
    if zero is not None:
        handle = zero.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]),))
    try:
        with torch.no_grad(), expert.plugged(model, prune=False):
            return float(expert.logits(model, ids, attention)[0, gold])
    finally:
        if handle is not None:
            handle.remove()


HEAD_GAIN = 1000.0  # zeroing a layer moves the tiny models' gold logit by only 4e-5 to 2e-2


def _loud_head(model):
    """`model` with its output head (BERT's classifier, LLaMA's lm_head) scaled by HEAD_GAIN: the
    label logits, so the logit changes and the scores, scale by it alike (the head is linear)."""
    head = model.classifier if hasattr(model, "classifier") else model.lm_head
    with torch.no_grad():
        head.weight.mul_(HEAD_GAIN)
        if head.bias is not None:
            head.bias.mul_(HEAD_GAIN)
    return model


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_integrated_gradients_completeness(tokenizer, family, one_thread):
    """One example, signed scores: the scores of a layer's units, times its token count, add up to
    the gold logit minus the gold logit with that layer's units zeroed (IG's completeness), to 1%.
    The head is scaled up so that every one of the four logit changes is over 20 times the
    tolerance: scores of the wrong sign, or zero, fail each check."""
    model = _loud_head(tiny_bert() if family == "bert" else tiny_llama())
    if family == "bert":
        expert = classifier_expert(model)
    else:
        ids = label_token_ids(tokenizer, [" negative", " positive"])
        expert = Expert(None, 0.5 * torch.randn(3, 32), "causal_lm", ["negative", "positive"],
                        label_words=[" negative", " positive"], label_token_ids=ids,
                        sizes=model_sizes(model))
    data = TaskData([TEXTS[0]], [LABELS[0]], ["negative", "positive"])
    ffn, heads = attribute(model, tokenizer, expert, data, method="ig", steps=32, absolute=False,
                           progress=False)
    ids, attention = expert.encode(tokenizer, data.texts)
    tokens = attention.sum().item() + expert.num_virtual_tokens
    gold = data.label_ids[0]
    full = _gold_logit(model, expert, ids, attention, gold)
    points, _ = hook_points(model)
    for layer in range(2):
        for scores, module in ((ffn, points[layer][0]), (heads, points[layer][1])):
            zeroed = _gold_logit(model, expert, ids, attention, gold, zero=module)
            tolerance = max(1e-2 * abs(full - zeroed), 1e-3)
            assert abs(full - zeroed) > 20 * tolerance
            assert float(scores[layer].sum()) * tokens == pytest.approx(full - zeroed,
                                                                         abs=tolerance)


def test_fisher_scores_are_squared_mask_gradients_of_the_loss(tokenizer, one_thread):
    """Two examples: a unit's score is the sum over examples of the squared derivative of the
    example's cross-entropy loss with respect to a mask multiplying the unit (Kwon et al.)."""
    model = tiny_bert()
    expert = classifier_expert(model)
    data = TaskData(TEXTS[:2], LABELS[:2], ["negative", "positive"])
    ffn, heads = attribute(model, tokenizer, expert, data, method="fisher", batch_size=2,
                           progress=False)
    points, spec = hook_points(model)
    expected = torch.zeros_like(ffn), torch.zeros_like(heads)
    for index, text in enumerate(data.texts):
        ids, attention = expert.encode(tokenizer, [text])
        masks = [torch.ones(spec.intermediate_size, requires_grad=True) for _ in range(2)]
        head_masks = [torch.ones(spec.num_heads, requires_grad=True) for _ in range(2)]
        handles = []
        for layer in range(2):
            handles.append(points[layer][0].register_forward_pre_hook(
                lambda m, a, v=masks[layer]: (a[0] * v,)))
            handles.append(points[layer][1].register_forward_pre_hook(
                lambda m, a, v=head_masks[layer]: (a[0] * v.repeat_interleave(spec.head_dim),)))
        try:
            with expert.plugged(model, prune=False):
                logits = expert.logits(model, ids, attention)
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([data.label_ids[index]]))
            grads = torch.autograd.grad(loss, masks + head_masks)
        finally:
            for handle in handles:
                handle.remove()
        for layer in range(2):
            expected[0][layer] += grads[layer].double() ** 2
            expected[1][layer] += grads[2 + layer].double() ** 2
    # attribute returns the mean over examples
    torch.testing.assert_close(ffn, expected[0] / 2, rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(heads, expected[1] / 2, rtol=1e-3, atol=1e-12)


def test_attribution_llama_shapes_and_model_untouched(tokenizer, one_thread):
    model = tiny_llama()
    before = snapshot(model)
    ids = label_token_ids(tokenizer, [" negative", " positive"])
    expert = Expert(None, torch.randn(2, 32), "causal_lm", ["negative", "positive"],
                    label_words=[" negative", " positive"], label_token_ids=ids,
                    sizes=model_sizes(model))
    ffn, heads = attribute(model, tokenizer, expert, TaskData(TEXTS, LABELS), batch_size=4,
                           progress=False)
    assert ffn.shape == (2, 48) and heads.shape == (2, 4)
    assert torch.isfinite(ffn).all() and (ffn > 0).any() and (heads > 0).any()
    assert state_dict_equal(before, snapshot(model))


def test_zero_shot_check_on_a_sample_of_validation(tokenizer, one_thread, monkeypatch):
    """A causal LM's no-prompt check runs on ZERO_SHOT_EXAMPLES validation examples (a seeded
    draw) and compares with the baseline's accuracy on those same examples."""
    loc = sys.modules["doe_kernels.localize"]  # the package: its name is also the function's
    model = tiny_llama()
    task_data = sentiment_task(40)
    validation = TaskData([f"{text} ({i})" for i, text in enumerate(task_data.texts)],
                          task_data.labels, task_data.label_names)
    ids = label_token_ids(tokenizer, [" negative", " positive"])
    expert = Expert(None, torch.randn(2, 32), "causal_lm", ["negative", "positive"],
                    label_words=[" negative", " positive"], label_token_ids=ids,
                    sizes=model_sizes(model))
    task = loc._Task.of(model, tokenizer, validation, None, None, 32)
    run = loc._Run(model, tokenizer, task, batch_size=4, seed=0, progress=False)
    seen = []
    evaluate = Expert.evaluate
    monkeypatch.setattr(Expert, "evaluate", lambda self, m, t, data, **kw: seen.append(
        list(data.texts)) or evaluate(self, m, t, data, **kw))
    monkeypatch.setattr(loc, "ZERO_SHOT_EXAMPLES", 7)
    correct = torch.tensor([i % 3 == 0 for i in range(len(validation))])
    zero_shot, tuned = loc._zero_shot(run, expert, validation, correct)
    assert len(seen) == 1 and len(seen[0]) == 7 and len(set(seen[0])) == 7
    rows = [validation.texts.index(text) for text in seen[0]]
    assert tuned == pytest.approx(sum(i % 3 == 0 for i in rows) / 7)
    assert 0.0 <= zero_shot <= 1.0
    assert loc._zero_shot(run, expert, validation, correct) == (zero_shot, tuned)  # seeded


def test_attribution_errors(tokenizer):
    model = tiny_bert()
    with pytest.raises(ValueError, match="method"):
        attribute(model, tokenizer, classifier_expert(model), TaskData(TEXTS, LABELS), method="x")
    with dk.plugged(model, dk.ExpertMask.random(model, 0.5)):
        with pytest.raises(ValueError, match="unpatched"):
            attribute(model, tokenizer, classifier_expert(model), TaskData(TEXTS, LABELS))
        # re-tuning and the masked network say so too (not "no stack of layers")
        with pytest.raises(ValueError, match="run on the unpatched model: call "
                                             "doe_kernels.unpatch"):
            retune(model, tokenizer, classifier_expert(model), TaskData(TEXTS, LABELS),
                   progress=False)
    for options, message in (({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
                             ({"num_examples": 0}, "num_examples must be an int >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            attribute(model, tokenizer, classifier_expert(model), TaskData(TEXTS, LABELS),
                      **options)


def test_attribution_refuses_moe_models():
    from moe_utils import mixtral

    from doe_kernels.localize.attribution import hook_points

    with pytest.raises(dk.UnsupportedModelError, match="select_experts"):
        hook_points(mixtral())


# ---- search -----------------------------------------------------------------------------
def cliff(knee, base=0.9, slope=1.0):
    """Flat at `base` up to `knee`, then falling linearly; counts its calls."""
    calls = []

    def accuracy(rate):
        calls.append(rate)
        return base if rate <= knee else base - slope * (rate - knee)
    return accuracy, calls


@pytest.mark.parametrize("knee", [0.1, 0.37, 0.63, 0.9])
def test_search_finds_the_highest_rate_within_tolerance(knee):
    accuracy, calls = cliff(knee)
    result = search_rate(accuracy, baseline=0.9, tolerance=0.01, high=0.95, resolution=0.01)
    edge = knee + 0.01  # the exact highest passing rate
    assert edge - 0.01 <= result.rate <= edge + 1e-9
    assert result.accuracy == pytest.approx(accuracy(result.rate))
    assert result.accuracy >= 0.89 - 1e-9
    assert all(acc >= 0.89 - 1e-9 for rate, acc, ok in result.history if ok)
    assert all(rate > result.rate for rate, acc, ok in result.history if not ok)
    assert len(calls) - 1 <= 7  # log2(0.95 / 0.01) evaluations, no repeats, `high` not tried


def test_search_tolerance_zero_and_looser():
    accuracy, _ = cliff(0.5)
    strict = search_rate(accuracy, 0.9, tolerance=0.0, resolution=1e-3)
    loose = search_rate(accuracy, 0.9, tolerance=0.1, resolution=1e-3)
    assert strict.rate == pytest.approx(0.5, abs=1e-3)
    assert loose.rate == pytest.approx(0.6, abs=1e-3)


def test_search_all_pass_and_none_pass():
    accuracy, calls = cliff(1.0)
    result = search_rate(accuracy, 0.9, high=0.95, resolution=0.01)
    assert result.rate == 0.95 and calls[-1] == 0.95  # all pass: `high` last, once
    assert len(calls) == len(set(calls)) == 7 + 1  # the bisection's 7 midpoints, then `high`
    result = search_rate(lambda rate: 0.5, 0.9, resolution=0.01)
    assert result.rate == 0.0 and result.accuracy == 0.9  # none pass: the unpruned baseline
    assert all(not ok for _, _, ok in result.history)
    with pytest.raises(ValueError):
        search_rate(accuracy, 0.9, low=0.5, high=0.2)


def test_a_rate_not_measured_fails_without_an_accuracy():
    """accuracy(rate) None (the candidate could not be made): that rate fails, margin unasked,
    and the history records no accuracy; the search goes on below it."""
    asked = []
    result = search_rate(lambda rate: None if rate > 0.3 else 0.9, 0.9, resolution=0.01,
                         margin=lambda rate: asked.append(rate) or 0.0)
    assert 0.29 <= result.rate <= 0.3 and result.accuracy == 0.9
    assert all((value is None) == (rate > 0.3) and ok == (value is not None)
               for rate, value, ok in result.history)
    assert asked and max(asked) <= 0.3


def test_a_loss_of_exactly_the_tolerance_passes():
    """309 of 400 right against the baseline's 313: a change of exactly -1 point passes at
    tolerance 0.01, whatever the rounding of the accuracies (float32 as torch means give them, or
    float64); 308 of 400 fails."""
    import torch

    for dtype in (torch.float32, torch.float64):
        def accuracy(right):
            return float(torch.tensor([1.0] * right + [0.0] * (400 - right), dtype=dtype).mean())

        for baseline in range(300, 330):
            passed = search_rate(lambda rate: accuracy(baseline - 4), accuracy(baseline),
                                 tolerance=0.01, resolution=0.1)
            failed = search_rate(lambda rate: accuracy(baseline - 5), accuracy(baseline),
                                 tolerance=0.01, resolution=0.1)
            assert (passed.rate, failed.rate) == (0.95, 0.0), (dtype, baseline)


def test_search_margin_raises_the_bar_per_rate():
    accuracy, _ = cliff(0.5)  # 0.9 up to rate 0.5, then falls by 1 point per 0.01
    # tolerance 1 point, margin 2: only a gain of a point would pass, and no rate gains
    none = search_rate(accuracy, 0.9, tolerance=0.01, resolution=1e-3, margin=lambda r: 0.02)
    assert none.rate == 0.0 and all(not ok for _, _, ok in none.history)
    half = search_rate(accuracy, 0.9, tolerance=0.02, resolution=1e-3, margin=lambda r: 0.01)
    assert half.rate == pytest.approx(0.51, abs=1e-3)  # like tolerance 0.01 without a margin
    accuracy, evaluated = cliff(0.5)  # some rates pass, some fail
    seen = []
    result = search_rate(accuracy, 0.9, resolution=0.1, margin=lambda r: seen.append(r) or 0.0)
    # called once per evaluated rate, passing or failing, with the rounded rate
    assert len(seen) >= 3 and seen == evaluated == [r for r, _, _ in result.history]
    assert len(set(seen)) == len(seen) and all(r == round(r, 6) for r in seen)


def test_paired_change_counts_only_the_answers_that_changed():
    baseline = [True, True, False, True, True, False, True, True]    # 6 right
    candidate = [True, True, True, True, False, False, True, False]  # gains #2, loses #4 and #7
    out = paired_change(candidate, baseline)
    assert out["gained"] == 1 and out["lost"] == 2
    assert out["change"] == pytest.approx(-1 / 8)
    steps = torch.tensor([0, 0, 1, 0, -1, 0, 0, -1], dtype=torch.float64)
    assert out["change_se"] == pytest.approx(float(steps.std() / 8 ** 0.5))
    assert paired_change(baseline, baseline) == dict(change=0.0, change_se=0.0, gained=0, lost=0)
    with pytest.raises(ValueError, match="at least one example"):
        paired_change([], [])
    with pytest.raises(ValueError):
        paired_change([True], [True, False])


def test_weak_baseline():
    assert weak_baseline(0.8, None, 0.5) == [] and weak_baseline(0.8, 0.7, 0.5) == []
    assert weak_baseline(0.5, None, 0.5)[0].startswith("the prompt-tuned validation accuracy "
                                                       "0.500 is no better than always")
    below = weak_baseline(0.6, 0.7, 0.5)
    assert len(below) == 1 and "below the model's without a prompt (0.700)" in below[0]
    assert len(weak_baseline(0.3, 0.45, 0.4)) == 2  # both: the SmolLM2 tweets run of 4 epochs
    # the no-prompt check compares on the examples it ran on when told the baseline's there
    assert weak_baseline(0.8, 0.75, 0.5, baseline_on_zero_shot=0.7)[0].endswith(
        "the model's without a prompt (0.750) on the same examples")
    assert weak_baseline(0.6, 0.7, 0.5, baseline_on_zero_shot=0.72) == []


def test_mask_at_rate():
    ffn = torch.arange(20.0).reshape(2, 10)
    heads = torch.tensor([[1.0, 4.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    mask = mask_at_rate(ffn, heads, 0.3, scope="layer")
    assert mask.ffn[0].tolist() == list(range(3, 10)) and mask.ffn[1].tolist() == list(range(3, 10))
    assert mask.heads[0].tolist() == [1, 2, 3] and mask.heads[1].tolist() == [0, 1, 2]
    mask = mask_at_rate(ffn, heads, 0.5, scope="global", prune_heads=False)
    assert 0 not in mask.ffn or mask.ffn[0].numel() == 0
    assert mask.ffn[1].tolist() == list(range(10)) and dict(mask.heads) == {}
    sizes = dict(family="bert", hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=4,
                 num_layers=2, intermediate_size=10, model_type="bert")
    assert mask_at_rate(ffn, heads, 0.5, "global", True, sizes, rank="jointly") == \
        dk.ExpertMask.from_scores_jointly(ffn, heads, 0.5, sizes)
    with pytest.raises(ValueError, match="rank='jointly' needs prune_heads=True"):
        mask_at_rate(ffn, heads, 0.5, "global", False, sizes, rank="jointly")
    with pytest.raises(ValueError, match="rank must be 'separately' or 'jointly'"):
        mask_at_rate(ffn, heads, 0.5, rank="together")
    with pytest.raises(ValueError, match=r"--rank jointly\) ranks heads with neurons"):
        SearchConfig(rank="jointly")
    assert SearchConfig(rank="jointly", prune_heads=True).rank == "jointly"


def test_localize_ranks_heads_with_neurons_only_on_fisher_scores(tokenizer):
    """Activation x gradient scores make a head look cheap per weight (measured: most heads go
    first, and the expert with them); the call is refused before anything runs."""
    model = tiny_bert()
    before = snapshot(model)
    jointly = SearchConfig(prune_heads=True, rank="jointly")
    for method in ("grad", "ig"):
        with pytest.raises(ValueError, match=rf"{method}' scores do not .*--method fisher"):
            localize(model, tokenizer, sentiment_task(), search=jointly,
                     attribution=AttributionConfig(method=method), progress=False)
    assert state_dict_equal(before, snapshot(model)) and not dk.is_patched(model)


def _model_state(model) -> tuple:
    """Everything a refused or finished localize call must leave as it was: weights,
    requires_grad flags, each module's mode and class, hooks."""
    return (snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()},
            [(type(m).__name__, m.training, len(m._forward_pre_hooks), len(m._forward_hooks))
             for m in model.modules()])


def _same_state(before, after) -> bool:
    return state_dict_equal(before[0], after[0]) and before[1:] == after[1:]


def _bad_call(**changes):
    """localize's arguments on a tiny BERT, with `changes` (a "model" key builds another)."""
    data = sentiment_task(40)
    call = dict(model=tiny_bert, train=data, validation=None, progress=False,
                prompt=PromptConfig(epochs=1, num_virtual_tokens=3))
    call.update(changes)
    return call


@pytest.mark.parametrize("call, error, message", [
    pytest.param(_bad_call(model=lambda: tiny_bert(positions=16), max_length=20), ValueError,
                 "3 virtual tokens and texts of up to 20 tokens need 23 positions, but the model "
                 "has 16: use a max_length of 13 or less", id="texts-past-the-positions"),
    pytest.param(_bad_call(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0",
                 id="batch-size-0"),
    pytest.param(_bad_call(max_length=0), ValueError, "max_length must be an int >= 1",
                 id="max-length-0"),
    pytest.param(_bad_call(search=SearchConfig(shards=5)), ValueError,
                 r"SearchConfig.shards=5 \(--tp-shards\): the model's 48 neurons per layer do not "
                 "split into 5 equal shards", id="shards-not-dividing"),
    pytest.param(_bad_call(backend="nope"), ValueError, "backend must be one of",
                 id="unknown-backend"),
    pytest.param(_bad_call(label_words=[" bad", " good"]), ValueError,
                 r"label_words and template are for causal LMs; a classifier "
                 r"\(BertForSequenceClassification\) answers with its head",
                 id="label-words-for-a-classifier"),
    pytest.param(_bad_call(template="Review: {text}"), ValueError,
                 "label_words and template are for causal LMs", id="template-for-a-classifier"),
    pytest.param(_bad_call(model=tiny_llama, label_words="XY"), ValueError,
                 "label_words must be a list, got the str 'XY' .it would be split",
                 id="label-words-a-str"),
    pytest.param(_bad_call(validation=TaskData(["fine", "bad"], ["positive", "neutral"],
                                               ["positive", "neutral"])), ValueError,
                 r"the validation examples hold labels \['neutral'\] that are not among the "
                 r"task's labels \['negative', 'positive'\]", id="validation-label-unknown"),
    pytest.param(_bad_call(model=lambda: tiny_bert().half()), ValueError,
                 "not on float16 weights: localize the float32 model", id="float16-weights"),
    pytest.param(_bad_call(model=lambda: tiny_bert(vocab=1000),
                           prompt=PromptConfig(epochs=1, init_text="wonderful film")), ValueError,
                 r"the prompt's init tokens \[\d+, \d+\] are not all ids of the model's "
                 r"1000-token vocabulary", id="init-text-past-the-vocabulary"),
    pytest.param(_bad_call(model=lambda: __import__("moe_utils").mixtral()),
                 dk.UnsupportedModelError, "attribution .localize. supports the BERT and LLaMA "
                 "families, not mixtral", id="mixtral"),
    pytest.param(_bad_call(train={"train": sentiment_task(40)}), TypeError,
                 "train must be a doe_kernels.data.TaskData, got a dict", id="train-a-dict"),
    pytest.param(_bad_call(validation=[("fine", "positive")]), TypeError,
                 "validation must be a doe_kernels.data.TaskData, got a list",
                 id="validation-a-list"),
    pytest.param(_bad_call(seed=None), TypeError, "seed must be an int, got None",
                 id="seed-none"),
    pytest.param(_bad_call(seed=2 ** 64), ValueError,
                 r"seed must be in \[-9223372036854775808, 18446744073709551615\]",
                 id="seed-too-large"),
    pytest.param(_bad_call(start_from="expert.safetensors"), TypeError,
                 r"start_from must be a doe_kernels.Expert \(Expert.load\(path\) reads a file\), "
                 "got str", id="start-from-a-path"),
    pytest.param(_bad_call(tokenizer=None), TypeError,
                 "tokenizer must be a HuggingFace tokenizer, got NoneType", id="no-tokenizer"),
    pytest.param(_bad_call(train=sentiment_task(2)), ValueError,
                 r"localize needs training and validation examples, got 2 and 0 \(the "
                 "validation examples split off the 2 given: give more, or a validation set",
                 id="too-few-to-split"),
    pytest.param(_bad_call(seed=1.5), TypeError, "seed must be an int, got float 1.5",
                 id="seed-a-float"),
])
def test_localize_refuses_bad_arguments_before_changing_anything(tokenizer, call, error,
                                                                   message):
    call = dict(call)
    model = call.pop("model")()
    tokenizer = call.pop("tokenizer", tokenizer)
    model.train()
    list(model.modules())[3].eval()  # a mode set per module stays so
    before = _model_state(model)
    with pytest.raises(error, match=message):
        localize(model, tokenizer, **call)
    assert _same_state(before, _model_state(model)) and not dk.is_patched(model)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_an_example_that_encodes_to_no_token_is_refused_before_training(monkeypatch, split):
    """A causal LM's example that encodes to no token with its template ("{text}" and "", with
    SmolLM2's tokenizer, which adds no BOS) was refused by the baseline's evaluation, after
    prompt tuning had run; now before it, named by its split and place."""
    from transformers import AutoTokenizer

    from real_models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = tiny_llama(vocab=len(tokenizer))
    data = {name: sentiment_task(12) for name in ("train", "validation")}
    texts = list(data[split].texts)
    texts[5] = ""
    data[split] = TaskData(texts, data[split].labels, data[split].label_names)
    monkeypatch.setattr(sys.modules["doe_kernels.localize"], "_tune_prompt",
                        lambda *args: pytest.fail("prompt tuning ran"))
    with pytest.raises(ValueError, match=f"{split} example 5: '' encodes to no token with the "
                                         "template '{text}'"):
        localize(model, tokenizer, data["train"], data["validation"], template="{text}",
                 progress=False)
    if split == "train":  # validation split off by localize: the place in the data given
        with pytest.raises(ValueError, match="train example 5: '' encodes to no token"):
            localize(model, tokenizer, data["train"], template="{text}", progress=False)


@pytest.mark.filterwarnings("ignore:localize.*no better than always answering")
def test_localize_keeps_the_callers_modes_and_random_state(tokenizer, one_thread):
    """Per-module train/eval modes come back as they were, and torch's global random state is
    not reseeded by the call (the call's own seed still decides its result)."""
    model = tiny_bert()
    model.train()
    list(model.modules())[3].eval()
    before = _model_state(model)
    small = dict(prompt=PromptConfig(epochs=1, num_virtual_tokens=3),
                 attribution=AttributionConfig(num_examples=16),
                 recovery=RecoveryConfig(epochs=1, num_examples=16, calibration_examples=8),
                 search=SearchConfig(resolution=0.3), progress=False, seed=5)
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(4, generator=torch.Generator().manual_seed(seed))
        expert = localize(model, tokenizer, sentiment_task(60), **small)
        assert torch.equal(torch.rand(4), expected)  # the caller's stream went on untouched
        results.append(expert)
    assert _same_state(before, _model_state(model))
    assert torch.equal(results[0].prompt, results[1].prompt)
    assert torch.equal(results[0].mask.ffn[0], results[1].mask.ffn[0])
    other = localize(model, tokenizer, sentiment_task(60), **dict(small, seed=6))
    assert not torch.equal(other.prompt, results[0].prompt)  # the call's seed decides it


@pytest.mark.filterwarnings("ignore:localize.*no better than always answering")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
def test_localize_runs_as_outside_the_callers_grad_and_autocast_modes(tokenizer, one_thread,
                                                                       mode, precision):
    """Under the caller's torch.no_grad or torch.inference_mode localize still trains (its
    backward passes failed), and under the caller's bfloat16 autocast it trains and evaluates
    in the precision it reports (a float32 training ran in bfloat16; a bfloat16 one inside
    another autocast context must not keep the trained tensors' casts from step to step): the
    expert it gives outside them."""
    model = tiny_bert()
    small = dict(prompt=PromptConfig(epochs=1, num_virtual_tokens=3, precision=precision),
                 attribution=AttributionConfig(num_examples=16),
                 recovery=RecoveryConfig(epochs=1, num_examples=16, calibration_examples=8),
                 search=SearchConfig(resolution=0.3), progress=False)
    want = localize(model, tokenizer, sentiment_task(60), **small)
    context = dict(no_grad=torch.no_grad, inference_mode=torch.inference_mode,
                   autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))[mode]
    with context():
        got = localize(model, tokenizer, sentiment_task(60), **small)
    assert got.figures["prompt_precision"] == precision
    assert torch.equal(got.prompt, want.prompt) and torch.equal(got.head["classifier.weight"],
                                                                want.head["classifier.weight"])
    assert got.mask == want.mask
    if mode == "no_grad" and precision == "float32":  # numpy's integers are seeds too
        import numpy

        same = localize(model, tokenizer, sentiment_task(60), seed=numpy.int64(0), **small)
        assert torch.equal(same.prompt, want.prompt)


def test_the_training_autocast_reads_trained_tensors_anew_inside_another_autocast():
    """localize trains inside its own autocast context (the caller's switched off): bfloat16
    training steps nested in it must not reuse a trained tensor's cast from an earlier step
    (autocast's cast cache lives until the outermost context ends)."""
    from doe_kernels.localize.prompt import autocast

    weight, x = torch.nn.Parameter(torch.ones(4, 4)), torch.ones(1, 4)
    with torch.autocast("cpu", enabled=False):
        with autocast(torch.device("cpu"), "bfloat16"):
            before = torch.nn.functional.linear(x, weight)
        with torch.no_grad():
            weight.mul_(2)  # an optimizer step
        with autocast(torch.device("cpu"), "bfloat16"):
            after = torch.nn.functional.linear(x, weight)
    assert torch.equal(after, 2 * before)


@pytest.mark.filterwarnings("ignore:SearchConfig.tolerance")  # (1: every rate passes)
def test_every_patched_forward_runs_on_the_backend_asked_for(tokenizer, monkeypatch,
                                                          one_thread):
    """`backend` reaches every candidate's forward passes: the reconstruction's choice, the
    re-tuning's judging and the search's measurement."""
    import doe_kernels.patching as patching

    backends, real_patch = [], patching.patch

    def recording(model, mask, backend="auto", dynamic_skip=False):
        backends.append(backend)
        return real_patch(model, mask, backend, dynamic_skip)

    monkeypatch.setattr(patching, "patch", recording)
    localize(tiny_bert(), tokenizer, sentiment_task(60), backend="torch", progress=False,
             prompt=PromptConfig(epochs=1, num_virtual_tokens=3),
             attribution=AttributionConfig(num_examples=16),
             recovery=RecoveryConfig(epochs=1, num_examples=16, calibration_examples=8),
             search=SearchConfig(resolution=0.3, tolerance=1.0))
    assert len(backends) > 3 and set(backends) == {"torch"}


@pytest.mark.filterwarnings("ignore:SearchConfig.tolerance")  # (1: every rate passes)
def test_a_diverged_candidate_fails_and_says_so(tokenizer, monkeypatch, one_thread):
    """A candidate whose re-tuning diverges fails whatever the tolerance (it was never measured),
    with a warning naming its rate."""
    localize_module = sys.modules["doe_kernels.localize"]

    def diverging(model, tokenizer, expert, *args, **kwargs):
        raise localize_module.TrainingDiverged("recovery training diverged (test)")

    monkeypatch.setattr(localize_module, "retune", diverging)
    with pytest.warns(UserWarning, match=r"the candidate at pruning rate 0\.\d+ fails: recovery "
                                         r"training diverged \(test\)"):
        expert = localize(tiny_bert(), tokenizer, sentiment_task(60), progress=False,
                          prompt=PromptConfig(epochs=1, num_virtual_tokens=3),
                          attribution=AttributionConfig(num_examples=16),
                          recovery=RecoveryConfig(epochs=1, num_examples=16,
                                                  calibration_examples=8),
                          search=SearchConfig(resolution=0.3, tolerance=1.0))
    assert expert.figures["pruning_rate"] == 0.0
    # never measured: recorded without an accuracy or a standard error
    assert expert.figures["search"] and all(
        step[1:] == [None, False, None] for step in expert.figures["search"])


# ---- end to end ---------------------------------------------------------------------------
def judged_of(figures) -> dict:
    """{rate: was its re-tuned prompt kept (closer to the unpruned model's answers)}"""
    return {rate: after < before for rate, before, after in figures["retuning_divergences"]}


def test_localize_end_to_end_minilm(tokenizer, tmp_path, monkeypatch, one_thread):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    before = snapshot(model)
    splits = sentiment_task().split((0.6, 0.2, 0.2))
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expert = localize(model, tokenizer, splits["train"], splits["validation"],
                          prompt=PromptConfig(epochs=3),
                          attribution=AttributionConfig(num_examples=128), progress=False)
    seconds = time.perf_counter() - started
    assert not [w for w in caught if "localize(" in str(w.message)]  # a good baseline: no warning
    figures = expert.figures
    counts = collections.Counter(splits["validation"].labels)
    assert figures["accuracy_majority_label"] == max(counts.values()) / len(splits["validation"])
    assert figures["prompt_epochs"] == 3 and figures["prompt_lr"] == 3e-2
    assert figures["prompt_batching"] == "shuffled"
    # the default recipe reconstructs each candidate, keeping the variant closest to dense
    assert figures["reconstruct"] == "auto" and figures["readout_weight"] is None
    assert figures["reconstruction"] in [name for name, _, _ in AUTO_VARIANTS]
    assert expert.mask.scaled == (figures["reconstruction"] != "plain")
    # per search step, the variant chosen (the one of least divergence) and whether re-tuned
    steps = figures["search_candidates"]
    assert [step["rate"] for step in steps] == [rate for rate, *_ in figures["search"]]
    for step in steps:
        divergences = step["divergences"]
        assert set(divergences) == {name for name, _, _ in AUTO_VARIANTS}
        assert step["reconstruction"] == min(divergences, key=divergences.get)
        assert step["retuned"] == judged_of(figures)[step["rate"]]
    chosen = steps[[step["rate"] for step in steps].index(figures["pruning_rate"])]
    assert chosen["reconstruction"] == figures["reconstruction"]
    # ... then distils it from the prompt-tuned expert, which stays the baseline as it is
    assert figures["recover_objective"] == "distill" and figures["accuracy_before_recovery"] is None
    # ... keeping the re-tuned prompt and head only where they bring the held-out answers closer
    assert figures["recover_schedule"] == "linear" and figures["recover_keep"] == "closer"
    judged = judged_of(figures)
    assert figures["pruning_rate"] in judged, figures["search"]  # a candidate was chosen
    assert figures["retuned"] == judged[figures["pruning_rate"]]
    # where the time went: every step, together no more than the whole call
    steps = figures["step_seconds"]
    assert set(steps) == {"prompt", "recovery_setup", "baseline", "attribution",
                          "candidates_recovery", "candidates_evaluation"}
    assert all(value > 0 for value in steps.values())
    assert sum(steps.values()) <= figures["seconds"] + 0.1 * len(steps) <= seconds + 1
    print(f"\nlocalize: {seconds:.1f}s, figures: {figures}")
    assert not dk.is_patched(model) and state_dict_equal(before, snapshot(model))
    assert figures["accuracy_before"] >= 0.9
    assert figures["accuracy_after"] >= figures["accuracy_before"] - 0.01
    assert figures["pruning_rate"] >= 0.2 and figures["ffn_pruning_rate"] >= 0.2
    with expert.plugged(model):
        assert expert.evaluate(model, tokenizer, splits["validation"]) == figures["accuracy_after"]
        test_accuracy = expert.evaluate(model, tokenizer, splits["test"])
    print(f"test accuracy (pruned {figures['pruning_rate']:.2f}): {test_accuracy:.3f}")
    assert test_accuracy >= 0.85
    expert.save(tmp_path / "sentiment.safetensors")
    loaded = Expert.load(tmp_path / "sentiment.safetensors")
    texts = splits["test"].texts[:16]
    assert loaded.predict(model, tokenizer, texts) == expert.predict(model, tokenizer, texts)
    assert state_dict_equal(before, snapshot(model))

    # Searching again from this expert's prompt and head: no training, the paper's scope.
    few = AttributionConfig(num_examples=64)
    # the calls below test other steps: kept quick. They start from the expert's baseline, its
    # unpruned prompt and head (expert.dense()).
    plain = RecoveryConfig(epochs=0, reconstruct="none")
    start = expert.dense()
    again = localize(model, tokenizer, splits["train"], splits["validation"], attribution=few,
                     search=SearchConfig(scope="layer", prune_heads=True, confidence=0),
                     start_from=expert, recovery=plain, progress=False)
    assert torch.equal(again.prompt, start.prompt) and again.head.keys() == start.head.keys()
    assert all(torch.equal(again.head[k], start.head[k]) for k in start.head)
    assert again.figures["accuracy_before"] == figures["accuracy_before"]
    assert again.figures["scope"] == "layer" and again.figures["prune_heads"]
    assert again.figures["prompt_epochs"] == 3  # how the reused prompt was trained
    # The same search asking each candidate to clear 2 paired SEs beyond the tolerance: each
    # verdict follows that rule, and each step's SE is the paired one.
    # (plain candidates, so that the probe below rebuilds one exactly)
    sure = localize(model, tokenizer, splits["train"], splits["validation"], attribution=few,
                    search=SearchConfig(scope="global", prune_heads=False, tolerance=0.05,
                                        confidence=2.0),
                    recovery=plain, start_from=expert,
                    progress=False)
    base, steps = sure.figures["accuracy_before"], sure.figures["search"]
    assert sure.figures["confidence"] == 2.0 and all(len(step) == 4 for step in steps)
    assert all(ok == (acc - base >= -0.05 + 2 * se - 1e-12) for _, acc, ok, se in steps)
    rate, _, _, se = max(steps, key=lambda step: step[3])
    assert se > 0
    probe = mask_at_rate(*attribute(model, tokenizer, start, splits["train"],  # as the search
                                    num_examples=64, progress=False), rate, "global", False,
                         model_sizes(model))
    probe = Expert(probe, start.prompt, expert.task_type, expert.label_names, head=start.head,
                   sizes=model_sizes(model))
    with probe.plugged(model):
        correct = probe.correct(model, tokenizer, splits["validation"])
    baseline_correct = expert.dense().correct(model, tokenizer, splits["validation"])
    assert se == pytest.approx(paired_change(correct.tolist(),
                                             baseline_correct.tolist())["change_se"])
    # With recovery: every candidate's prompt and head re-tuned on its pruned network first; the
    # expert returned is the re-tuned one that the search measured.
    recovered = localize(model, tokenizer, splits["train"], splits["validation"],
                         attribution=few, recovery=RecoveryConfig(epochs=1, num_examples=48,
                                                                  reconstruct="scales",
                                                                  objective="labels"),
                         search=SearchConfig(confidence=0, tolerance=0.05), start_from=expert,
                         progress=False)
    figures = recovered.figures
    assert figures["recover_epochs"] == 1 and figures["recover_examples"] == 48
    assert figures["recover_lr"] == 3e-2  # the prompt's lr unless told
    assert figures["pruning_rate"] > 0 and not torch.equal(recovered.prompt, start.prompt)
    # the baseline it was compared against: the unpruned prompt and head given the same extra
    # epoch on the same examples
    baseline = recovered.dense()
    same, _ = retune(model, tokenizer, expert.dense(), splits["train"].sample(48, seed=0), 1,
                     progress=False)
    assert baseline.mask is None and not torch.equal(baseline.prompt, start.prompt)
    torch.testing.assert_close(baseline.prompt, same.prompt)
    assert all(torch.allclose(baseline.head[k], same.head[k]) for k in start.head)
    assert figures["accuracy_before_recovery"] == expert.figures["accuracy_before"]
    with baseline.plugged(model):
        assert baseline.evaluate(model, tokenizer, splits["validation"]) == \
            figures["accuracy_before"]
    assert figures["accuracy_after"] >= figures["accuracy_before"] - 0.05  # the search's tolerance
    with recovered.plugged(model):
        assert recovered.evaluate(model, tokenizer, splits["validation"]) == \
            figures["accuracy_after"]
    assert state_dict_equal(before, snapshot(model))
    assert all(not m._forward_pre_hooks for m in model.modules())
    # With reconstruction: each candidate's scales and bias deltas fitted on 64 training examples
    # (with the prompt-tuned expert's prompt), then its prompt and head distilled from the
    # unpruned expert's logits, before it is measured; they are served with it.
    retuned_with = []  # each re-tuning's schedule, precision and batching

    def spy(*args, **kwargs):
        retuned_with.append((kwargs["schedule"], kwargs["precision"], kwargs["batching"]))
        return real_retune(*args, **kwargs)

    localize_module = sys.modules["doe_kernels.localize"]
    real_retune = localize_module.retune
    monkeypatch.setattr(localize_module, "retune", spy)
    rebuilt = localize(model, tokenizer, splits["train"], splits["validation"], attribution=few,
                       recovery=RecoveryConfig(reconstruct="scales", calibration_examples=64,
                                               epochs=1, num_examples=48, objective="distill",
                                               schedule="constant"),
                       search=SearchConfig(confidence=0, tolerance=0.05), start_from=expert,
                       prompt=PromptConfig(precision="bfloat16", batching="by_length"),
                       progress=False)
    figures = rebuilt.figures
    assert retuned_with and set(retuned_with) == {("constant", "bfloat16", "by_length")}
    assert figures["recover_batching"] == "by_length"
    assert figures["recover_schedule"] == "constant"
    assert figures["reconstruct"] == "scales" and figures["calibration_examples"] == 64
    assert figures["recover_objective"] == "distill" and figures["recover_epochs"] == 1
    # distilling: the baseline is the prompt-tuned expert itself, not re-tuned
    assert figures["accuracy_before_recovery"] is None
    assert torch.equal(rebuilt.dense().prompt, start.prompt)
    assert figures["pruning_rate"] > 0, figures["search"]
    assert rebuilt.mask.scaled and rebuilt.mask.bias_compensated
    assert not torch.equal(rebuilt.prompt, start.prompt)
    with rebuilt.plugged(model):
        assert rebuilt.evaluate(model, tokenizer, splits["validation"]) == \
            figures["accuracy_after"]
    assert state_dict_equal(before, snapshot(model))
    assert all(not (m._forward_pre_hooks or m._forward_hooks) for m in model.modules())
    # Layer-wise reconstruction, read-out weighted, without re-tuning: the prompt and head are
    # the start's.
    layered = localize(model, tokenizer, splits["train"], splits["validation"], attribution=few,
                       recovery=RecoveryConfig(reconstruct="layerwise", calibration_examples=32,
                                               readout_weight=1.0, epochs=0),
                       start_from=expert, progress=False)
    assert layered.figures["reconstruct"] == layered.figures["reconstruction"] == "layerwise"
    assert layered.figures["readout_weight"] == 1.0 and layered.mask.scaled
    assert torch.equal(layered.prompt, start.prompt)
    with layered.plugged(model):
        assert layered.evaluate(model, tokenizer, splits["validation"]) == \
            layered.figures["accuracy_after"]
    assert state_dict_equal(before, snapshot(model))
    assert all(not (m._forward_pre_hooks or m._forward_hooks) for m in model.modules())
    # A baseline no better than the most frequent label (a zeroed head answers label 0 always)
    # is reported, and the search still runs.
    weak = Expert.load(tmp_path / "sentiment.safetensors").dense()
    weak.head = {k: torch.zeros_like(v) for k, v in weak.head.items()}
    with pytest.warns(UserWarning, match="no better than always answering the most frequent") \
            as warned:
        weak_expert = localize(model, tokenizer, splits["train"], splits["validation"],
                               attribution=AttributionConfig(num_examples=16), start_from=weak,
                               recovery=plain, progress=False)
    assert weak_expert.figures["accuracy_before"] <= weak_expert.figures["accuracy_majority_label"]
    assert {w.filename for w in warned if "no better than" in str(w.message)} == {__file__}
    # A recovery whose training wrecks the unpruned baseline is reported (lr far too high).
    with pytest.warns(UserWarning, match="the recovery's training lowered the unpruned") \
            as warned:
        localize(model, tokenizer, splits["train"], splits["validation"],
                 recovery=RecoveryConfig(epochs=1, num_examples=48, lr=1e3, reconstruct="none",
                                         objective="labels"),
                 search=SearchConfig(max_rate=0.2, resolution=0.2),
                 attribution=AttributionConfig(num_examples=16), start_from=expert,
                 progress=False)
    assert {w.filename for w in warned if "lowered" in str(w.message)} == {__file__}
    with pytest.raises(ValueError, match="start_from is an expert for"):
        other = ["good" if label == "positive" else "bad" for label in LABELS]
        localize(model, tokenizer, TaskData(TEXTS, other, ["bad", "good"]), start_from=expert,
                 progress=False)
    with pytest.raises(ValueError, match="start_from was trained with max_length=128"):
        localize(model, tokenizer, splits["train"], splits["validation"], max_length=64,
                 start_from=expert, progress=False)
    # The search is never judged on examples the reused prompt was trained on: a validation
    # split drawn here off other training examples than the prompt's is refused, a validation
    # set given with them is warned of; an expert that does not record them is not checked.
    trained_on = expert.figures["prompt_trained_on"]
    assert trained_on == splits["train"].digest()
    assert again.figures["prompt_trained_on"] == figures["prompt_trained_on"] == trained_on
    quick = dict(recovery=plain, search=SearchConfig(max_rate=0.2, resolution=0.2),
                 attribution=AttributionConfig(num_examples=16), progress=False)
    with pytest.raises(ValueError, match="trained on other examples than this call's"):
        localize(model, tokenizer, splits["train"], start_from=expert, **quick)
    fewer = splits["train"].subset(range(40))
    with pytest.warns(UserWarning, match="trained on other examples") as warned:
        other_call = localize(model, tokenizer, fewer, splits["validation"], start_from=expert,
                              **quick)
    assert [w.filename for w in warned if "trained on other" in str(w.message)] == [__file__]
    # carried from the reused prompt, not this call's training examples
    assert fewer.digest() != trained_on == other_call.figures["prompt_trained_on"]
    # (the dense baseline carries what its prompt was trained on)
    assert expert.dense().figures == {"prompt_trained_on": figures["prompt_trained_on"]}
    unrecorded = expert.dense()
    unrecorded.figures = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searched = localize(model, tokenizer, splits["train"], start_from=unrecorded, **quick)
    assert not [w for w in caught if "trained on other examples" in str(w.message)]
    assert searched.figures["prompt_trained_on"] is None


@pytest.mark.filterwarnings("ignore:localize.*no better than")
@pytest.mark.filterwarnings("ignore:SearchConfig.tolerance")  # (1: every rate passes)
def test_recovery_keeps_a_retuned_prompt_only_when_held_out_answers_get_closer(
        tokenizer, monkeypatch, one_thread):
    """keep="closer": the recovery trains on none of the held-out examples that judge it, and a
    re-tuning that moves the answers away from the unpruned model's is dropped."""
    model = tiny_bert()
    start = classifier_expert(model)
    data = sentiment_task(count=560)
    data = TaskData([f"{text} ({i})" for i, text in enumerate(data.texts)], data.labels,
                    data.label_names, data.name)  # each text once
    splits = data.split((0.75, 0.25, 0.0))
    train, validation = splits["train"], splits["validation"]
    calibration, variants, held_out = split_for_judging(train, 0, 64)
    judged = set(train.subset(held_out).texts)
    assert len(held_out) == len(variants) == FIDELITY_EXAMPLES
    assert not set(held_out) & set(variants + calibration)
    localize_module = sys.modules["doe_kernels.localize"]
    real_retune, trained_on = localize_module.retune, []

    def wrecking(model, tokenizer, expert, data, *args, **kwargs):
        trained_on.extend(data.texts)
        retuned, losses = real_retune(model, tokenizer, expert, data, *args, **kwargs)
        retuned.prompt = retuned.prompt + 50.0  # far from anything the model has seen
        return retuned, losses

    monkeypatch.setattr(localize_module, "retune", wrecking)
    config = dict(reconstruct="scales", calibration_examples=64, epochs=1, num_examples=96)
    found = localize(model, tokenizer, train, validation, start_from=start,
                     attribution=AttributionConfig(num_examples=16),
                     recovery=RecoveryConfig(keep="closer", **config), progress=False,
                     search=SearchConfig(max_rate=0.5, resolution=0.25, confidence=0,
                                         tolerance=1.0))
    assert trained_on and not judged & set(trained_on)  # never trained on what judges it
    figures = found.figures
    assert figures["pruning_rate"] == 0.5 and figures["retuned"] is False
    assert all(after > before for _, before, after in figures["retuning_divergences"])
    assert torch.equal(found.prompt, start.prompt)  # the reconstructed candidate's own prompt
    # keep="retuned": the same re-tuning is kept, wrecked or not, and may train
    # on any example
    trained_on.clear()
    kept = localize(model, tokenizer, train, validation, start_from=start,
                    attribution=AttributionConfig(num_examples=16),
                    recovery=RecoveryConfig(keep="retuned", **config), progress=False,
                    search=SearchConfig(max_rate=0.5, resolution=0.25, confidence=0,
                                        tolerance=1.0))
    assert kept.figures["retuned"] is True and "retuning_divergences" not in kept.figures
    assert not torch.equal(kept.prompt, start.prompt)
    assert len(trained_on) == 96 * len(kept.figures["search"])  # 96 per candidate


# ---- options ------------------------------------------------------------------------------
def test_configs_default_to_the_recipe_and_refuse_bad_values():
    assert PromptConfig() == PromptConfig(num_virtual_tokens=10, epochs=5, lr=3e-2, head_lr=1e-2,
                                          init_text=None, precision="auto",
                                          batching="shuffled", start="auto")
    assert AttributionConfig() == AttributionConfig(method="grad", ig_steps=5, num_examples=256,
                                                    absolute=True)
    # the recipe that measured best (docs/results.md "localize's defaults")
    assert SearchConfig() == SearchConfig(tolerance=0.01, confidence=1.0, scope="global",
                                          prune_heads=False, max_rate=0.9, resolution=0.05,
                                          shards=1)
    assert RecoveryConfig() == RecoveryConfig(epochs=1, lr=None, num_examples=1024,
                                              objective="distill", reconstruct="auto",
                                              readout_weight=0.0, schedule="linear",
                                              keep="closer")
    assert RecoveryConfig().objective == "distill"
    with pytest.raises(dataclasses.FrozenInstanceError):
        SearchConfig().tolerance = 0.1
    nan, inf = float("nan"), float("inf")
    for make, message in (
            (lambda: SearchConfig(confidence=-1), r"confidence \(--confidence\) must be a finite "
                                                  r"number >= 0, got -1"),
            (lambda: SearchConfig(confidence=inf), "confidence .* finite number >= 0, got inf"),
            (lambda: SearchConfig(tolerance=-0.1), "tolerance .* >= 0"),
            (lambda: SearchConfig(tolerance=nan), "tolerance .* got nan"),
            (lambda: SearchConfig(max_rate=1.5), "max_rate"),
            (lambda: SearchConfig(tolerance=1.5), r"a fraction of accuracy \(0.01: one point\) "
                                                  "of at most 1, got 1.5"),
            (lambda: SearchConfig(resolution=0), "resolution .* > 0"),
            (lambda: SearchConfig(scope="model"), "scope .* must be one of"),
            (lambda: AttributionConfig(method="x"), "method .* must be one of"),
            (lambda: AttributionConfig(method="ig", ig_steps=0), "ig_steps .* > 0"),
            (lambda: AttributionConfig(num_examples=0), "num_examples .* > 0"),
            (lambda: PromptConfig(num_virtual_tokens=0), "num_virtual_tokens"),
            (lambda: PromptConfig(lr=-1.0), r"PromptConfig.lr \(--lr\) .* > 0"),
            (lambda: PromptConfig(epochs=-2), "epochs .* >= 0"),
            (lambda: PromptConfig(head_lr=0), "head_lr .* > 0"),
            (lambda: PromptConfig(precision="float16"), r"\(--train-precision\) must be one of"),
            (lambda: PromptConfig(batching="sorted"), r"\(--train-batches\) must be one of"),
            (lambda: PromptConfig(start="vocab"), r"\(--prompt-start\) must be one of"),
            (lambda: PromptConfig(init_text="hi", start="random"), "not both"),
            (lambda: RecoveryConfig(epochs=-1), r"RecoveryConfig.epochs \(--recover-epochs\)"),
            (lambda: RecoveryConfig(lr=-5), "lr .* > 0"),
            (lambda: RecoveryConfig(num_examples=0), r"\(--recover-examples\) .* > 0"),
            (lambda: RecoveryConfig(schedule="cosine"), r"\(--recover-schedule\) must be one of"),
            (lambda: RecoveryConfig(keep="best"), r"\(--recover-keep\) must be one of")):
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(TypeError, match="epochs .* must be of type int"):
        PromptConfig(epochs="5")
    with pytest.raises(TypeError, match="prune_heads .* must be of type bool"):
        SearchConfig(prune_heads=1)
    # fields whose default is None take their annotation's type
    with pytest.raises(TypeError, match=r"RecoveryConfig.lr \(--recover-lr\) must be of type "
                                        r"float, got '0.1'"):
        RecoveryConfig(lr="0.1")
    with pytest.raises(TypeError, match="lr .* must be of type float, got True"):
        RecoveryConfig(lr=True)
    with pytest.raises(TypeError, match=r"init_text \(--prompt-init\) must be of type str"):
        PromptConfig(init_text=5)
    assert PromptConfig(init_text="a review:").init_text == "a review:"
    assert RecoveryConfig(lr=1e-3).lr == 1e-3 and PromptConfig(lr=1).lr == 1
    with pytest.warns(UserWarning, match="0.5 lets a candidate lose 50 points") as warned:
        SearchConfig(tolerance=0.5)  # (half a point is 0.005)
        dataclasses.replace(SearchConfig(), tolerance=0.5)
        with pytest.deprecated_call():  # (localize's deprecated flat keywords)
            configs_from_flat({}, {"tolerance": 0.5})

        class Mine(SearchConfig):  # a caller's subclass
            pass

        Mine(tolerance=0.5)
    # each pointing at the caller's line, not at the dataclass's __init__ or the library's
    assert [w.filename for w in warned if "lets a candidate" in str(w.message)] == [__file__] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SearchConfig(tolerance=0.1).tolerance == 0.1


def test_prompt_start_text_by_the_choice_and_the_task():
    """A given text wins; 'auto' starts a causal LM from its label words (joined by spaces, as
    Lester et al.'s class-label start), a classifier from random tokens."""
    from doe_kernels.localize.prompt import start_text

    def start(task_type, label_words, **options):
        return start_text(PromptConfig(**options), task_type, label_words, ["neg", "pos"])

    words = [" negative", " positive"]
    assert start("causal_lm", words, init_text="a review:") == "a review:"
    assert start("causal_lm", words) == "negative positive"
    assert start("seq_cls", None) is None
    assert start("seq_cls", None, start="label_words") == "neg pos"
    assert start("causal_lm", words, start="random") is None
    with pytest.raises(ValueError, match="must be one of"):
        start("causal_lm", words, start="vocab")


def test_flat_keywords_are_deprecated_aliases_of_the_config_fields():
    """Each flat keyword of the old signature maps onto its config field, with a
    DeprecationWarning naming the new spelling; with its config also given, or unknown, it is a
    TypeError."""
    flat = dict(num_virtual_tokens=4, epochs=2, lr=0.1, head_lr=0.2, prompt_init="hi",
                method="ig", ig_steps=3, attribution_examples=7, absolute=False, tolerance=0.02,
                confidence=1.0, scope="global", prune_heads=False, max_rate=0.5, resolution=0.1,
                recover_epochs=1, recover_lr=0.01, recover_examples=9)
    given = dict(prompt=None, attribution=None, search=None, recovery=None)
    with pytest.warns(DeprecationWarning) as record:
        configs = configs_from_flat(given, flat)
    assert [str(w.message).split(" is deprecated")[0] for w in record] == [
        "localize(num_virtual_tokens=, epochs=, lr=, head_lr=, prompt_init=)",
        "localize(method=, ig_steps=, attribution_examples=, absolute=)",
        "localize(tolerance=, confidence=, scope=, prune_heads=, max_rate=, resolution=)",
        "localize(recover_epochs=, recover_lr=, recover_examples=)"]
    assert "use localize(..., search=SearchConfig(tolerance=0.02, " in str(record[2].message)
    assert configs == dict(
        prompt=PromptConfig(4, 2, 0.1, 0.2, "hi"), attribution=AttributionConfig("ig", 3, 7, False),
        search=SearchConfig(0.02, 1.0, "global", False, 0.5, 0.1),
        recovery=RecoveryConfig(1, 0.01, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configs_from_flat(given, {}) == dict(
            prompt=PromptConfig(), attribution=AttributionConfig(), search=SearchConfig(),
            recovery=RecoveryConfig())
    model = tiny_bert()
    data = TaskData(TEXTS, LABELS)
    with pytest.raises(TypeError, match=r"epochs= and prompt="):
        localize(model, None, data, epochs=2, prompt=PromptConfig(), progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        localize(model, None, data, epoch=2, progress=False)
    with pytest.raises(TypeError, match="takes a SearchConfig"):
        localize(model, None, data, search=RecoveryConfig(), progress=False)
    with pytest.warns(DeprecationWarning, match="recover_epochs=") as warned, \
            pytest.raises(ValueError, match="--recover-epochs"):
        localize(model, None, data, recover_epochs=-1, progress=False)
    # (pointing at the caller: Python shows a DeprecationWarning by default only there)
    assert [w.filename for w in warned] == [__file__]


@pytest.mark.parametrize("method", ["grad", "fisher"])
def test_a_causal_experts_scores_do_not_depend_on_its_batches_padding(tokenizer, one_thread,
                                                                      method):
    """The token mask attribution averages over follows the prompted inputs' layout (padding
    first, then the prompt and the text): texts of several lengths scored in one batch give
    what they give one at a time."""
    model = tiny_llama()
    ids = label_token_ids(tokenizer, [" negative", " positive"])
    expert = Expert(None, torch.randn(3, 32), "causal_lm", ["negative", "positive"],
                    label_words=[" negative", " positive"], label_token_ids=ids,
                    sizes=model_sizes(model))
    data = TaskData(["good", "a long and rather dull film about nothing", "fine film"],
                    ["positive", "negative", "positive"])
    batched = attribute(model, tokenizer, expert, data, method, batch_size=3, progress=False)
    alone = attribute(model, tokenizer, expert, data, method, batch_size=1, progress=False)
    for got, want in zip(batched, alone):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
