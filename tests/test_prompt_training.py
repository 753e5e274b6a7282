"""python/prompt_training.py on a tiny budget (a built-in task on all-MiniLM-L6-v2): a row per
task with each way's prompt scored (each precision, batching or learning rate), and the later
ways' paired changes from the first."""
import json

import pytest
import torch

import doe_kernels as dk

from expert_utils import sentiment_task
from real_models import minilm_dir

import prompt_training  # python/, on the tests' path (pyproject.toml: pythonpath)
import report  # benchmarks/, which prompt_training's imports put on the path

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--tasks", "sentiment", "--epochs", "1", "--virtual-tokens", "2", "--max-length", "32"]


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(*options, out=name): the script on a built-in task's 48 examples, TINY's budget; the
    commit is "at-start" as it begins, "later" once it reads the data."""
    minilm_dir()  # the script loads all-MiniLM-L6-v2: skips where its package is missing
    data = sentiment_task(48).split((0.5, 0.25, 0.25))
    commit = ["at-start"]
    monkeypatch.setattr(report, "_git_commit", lambda: commit[0])

    def task_splits(task, args):  # the checkout moves on during the run
        commit[0] = "later"
        return data

    monkeypatch.setattr(prompt_training.up, "task_splits", task_splits)
    scored = []  # (the split's name, the prompt scored, its accuracy), each Expert.correct call
    correct = dk.Expert.correct

    def recording(expert, model, tokenizer, split, *args, **kwargs):
        out = correct(expert, model, tokenizer, split, *args, **kwargs)
        name = next(name for name, held in data.items() if held is split)
        scored.append((name, expert.prompt.clone(), sum(out.tolist()) / len(out)))
        return out

    monkeypatch.setattr(dk.Expert, "correct", recording)

    def main(*options, out="result"):
        return prompt_training.main(TINY + list(options) + ["--out", str(tmp_path / out)])
    main.scored = scored
    return main


def assert_each_way_scored(run, row, ways) -> None:
    """Each way's accuracies are its own prompt's, on the validation then the test split, and
    the ways' prompts differ."""
    assert [name for name, _, _ in run.scored] == ["validation", "test"] * len(ways)
    prompts = [prompt for _, prompt, _ in run.scored]
    for i, way in enumerate(ways):
        (_, validation, first), (_, test, second) = run.scored[2 * i:2 * i + 2]
        assert torch.equal(validation, test)
        assert (row[way]["validation_accuracy"], row[way]["test_accuracy"]) == (first, second)
        assert all(not torch.equal(prompts[2 * i], prompts[2 * j]) for j in range(i))


def test_each_precision_trains_its_own_prompt(run, tmp_path):
    result = run(out="precision.json")
    out = tmp_path / "precision.json"
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["meta"]["commit"] == "at-start" and "load_start" in result["meta"]
    (row,) = result["rows"]
    for precision in ("float32", "bfloat16"):
        assert len(row[precision]["losses"]) == 1 and row[precision]["seconds"] > 0
        for split in ("validation", "test"):
            assert 0 <= row[precision][f"{split}_accuracy"] <= 1
    # bfloat16 rounding moves the training losses, so the two prompts differ
    assert row["float32"]["losses"] != row["bfloat16"]["losses"]
    assert_each_way_scored(run, row, ["float32", "bfloat16"])
    for split in ("validation", "test"):
        change = row[f"{split}_change"]
        assert change["change"] == pytest.approx(row["bfloat16"][f"{split}_accuracy"]
                                                 - row["float32"][f"{split}_accuracy"])


def test_each_batching_trains_its_own_prompt(run):
    result = run("--precisions", "float32", "--batchings", "shuffled", "by_length")
    (row,) = result["rows"]
    assert [row[way]["batching"] for way in ("shuffled", "by_length")] == ["shuffled",
                                                                           "by_length"]
    assert row["shuffled"]["precision"] == row["by_length"]["precision"] == "float32"
    assert row["shuffled"]["losses"] != row["by_length"]["losses"]  # other batches
    assert_each_way_scored(run, row, ["shuffled", "by_length"])
    assert row["validation_change"]["change"] == pytest.approx(
        row["by_length"]["validation_accuracy"] - row["shuffled"]["validation_accuracy"])


def test_each_learning_rate_trains_its_own_prompt(run):
    result = run("--precisions", "float32", "--lrs", "0.03", "0.003", "0.0003")
    (row,) = result["rows"]
    names = ["lr 0.03", "lr 0.003", "lr 0.0003"]
    assert [row[name]["lr"] for name in names] == [0.03, 0.003, 0.0003]
    assert row["lr 0.03"]["losses"] != row["lr 0.003"]["losses"]
    assert_each_way_scored(run, row, names)
    assert list(row["changes"]) == names[1:]  # each later way against the first
    for name in names[1:]:
        for split in ("validation", "test"):
            assert row["changes"][name][split]["change"] == pytest.approx(
                row[name][f"{split}_accuracy"] - row["lr 0.03"][f"{split}_accuracy"])


def test_prompt_init_starts_the_prompt_from_a_text(run):
    rows = [run("--precisions", "float32", *extra)["rows"][0]["float32"]
            for extra in ([], ["--prompt-init", "sentiment"])]
    assert rows[0]["losses"] != rows[1]["losses"]  # another starting prompt


def test_save_keeps_the_prompt_as_an_unpruned_expert(run, tmp_path):
    import doe_kernels as dk
    result = run("--precisions", "float32", "--prompt-init", "sentiment", "--save",
                 str(tmp_path / "prompts"))
    expert = dk.Expert.load(tmp_path / "prompts" / "minilm" / "sentiment.safetensors")
    assert expert.mask is None and expert.figures["prompt_init"] == "sentiment"
    assert expert.figures["prompt_losses"] == result["rows"][0]["float32"]["losses"]
    with pytest.raises(SystemExit):  # two ways: which prompt to keep is unclear
        run("--lrs", "0.03", "0.01", "--save", str(tmp_path / "two"))


def test_ways_are_named_by_what_varies():
    from argparse import Namespace

    def ways(precisions, batchings=("shuffled",), lrs=(0.03,)):
        return prompt_training.ways(Namespace(precisions=list(precisions),
                                              batchings=list(batchings), lrs=list(lrs)))

    assert ways(["float32", "bfloat16"]) == {"float32": ("float32", "shuffled", 0.03),
                                             "bfloat16": ("bfloat16", "shuffled", 0.03)}
    assert list(ways(["auto"], ["shuffled", "by_length"])) == ["shuffled", "by_length"]
    assert list(ways(["auto"], lrs=[0.03, 0.01])) == ["lr 0.03", "lr 0.01"]
    assert list(ways(["auto"])) == ["auto"]
    assert len(ways(["float32", "bfloat16"], ["shuffled", "by_length"])) == 4
