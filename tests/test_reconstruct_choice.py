"""localize's reconstruction step (doe_kernels.localize.reconstruct.Reconstructor): each mode fits
what it names, and "auto" keeps the variant whose answers stay closest to the unpruned model's on
training examples outside the calibration ones."""
import pytest
import torch

from doe_kernels.localize import _Run, _Task
from doe_kernels.localize.compensate import Calibration
from doe_kernels.localize.layerwise import layerwise_reconstruction
from doe_kernels.localize.reconstruct import AUTO_VARIANTS, FIDELITY_EXAMPLES, Reconstructor
from expert_utils import sentiment_task, seq_cls_expert, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(tokenizer, count=40):
    model = tiny_bert()
    train = sentiment_task(count)
    task = _Task.of(model, tokenizer, train, None, None, 32)
    run = _Run(model, tokenizer, task, 8, 0, False)
    tuned = seq_cls_expert(model, rate=0.0, virtual=3)
    candidate = task.expert(seq_cls_expert(model, rate=0.6).mask, tuned.prompt, tuned.head)
    return run, train, tuned, candidate


def kl(run, expert, texts, dense):
    log_probs = torch.log_softmax(expert.predict_logits(run.model, run.tokenizer, texts).double(),
                                  -1)
    return float((dense.exp() * (dense - log_probs)).sum(-1).mean())


def test_auto_keeps_the_variant_closest_to_the_unpruned_answers(tokenizer):
    run, train, tuned, candidate = setup(tokenizer)
    reconstructor = Reconstructor.collect(run, tuned, train, "auto", 16, 0.0)
    assert reconstructor.examples == 16
    shuffled = train.sample(len(train), seed=0)
    # what no fit has seen: of the 24 examples after the calibration's 16, the first half (the
    # second judges a re-tuning)
    judge = shuffled.texts[16:16 + 12]
    assert reconstructor.fidelity.texts == judge and 24 < FIDELITY_EXAMPLES
    dense = torch.log_softmax(tuned.predict_logits(run.model, run.tokenizer, judge).double(), -1)
    chosen = reconstructor(run, candidate)
    divergences = {}
    for name, fit, weight in AUTO_VARIANTS:
        batches = list(tuned.calibration_batches(run.model, run.tokenizer, shuffled.texts[:16],
                                                 2 * run.batch_size, weight))
        mask = (candidate.mask if fit == "none"
                else layerwise_reconstruction(run.model, candidate.mask, batches)
                if fit == "layerwise" else Calibration.collect(run.model, batches).fit(
                    candidate.mask))
        divergences[name] = kl(run, run.task.expert(mask, tuned.prompt, tuned.head), judge, dense)
        if name == chosen.figures["reconstruction"]:
            assert chosen.mask == mask
    assert chosen.figures["reconstruction"] == min(divergences, key=divergences.get)
    assert torch.equal(chosen.prompt, candidate.prompt)


@pytest.mark.parametrize("mode", ["scales", "layerwise", "bias"])
def test_each_mode_fits_what_it_names(tokenizer, mode):
    run, train, tuned, candidate = setup(tokenizer)
    reconstructor = Reconstructor.collect(run, tuned, train, mode, 16, 1.0)
    assert reconstructor.fidelity is None
    fitted = reconstructor(run, candidate)
    assert fitted.figures["reconstruction"] == mode
    batches = list(tuned.calibration_batches(run.model, run.tokenizer,
                                             train.sample(16, seed=0).texts, 16, 1.0))
    expected = (layerwise_reconstruction(run.model, candidate.mask, batches) if mode == "layerwise"
                else Calibration.collect(run.model, batches).fit(candidate.mask,
                                                                 scales=mode == "scales"))
    assert fitted.mask == expected


def test_the_unpruned_targets_are_computed_once_per_run(tokenizer, monkeypatch):
    """Every candidate's layer-wise fits, at both read-out weights, share one set of unpruned
    targets; a mask pruning a kind of projection the earlier ones did not gets them again. The
    fits use them: the unpruned model's layers run only where targets are built."""
    from doe_kernels.localize import reconstruct
    from test_layerwise import count_unpruned_layers

    run, train, tuned, _ = setup(tokenizer)
    unpruned_layers = count_unpruned_layers(monkeypatch)
    layers = run.model.config.num_hidden_layers
    built = []

    class Counted(reconstruct.UnprunedTargets):
        def __init__(self, model, batches, kinds):
            built.append(tuple(sorted(kinds)))
            super().__init__(model, batches, kinds)

    monkeypatch.setattr(reconstruct, "UnprunedTargets", Counted)
    reconstructor = Reconstructor.collect(run, tuned, train, "auto", 16, 0.0)
    ffn_only = [run.task.expert(seq_cls_expert(run.model, rate=rate).mask.replace(heads={}),
                                tuned.prompt, tuned.head) for rate in (0.3, 0.6)]
    for candidate in ffn_only:
        reconstructor(run, candidate)
    assert built == [("ffn",)] and len(unpruned_layers) == layers
    with_heads = run.task.expert(seq_cls_expert(run.model, rate=0.5).mask, tuned.prompt,
                                 tuned.head)
    reconstructor(run, with_heads)
    reconstructor(run, ffn_only[0])
    assert built == [("ffn",), ("ffn", "heads")] and len(unpruned_layers) == 2 * layers



def test_mean_kl_and_a_variant_whose_divergence_is_nan(tokenizer, monkeypatch):
    """mean_kl: a reference label of probability 0 adds nothing (not 0 x -inf = NaN); a variant
    whose divergence is NaN (its logits overflowed) is never chosen over a finite one, also when
    it comes first ("plain")."""
    from doe_kernels.localize import reconstruct

    reference = torch.tensor([[0.0, float("-inf")], [-0.5, -1.0]]).log_softmax(-1)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    expected = sum(float((p * (p.log() - q)).nansum()) for p, q in zip(
        reference.exp(), torch.log_softmax(logits.double(), -1))) / 2
    assert reconstruct.mean_kl(reference.double(), logits) == pytest.approx(expected)
    run, train, tuned, candidate = setup(tokenizer)
    reconstructor = Reconstructor.collect(run, tuned, train, "auto", 16, 0.0)
    names = [name for name, _, _ in AUTO_VARIANTS]
    said = iter([float("nan")] + [3.0 - i for i in range(1, len(names))])
    monkeypatch.setattr(type(reconstructor.fidelity), "divergence",
                        lambda self, run, e: next(said))
    chosen = reconstructor(run, candidate)
    assert chosen.figures["reconstruction"] == names[-1] != names[0]
