"""The unplug-and-play example end to end on a tiny budget (a built-in task instead of the real
data, so nothing is downloaded): localize with recovery, serve, the table."""
import json
import os
import sys
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from conftest import stub_commit

import doe_kernels as dk
from doe_kernels.data import write_csv
from expert_utils import sentiment_task
from real_models import minilm_dir

import tasks  # python/, on the tests' path (pyproject.toml: pythonpath)
import unplug_and_play

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recovery_run_compares_with_the_equally_retuned_baseline(tmp_path, monkeypatch, capsys):
    minilm_dir()  # the example loads all-MiniLM-L6-v2: skips where its package is missing
    data = sentiment_task(300)
    stub_commit(monkeypatch, "at-start")  # the commit as the run begins

    def load_task(task, max_examples, seed=0):  # then the checkout moves on
        stub_commit(monkeypatch, "later")
        return data.split((0.6, 0.2, 0.2))

    monkeypatch.setattr(unplug_and_play, "load_task", load_task)
    monkeypatch.setattr(sys, "argv", [
        "unplug_and_play.py", "--tasks", "polarity", "--max-train", "180", "--validation", "40",
        "--test", "40", "--epochs", "4", "--recover-epochs", "1", "--recover-examples", "32",
        "--max-rate", "0.6", "--resolution", "0.2", "--attribution-examples", "32",
        "--repeats", "1", "--out", str(tmp_path)])
    unplug_and_play.main()
    printed = capsys.readouterr().out
    assert "within the tolerance (1 points) on the test sets" in printed
    with open(tmp_path / "minilm" / "results.json") as f:
        saved = json.load(f)
    row = saved["rows"][0]
    assert saved["meta"]["commit"] == "at-start" and "load_start" in saved["meta"]
    expert = dk.Expert.load(tmp_path / "minilm" / "polarity.safetensors")
    assert expert.figures["recover_epochs"] == 1 and expert.figures["recover_examples"] == 32
    assert expert.dense_prompt is not None
    assert row["pruning_rate"] == expert.figures["pruning_rate"] > 0
    # the table's baseline is the unpruned prompt given the same recovery epoch, the expert is
    # the pruned and retuned one
    model, tokenizer = unplug_and_play.load_model("minilm", 2)
    test = data.split((0.6, 0.2, 0.2))["test"].sample(40, seed=0)
    assert row["prompt_tuned_accuracy"] == pytest.approx(
        expert.dense().evaluate(model, tokenizer, test))
    assert row["expert_accuracy"] == pytest.approx(expert.evaluate(model, tokenizer, test))
    assert row["change"] == pytest.approx(row["expert_accuracy"] - row["prompt_tuned_accuracy"])
    assert "change (SE)" in printed
    assert torch.equal(expert.prompt, expert.dense_prompt) == (not expert.figures["retuned"])
    assert os.path.exists(tmp_path / "minilm" / "accuracy_vs_pruning.png")


def test_every_task_has_chat_label_words_for_smollm2():
    """Each real task names a label word per label, and SmolLM2's tokenizer tells them apart by
    their first token (the one scored); the words follow the task's label order."""
    from transformers import AutoTokenizer

    from doe_kernels.expert import label_token_ids
    from real_models import smollm2_dir
    from tasks import TASKS

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    assert set(unplug_and_play.CHAT_TASKS) == set(TASKS)
    for task, spec in TASKS.items():
        names = spec["label_names"]
        template, words = unplug_and_play.causal_lm_task(task, tokenizer, names)
        assert words == [unplug_and_play.CHAT_TASKS[task][1][name] for name in names]
        assert len(set(label_token_ids(tokenizer, words))) == len(names)
        assert template.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"no label word for \['sci.med'\]"):
        unplug_and_play.causal_lm_task("polarity", tokenizer, ["negative", "sci.med"])


def unique_task(tmp_path, monkeypatch):
    """A 180 / 60 / 60 task whose texts are unique, as the real tasks' are, cached as polarity's
    data in a temporary DOE_KERNELS_DATA, so that the example's own load_task (tasks.py: nested
    stratified caps) reads it; returns the full splits."""
    base = sentiment_task(300)
    data = dk.data.TaskData([f"{i}: {t}" for i, t in enumerate(base.texts)], base.labels,
                            base.label_names, "sentiment")
    write_csv(tasks.cache_path("polarity", str(tmp_path)), data.split((0.6, 0.2, 0.2)))
    monkeypatch.setenv("DOE_KERNELS_DATA", str(tmp_path))
    return tasks.load_task("polarity")


def split_args(**sizes):
    """The arguments `task_splits` reads: 80 training examples, seed 0, no top-up, validation
    from the validation split; `sizes` sets validation and test."""
    return Namespace(max_train=80, seed=0, top_up_validation=False, validation_from_test=False,
                     **sizes)


def test_top_up_fills_validation_with_unused_training_examples(tmp_path, monkeypatch):
    full = unique_task(tmp_path, monkeypatch)
    args = split_args(validation=90, test=30)
    plain = unplug_and_play.task_splits("polarity", args)
    args.top_up_validation = True
    topped = unplug_and_play.task_splits("polarity", args)
    assert len(plain["validation"]) == 60 and len(topped["validation"]) == 90
    assert topped["train"].texts == plain["train"].texts  # training is unchanged
    assert topped["test"].texts == plain["test"].texts and len(topped["test"]) == 30
    assert topped["validation"].texts[:60] == plain["validation"].texts
    extra = topped["validation"].texts[60:]
    full_train = full["train"]
    assert set(extra) <= set(full_train.texts) and not set(extra) & set(plain["train"].texts)
    assert len(set(extra)) == 30
    labels = dict(zip(full_train.texts, full_train.labels))
    assert topped["validation"].labels[60:] == [labels[t] for t in extra]
    args.validation, args.test = 50, 20  # already enough: nothing added
    smaller = unplug_and_play.task_splits("polarity", args)
    assert len(smaller["validation"]) == 50 and len(smaller["test"]) == 20
    assert smaller["train"].texts == plain["train"].texts  # nor do the other splits' sizes
    args.validation, args.test = 50, 55  # each held-out split depends on its own size alone
    more_test = unplug_and_play.task_splits("polarity", args)
    assert more_test["validation"].texts == smaller["validation"].texts
    args.validation, args.test = 45, 20
    assert unplug_and_play.task_splits("polarity", args)["test"].texts == smaller["test"].texts


def test_validation_from_test_draws_the_test_examples_not_tested(tmp_path, monkeypatch):
    """Validation is the test split's examples outside its largest draw that leaves room for
    them: the same for every --test, and tested by no draw of at most that many."""
    full_test = unique_task(tmp_path, monkeypatch)["test"]
    args = split_args(validation=20, test=10)
    plain = unplug_and_play.task_splits("polarity", args)
    args.validation_from_test = True
    shifted = unplug_and_play.task_splits("polarity", args)
    assert shifted["test"].texts == plain["test"].texts
    assert shifted["train"].texts == plain["train"].texts
    labels = dict(zip(full_test.texts, full_test.labels))
    chosen = shifted["validation"].texts
    assert len(set(chosen)) == 20 and set(chosen) <= set(full_test.texts)
    assert shifted["validation"].labels == [labels[t] for t in chosen]
    for test in (10, 25, 40):  # 60 test examples, 20 for validation: room for 40
        args.test = test
        splits = unplug_and_play.task_splits("polarity", args)
        assert splits["validation"].texts == chosen and len(splits["test"]) == test
        assert not set(chosen) & set(splits["test"].texts)
    args.test = 41
    with pytest.raises(SystemExit, match="keeps 20 test examples for validation; --test 41 is "
                                         "more than the 40 left to test on"):
        unplug_and_play.task_splits("polarity", args)


def test_each_split_is_drawn_with_the_seed(tmp_path, monkeypatch):
    """--seed chooses the examples, not only their order; seed 0 draws what the committed runs
    drew (load_task's own default seed, then that order)."""
    unique_task(tmp_path, monkeypatch)
    args = split_args(validation=30, test=40)
    first = unplug_and_play.task_splits("polarity", args)
    for split, size in (("train", 80), ("validation", 30), ("test", 40)):
        before = tasks.load_task("polarity", max_examples=size)[split].sample(size, seed=0)
        assert first[split].texts == before.texts
    args.seed = 1
    other = unplug_and_play.task_splits("polarity", args)
    for split in ("train", "test"):  # validation: all 60 either way
        assert set(other[split].texts) != set(first[split].texts)


def test_timed_accuracy_takes_the_median_time(monkeypatch):
    """The median of an even number of passes is the mean of the middle two."""
    data = dk.data.TaskData(["a", "b"], ["negative", "positive"], ["negative", "positive"])
    router = SimpleNamespace(run=lambda name, texts: ["negative"] * len(texts))
    clock = iter([0.0, 1.0, 10.0, 13.0])  # passes of 1 and 3 seconds
    monkeypatch.setattr(unplug_and_play, "time", SimpleNamespace(perf_counter=clock.__next__))
    accuracy, seconds, answers = unplug_and_play.timed_accuracy(router, "polarity", data, 2)
    assert (accuracy, seconds, answers) == (0.5, 2.0, ["negative", "negative"])


def test_a_run_refuses_a_prompt_trained_on_other_examples(tmp_path):
    """--start-from with --top-up-validation reuses a prompt trained on this run's training
    split (its validation is topped up with training examples the run does not train on): a
    prompt trained on others (another --max-train or --seed) is refused; one that does not
    record them is taken, and so is any without the top-up (validation from another split)."""
    from expert_utils import seq_cls_expert, tiny_bert

    data = sentiment_task(60)
    expert = seq_cls_expert(tiny_bert())
    (tmp_path / "minilm").mkdir()
    for trained_on, top_up, refused in ((data.digest(), True, False), (None, True, False),
                                        (data.subset(range(50)).digest(), True, True),
                                        (data.subset(range(50)).digest(), False, False)):
        args = Namespace(start_from=str(tmp_path), model="minilm", top_up_validation=top_up)
        expert.figures = {} if trained_on is None else {"prompt_trained_on": trained_on}
        expert.save(tmp_path / "minilm" / "polarity.safetensors")
        if refused:
            with pytest.raises(SystemExit, match="trained on other examples than this run's"):
                unplug_and_play.started_from(args, "polarity", data)
        else:
            assert unplug_and_play.started_from(args, "polarity", data).figures == expert.figures
