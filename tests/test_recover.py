"""Recovery tuning: the masked and the sliced (trainable) networks compute what the patched one
serves, and `retune` trains the prompt and head on it, leaving the model and the original expert
untouched."""
import pytest
import torch

import doe_kernels as dk
from doe_kernels.expert import Expert, label_token_ids, model_sizes
from doe_kernels.localize.recover import masked, retune, sliced
from expert_utils import seq_cls_expert, sentiment_task, tiny_bert, tiny_llama
from model_utils import snapshot, state_dict_equal
from test_scales import with_scales


def _llama_expert(model, tokenizer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    words = [" negative", " positive"]
    mask = dk.ExpertMask.random(model, ffn_keep=0.4, heads_keep=0.5, seed=seed)
    return Expert(mask, torch.randn(3, 32, generator=gen), "causal_lm", ["negative", "positive"],
                  label_words=words, label_token_ids=label_token_ids(tokenizer, words),
                  sizes=model_sizes(model))


def _experts(tokenizer):
    bert = tiny_bert()
    llama = tiny_llama()
    return [(bert, seq_cls_expert(bert, rate=0.6)), (llama, _llama_expert(llama, tokenizer))]


@pytest.mark.parametrize("reconstructed", [False, True], ids=["plain", "scales+bias"])
@pytest.mark.parametrize("family", [0, 1], ids=["bert", "llama"])
def test_masked_network_equals_the_patched_one(tokenizer, family, reconstructed, one_thread):
    model, expert = _experts(tokenizer)[family]
    if reconstructed:  # the mask's scales and bias deltas are emulated too
        gen = torch.Generator().manual_seed(0)
        hidden = model.config.hidden_size
        expert.mask = with_scales(model, expert.mask).with_bias(
            ffn_bias={0: 0.3 * torch.randn(hidden, generator=gen)},
            attn_bias={1: 0.3 * torch.randn(hidden, generator=gen)})
    texts = sentiment_task(12).texts
    ids, attention = expert.encode(tokenizer, texts)
    with torch.no_grad():
        with expert.plugged(model, backend="torch"):
            served = expert.logits(model, ids, attention)
        with expert.plugged(model, prune=False), masked(model, expert.mask):
            emulated = expert.logits(model, ids, attention)
        modules = dict(model.named_modules())
        with expert.plugged(model, prune=False), sliced(model, expert.mask):
            cheap = expert.logits(model, ids, attention)
            swapped = [name for name, m in model.named_modules() if modules.get(name) is not m]
        with expert.plugged(model, prune=False):
            dense = expert.logits(model, ids, attention)
    torch.testing.assert_close(emulated, served, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cheap, served, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(dense, served, atol=1e-3)  # the mask does change the answer
    assert swapped and all(name.endswith(("dense", "_proj")) for name in swapped)
    assert dict(model.named_modules()) == modules  # the model's own modules are back
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", [0, 1], ids=["bert", "llama"])
def test_sliced_keeps_empty_full_and_scaled_layers_apart(tokenizer, family, one_thread):
    """A layer keeping no neuron (shifted by its bias delta alone) and one keeping every neuron with
    scales and a bias delta: the sliced network equals the masked one, the sliced copies hold only
    the kept neurons, and nothing in the model moves."""
    model, expert = _experts(tokenizer)[family]
    spec = dk.models.spec_of(model)
    gen = torch.Generator().manual_seed(1)
    size, hidden = spec.intermediate_size, model.config.hidden_size
    ffn = dict(expert.mask.ffn)
    ffn[0] = torch.tensor([], dtype=torch.long)
    ffn.pop(1, None)
    mask = expert.mask.replace(ffn=ffn, ffn_scales={1: 0.5 + torch.rand(size, generator=gen)},
                               ffn_bias={1: torch.randn(hidden, generator=gen),
                                         0: torch.randn(hidden, generator=gen)})
    expert.mask = mask
    before = snapshot(model)
    ids, attention = expert.encode(tokenizer, sentiment_task(6).texts)
    with torch.no_grad():
        with expert.plugged(model, prune=False), masked(model, mask):
            emulated = expert.logits(model, ids, attention)
        with expert.plugged(model, prune=False), sliced(model, mask):
            cheap = expert.logits(model, ids, attention)
            widths = [m.weight.shape for name, m in
                      model.named_modules() if name.endswith(("intermediate.dense", "up_proj"))]
    torch.testing.assert_close(cheap, emulated, atol=1e-5, rtol=1e-4)
    assert widths[0][0] == 0 and widths[1][0] == size
    assert state_dict_equal(before, snapshot(model))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", [0, 1], ids=["bert", "llama"])
def test_retune_lowers_the_pruned_loss_and_touches_nothing_else(tokenizer, family, precision,
                                                                one_thread):
    model, expert = _experts(tokenizer)[family]
    before = snapshot(model)
    prompt, head = expert.prompt.clone(), {k: v.clone() for k, v in (expert.head or {}).items()}
    data = sentiment_task(48)

    def pruned_loss(x):
        logits = x.predict_logits(model, tokenizer, data.texts, backend="torch")
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(data.label_ids)))

    retuned, losses = retune(model, tokenizer, expert, data, epochs=4, batch_size=8,
                             progress=False, precision=precision)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert pruned_loss(retuned) < pruned_loss(expert)
    assert retuned.prompt.dtype == torch.float32
    assert retuned.mask is expert.mask and not torch.equal(retuned.prompt, expert.prompt)
    assert (retuned.head is None) == (expert.head is None)
    if expert.head is not None:
        assert retuned.head.keys() == expert.head.keys()
        assert any(not torch.equal(retuned.head[k], expert.head[k]) for k in head)
    # the original expert and the model are as they were
    assert torch.equal(expert.prompt, prompt)
    assert all(torch.equal(expert.head[k], v) for k, v in head.items())
    assert state_dict_equal(before, snapshot(model)) and not dk.is_patched(model)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", [0, 1], ids=["bert", "llama"])
def test_distilling_moves_the_pruned_expert_towards_its_teacher(tokenizer, family, one_thread):
    model, expert = _experts(tokenizer)[family]
    data = sentiment_task(48)
    # a teacher that prefers the second label (the tiny random models barely tell texts apart)
    teacher = torch.tensor([0.0, 2.0]) + 0.3 * torch.randn(len(data), 2,
                                                           generator=torch.Generator().manual_seed(0))
    target = torch.softmax(teacher, -1)

    def divergence(x):  # KL(teacher || x) on the pruned network
        logits = x.predict_logits(model, tokenizer, data.texts, backend="torch")
        return float(torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target,
                                                reduction="batchmean"))

    retuned, losses = retune(model, tokenizer, expert, data, epochs=4, batch_size=8,
                             progress=False, teacher=teacher)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert divergence(retuned) < divergence(expert)
    by_labels, _ = retune(model, tokenizer, expert, data, epochs=4, batch_size=8, progress=False)
    assert not torch.equal(by_labels.prompt, retuned.prompt)  # another objective
    before = snapshot(model)
    for bad in (teacher[:3], teacher[:, :1], teacher[:, 0]):
        with pytest.raises(ValueError, match=r"one logit per label for each example: \(48, 2\)"):
            retune(model, tokenizer, expert, data, progress=False, teacher=bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        retune(model, tokenizer, expert, data, progress=False, precision="float16")
    with pytest.raises(ValueError, match="batching must be one of"):
        retune(model, tokenizer, expert, data, progress=False, batching="sorted")
    assert state_dict_equal(before, snapshot(model))


@pytest.mark.parametrize("family", [0, 1], ids=["bert", "llama"])
def test_retune_trains_the_reconstruction_vectors_the_kernels_serve(tokenizer, family, one_thread):
    """With vectors_lr, the kept neurons' scales and the bias delta of every layer the mask
    prunes are trained with the prompt (from the mask's own, or 1 and 0): the new mask keeps the
    same neurons, the vectors move, the distillation loss falls further than with the prompt
    alone, and the patched kernels serve what the training network computed."""
    model, expert = _experts(tokenizer)[family]
    if family == 0:  # one layer starts from fitted vectors, the others from 1 and 0
        expert.mask = with_scales(model, expert.mask)
    before = snapshot(model)
    data = sentiment_task(48)
    teacher = torch.tensor([0.0, 2.0]) + 0.3 * torch.randn(
        len(data), 2, generator=torch.Generator().manual_seed(0))
    kwargs = dict(epochs=3, batch_size=8, progress=False, teacher=teacher)
    prompt_only, prompt_losses = retune(model, tokenizer, expert, data, **kwargs)
    trained, losses = retune(model, tokenizer, expert, data, vectors_lr=0.05, **kwargs)
    assert losses[-1] < prompt_losses[-1]
    mask = trained.mask
    assert prompt_only.mask is expert.mask and mask is not expert.mask
    assert {k: v.tolist() for k, v in mask.ffn.items()} == {
        k: v.tolist() for k, v in expert.mask.ffn.items()}
    assert set(mask.ffn_scales) == set(mask.ffn_bias) == set(expert.mask.ffn)
    for layer, kept in mask.ffn.items():
        start = expert.mask.ffn_scales.get(layer, torch.ones(kept.numel()))
        assert mask.ffn_scales[layer].shape == start.shape and mask.ffn_scales[layer].dtype == torch.float32
        assert kept.numel() == 0 or not torch.equal(mask.ffn_scales[layer], start)
        assert mask.ffn_bias[layer].abs().sum() > 0
    ids, attention = trained.encode(tokenizer, data.texts[:6])
    with torch.no_grad():
        with trained.plugged(model, backend="torch"):
            served = trained.logits(model, ids, attention)
        with trained.plugged(model, prune=False), masked(model, mask):
            emulated = trained.logits(model, ids, attention)
    torch.testing.assert_close(served, emulated, atol=1e-5, rtol=1e-4)
    assert state_dict_equal(before, snapshot(model)) and not dk.is_patched(model)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="vectors_lr must be > 0 or None"):
            retune(model, tokenizer, expert, data, vectors_lr=bad, **kwargs)
    assert state_dict_equal(before, snapshot(model))


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_retune_decays_the_learning_rates_linearly_or_holds_them(tokenizer, schedule, monkeypatch,
                                                                 one_thread):
    """Each optimizer step's learning rates: with "linear" lr x (1 - step / steps) for the prompt
    and head_lr x the same for the head, over all epochs; with "constant" lr and head_lr."""
    model, expert = _experts(tokenizer)[0]
    seen, step = [], torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    retune(model, tokenizer, expert, sentiment_task(44), epochs=2, lr=0.03, head_lr=0.01,
           batch_size=8, progress=False, schedule=schedule)
    steps = 2 * 6  # 44 examples in batches of 8: 6 steps an epoch
    factors = [1 - i / steps if schedule == "linear" else 1.0 for i in range(steps)]
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64),
                               torch.tensor([[0.03 * f, 0.01 * f] for f in factors],
                                            dtype=torch.float64))


def test_retune_refuses_an_unknown_schedule_before_training(tokenizer, one_thread):
    model, expert = _experts(tokenizer)[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"schedule must be one of \('constant', 'linear'\)"):
        retune(model, tokenizer, expert, sentiment_task(8), progress=False, schedule="cosine")
    assert state_dict_equal(before, snapshot(model)) and not dk.is_patched(model)


def test_retune_a_dense_expert_trains_on_the_whole_network(tokenizer, one_thread):
    """A dense expert (mask None) is re-tuned as the baseline of a search with recovery: the
    same training on the unpruned network, which equals re-tuning with a keep-all mask."""
    model, expert = _experts(tokenizer)[0]
    before = snapshot(model)
    dense = Expert(None, expert.prompt, "seq_cls", expert.label_names, head=expert.head,
                   sizes=expert.sizes)
    data = sentiment_task(32)
    retuned, losses = retune(model, tokenizer, dense, data, epochs=2, batch_size=8,
                             progress=False)
    assert retuned.mask is None and len(losses) == 2
    assert not torch.equal(retuned.prompt, expert.prompt)
    keep_all = Expert(dk.ExpertMask(), expert.prompt, "seq_cls", expert.label_names,
                      head=expert.head, sizes=expert.sizes)
    same, _ = retune(model, tokenizer, keep_all, data, epochs=2, batch_size=8, progress=False)
    torch.testing.assert_close(retuned.prompt, same.prompt)
    assert state_dict_equal(before, snapshot(model))


def test_masked_errors():
    other = tiny_bert(layers=3)
    before = snapshot(other)
    with pytest.raises(ValueError, match="layer"):
        with masked(other, dk.ExpertMask.random(tiny_bert(layers=1), 0.5)):
            pass
    assert state_dict_equal(before, snapshot(other))
    assert all(not m._forward_pre_hooks for m in other.modules())


def test_a_diverging_retune_raises_and_leaves_the_model_as_it_was(tokenizer, one_thread):
    """An lr so large the prompt overflows: a clear error (localize scores that candidate as
    failing and goes on), not an expert holding NaN."""
    from doe_kernels.localize.recover import TrainingDiverged

    model, expert = _experts(tokenizer)[0]
    before = snapshot(model)
    with pytest.raises(TrainingDiverged, match="lower recover_lr"):
        retune(model, tokenizer, expert, sentiment_task(16), epochs=2, lr=1e30, head_lr=1e30,
               batch_size=8, progress=False)
    assert state_dict_equal(before, snapshot(model)) and not dk.is_patched(model)
