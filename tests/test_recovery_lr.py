"""python/recovery_lr.py on a tiny budget (a built-in task, a random prompt on all-MiniLM-L6-v2):
a row per rate and learning rate, and the unpruned expert left as it is at zero divergence."""
import json

import pytest
import torch
from conftest import stub_commit

import doe_kernels as dk
from doe_kernels.expert import model_sizes
from doe_kernels.localize import paired_change
from expert_utils import sentiment_task
from real_models import minilm_dir

import recovery_lr  # python/, on the tests' path (pyproject.toml: pythonpath)

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved_expert(tmp_path, monkeypatch, train_examples=16):
    """A random expert saved where --start-from looks, and the splits the script will use."""
    minilm_dir()  # the script loads all-MiniLM-L6-v2: skips where its package is missing
    model, tokenizer = recovery_lr.up.load_model("minilm", 2)
    data = sentiment_task(48).split((0.5, 0.5, 0.0))
    gen = torch.Generator().manual_seed(0)
    head = {f"classifier.{k}": torch.randn(v.shape, generator=gen) * 0.1
            for k, v in model.classifier.state_dict().items()}
    prompt = torch.randn(3, model.config.hidden_size, generator=gen) * 0.1

    def expert_of(head):
        return dk.Expert(None, prompt, "seq_cls", ["negative", "positive"], head=head,
                         sizes=model_sizes(model), name="sentiment", max_length=32)

    # the head's bias centred on the validation examples' median margin: half the answers each
    # way, many near the boundary, so that a re-tuning changes answers (a random head answers
    # one label everywhere)
    logits = expert_of(head).predict_logits(model, tokenizer, data["validation"].texts)
    head["classifier.bias"][1] -= (logits[:, 1] - logits[:, 0]).median()
    (tmp_path / "minilm").mkdir()
    expert_of(head).save(tmp_path / "minilm" / "sentiment.safetensors")
    stub_commit(monkeypatch, "at-start")  # the commit as the run begins

    def task_splits(task, args):  # then the checkout moves on
        stub_commit(monkeypatch, "later")
        return dict(train=data["train"].sample(train_examples), validation=data["validation"])

    monkeypatch.setattr(recovery_lr.up, "task_splits", task_splits)
    monkeypatch.setattr(recovery_lr, "JUDGED", 8)
    return data


def _paired_from_counts(gained, lost, examples) -> dict:
    """paired_change of answers gaining `gained` and losing `lost` of `examples`: what a row's
    change and standard error must be, whichever examples changed."""
    same = examples - gained - lost
    return paired_change([True] * gained + [False] * lost + [True] * same,
                         [False] * gained + [True] * lost + [True] * same)


def _assert_paired_with_the_dense_expert(rows, examples):
    """Each row's change, standard error and counts are paired_change's against the dense
    expert's answers on all `examples` validation examples: one baseline for every row."""
    for row in rows:
        figures = {k: row[k] for k in ("change", "change_se", "gained", "lost")}
        assert figures == pytest.approx(_paired_from_counts(row["gained"], row["lost"], examples))
        assert row["validation"] - row["change"] == pytest.approx(rows[0]["validation"]
                                                                  - rows[0]["change"])


def test_a_row_per_rate_and_learning_rate(tmp_path, monkeypatch):
    """The rows in order, the unpruned expert at zero divergence, and each row's paired figures
    (the re-tuned unpruned expert changes answers both ways, so the standard error is tried)."""
    data = _saved_expert(tmp_path, monkeypatch)
    out = tmp_path / "recovery_lr.json"
    result = recovery_lr.main(["--start-from", str(tmp_path), "--tasks", "sentiment",
                               "--rates", "0", "0.5", "--lrs", "0.03", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["meta"]["commit"] == "at-start" and "load_start" in result["meta"]
    rows = result["rows"]
    assert [(row["rate"], row["lr"], row["epochs"]) for row in rows] == [
        (0, None, 0), (0, 0.03, 1), (0.5, None, 0), (0.5, 0.03, 1)]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6)  # the unpruned expert as it is
    assert all(row["kl"] >= -1e-9 and 0 <= row["validation"] <= 1 for row in rows)
    assert rows[2]["kl"] > rows[0]["kl"]  # pruning half the neurons moves the answers
    assert rows[1]["gained"] > 0 and rows[1]["lost"] > 0
    _assert_paired_with_the_dense_expert(rows, len(data["validation"]))


def test_a_row_per_schedule_and_seed_of_reconstructed_candidates(tmp_path, monkeypatch):
    """The rows in order, each schedule and each seed re-tuning to another prompt. (No re-tuning
    here changes an answer, so the paired figures are checked in the test above.)"""
    _saved_expert(tmp_path, monkeypatch, train_examples=24)  # two steps of 16 and 8
    result = recovery_lr.main(["--start-from", str(tmp_path), "--tasks", "sentiment",
                               "--rates", "0.5", "--lrs", "0.03", "--schedules", "constant",
                               "linear", "--seeds", "0", "1", "--reconstruct", "auto",
                               "--out", str(tmp_path / "out.json")])
    rows = result["rows"]
    assert [(row["lr"], row["schedule"], row["seed"]) for row in rows] == [
        (None, None, None), (0.03, "constant", 0), (0.03, "constant", 1), (0.03, "linear", 0),
        (0.03, "linear", 1)]
    assert all(row["reconstruction"] is not None for row in rows)  # "auto" names its choice
    # the seed orders the 24 examples into the two steps: another prompt, other logits
    assert rows[1]["kl"] != rows[2]["kl"] and rows[3]["kl"] != rows[4]["kl"]
    # the second step runs at half the rate with the decay: another prompt, other answers
    assert rows[1]["kl"] != rows[3]["kl"] and rows[2]["kl"] != rows[4]["kl"]


def test_a_row_per_number_of_epochs_and_learning_rate_of_the_vectors(tmp_path, monkeypatch):
    _saved_expert(tmp_path, monkeypatch)
    result = recovery_lr.main(["--start-from", str(tmp_path), "--tasks", "sentiment",
                               "--rates", "0.5", "--lrs", "0.03", "--epochs", "1", "2",
                               "--vectors-lrs", "0", "0.05", "--out", str(tmp_path / "out.json")])
    rows = result["rows"]
    assert [(row["lr"], row["epochs"], row["vectors_lr"]) for row in rows] == [
        (None, 0, None), (0.03, 1, None), (0.03, 1, 0.05), (0.03, 2, None), (0.03, 2, 0.05)]
    assert rows[1]["kl"] != rows[3]["kl"]  # a second epoch trains the prompt further
    assert rows[1]["kl"] != rows[2]["kl"]  # so does training the scales and bias deltas
