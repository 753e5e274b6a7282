"""The doe-kernels command line: localize, eval, serve and bench end to end, and plain errors."""
import io
import json
import re
import sys

import pytest
import torch

import doe_kernels as dk
from doe_kernels import cli
from doe_kernels.data import read_csv, write_csv
from expert_utils import sentiment_task
from real_models import minilm_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_and_expert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    task = folder / "sentiment.csv"
    write_csv(task, sentiment_task(240).split((0.6, 0.2, 0.2)))
    expert = folder / "sentiment.safetensors"
    code = cli.main(["localize", "--model", minilm_dir(), "--task", str(task), "--out",
                     str(expert), "--epochs", "3"])
    assert code == 0
    return task, expert


def test_localize_then_eval(task_and_expert, capsys):
    task, expert = task_and_expert
    capsys.readouterr()
    assert cli.main(["eval", "--model", minilm_dir(), "--expert", str(expert), "--task",
                     str(task), "--dense"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 48
    assert result["expert_accuracy"] >= 0.85 and result["dense_accuracy"] >= 0.85
    # the paired change: expert minus dense, from the examples whose answer changed
    assert result["change"] == pytest.approx(result["expert_accuracy"] - result["dense_accuracy"])
    assert result["change"] == pytest.approx((result["gained"] - result["lost"]) / 48)
    assert result["change_se"] >= 0 and (result["change_se"] > 0) == (
        result["gained"] + result["lost"] > 0)
    # each accuracy is its own expert's on the test split: the expert's, the unpruned baseline's
    saved = dk.Expert.load(expert)
    model, tokenizer = cli.load_model(minilm_dir(), num_labels=len(saved.label_names))
    test = read_csv(task)["test"]
    assert result["expert_accuracy"] == saved.evaluate(model, tokenizer, test)
    assert result["dense_accuracy"] == saved.dense().evaluate(model, tokenizer, test)


def test_serve_answers_json_lines(task_and_expert, capsys, monkeypatch):
    _, expert = task_and_expert
    requests = [{"task": "s", "text": "a wonderful, moving film"},
                {"task": "s", "text": "dreadful and boring"},
                {"task": "other", "text": "x"},
                "not json"]
    lines = "\n".join(json.dumps(r) if isinstance(r, dict) else r for r in requests) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    capsys.readouterr()
    assert cli.main(["serve", "--model", minilm_dir(), "--expert", f"s={expert}"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert answers[0] == {"task": "s", "label": "positive"}
    assert answers[1] == {"task": "s", "label": "negative"}
    assert "unknown task 'other'" in answers[2]["error"]
    assert answers[3]["error"].startswith("not JSON")


def test_bench_reports_a_speedup(task_and_expert, capsys):
    _, expert = task_and_expert
    capsys.readouterr()
    assert cli.main(["bench", "--model", minilm_dir(), "--expert", str(expert), "--seq", "32",
                     "--repeats", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dense_ms"] > 0 and result["patched_ms"] > 0
    assert result["speedup"] == pytest.approx(result["dense_ms"] / result["patched_ms"])
    rates = dk.Expert.load(expert).mask.summary()
    assert (result["ffn_pruning_rate"], result["head_pruning_rate"]) == (
        rates["ffn_pruning_rate"], rates["head_pruning_rate"])


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "/nonexistent", "--expert", "x", "--task", "y"], "expert file not found"),
    (["localize", "--model", "/nonexistent", "--task", "/no/such.csv", "--out", "e"],
     "task file not found"),
    (["serve", "--model", "/nonexistent", "--expert", "nameonly"], "--expert takes NAME=PATH"),
])
def test_user_mistakes_are_one_line_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_columns_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,category\nhello,a\n")
    assert cli.main(["localize", "--model", minilm_dir(), "--task", str(bad), "--out", "e"]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) ['text', 'label']" in err and "Traceback" not in err


def test_bad_recovery_setting_is_a_one_line_error(task_and_expert, capsys):
    task, _ = task_and_expert
    capsys.readouterr()
    assert cli.main(["localize", "--model", minilm_dir(), "--task", str(task), "--out", "e",
                     "--recover-epochs", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--recover-epochs" in err and ">= 0" in err and "Traceback" not in err


@pytest.mark.parametrize("fractions, max_train, sizes", [
    ((1.0, 0.0, 0.0), None, (80, 20)),   # localize's own 80/20 split
    ((1.0, 0.0, 0.0), 30, (30, 8)),      # N training examples, at most N/4 held out
    ((1.0, 0.0, 0.0), 500, (80, 20)),    # more than there are
    ((0.6, 0.4, 0.0), 30, (30, 40)),     # a validation split of the task's own is kept whole
])
def test_max_train_counts_training_examples(tmp_path, monkeypatch, fractions, max_train, sizes):
    class Stop(Exception):
        pass

    seen = {}

    def localize(model, tokenizer, train, validation, **options):
        seen.update(train=train, validation=validation)
        raise Stop

    task = tmp_path / "t.csv"
    write_csv(task, {k: v for k, v in sentiment_task(100).split(fractions).items() if len(v)})
    monkeypatch.setattr(sys.modules["doe_kernels.localize"], "localize", localize)
    argv = ["localize", "--model", minilm_dir(), "--task", str(task), "--out", "e", "--seed", "3"]
    with pytest.raises(Stop):
        cli.main(argv + (["--max-train", str(max_train)] if max_train else []))
    train, validation = seen["train"], seen["validation"]
    assert (len(train), len(validation)) == sizes


@pytest.fixture(scope="module")
def causal_lm_folder(tmp_path_factory):
    """A tiny LLaMA with SmolLM2's tokenizer (which has a chat template), saved as a folder."""
    from transformers import AutoTokenizer

    from expert_utils import tiny_llama
    from real_models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    folder = tmp_path_factory.mktemp("causal")
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def test_localize_a_causal_lm_with_an_instruction(causal_lm_folder, tmp_path, capsys):
    import doe_kernels as dk

    folder, tokenizer = causal_lm_folder
    task = tmp_path / "sentiment.csv"
    write_csv(task, sentiment_task(80).split((0.6, 0.2, 0.2)))
    out = tmp_path / "e.safetensors"
    assert cli.main(["localize", "--model", str(folder), "--task", str(task), "--out", str(out),
                     "--instruction", "Negative or positive?", "--epochs", "1",
                     "--max-length", "64", "--lr", "0.01", "--recover-epochs", "1",
                     "--recover-lr", "0.005", "--confidence", "1"]) == 0
    expert = dk.Expert.load(out)
    assert expert.figures["prompt_lr"] == 0.01 and expert.figures["recover_lr"] == 0.005
    assert expert.figures["prompt_init"] == "negative positive"  # by default its label words
    assert expert.figures["confidence"] == 1.0
    assert 0.0 <= expert.figures["accuracy_dense_no_prompt"] <= 1.0  # the no-prompt check ran
    assert expert.template == dk.chat_template(tokenizer, "Negative or positive?")
    # with --instruction the label words default to the names, without a leading space
    assert expert.label_words == ["negative", "positive"] and expert.max_length == 64
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(folder), "--expert", str(out), "--task",
                     str(task)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 16


def test_new_lines_typed_in_an_instruction_are_new_lines(causal_lm_folder):
    """`\\n` typed in a shell: a new line in --instruction, as in --template."""
    import argparse

    import doe_kernels as dk

    _, tokenizer = causal_lm_folder
    asked = argparse.Namespace(instruction="Read it.\\nNegative or positive?", template=None)
    assert cli._template(asked, tokenizer) == dk.chat_template(
        tokenizer, "Read it.\nNegative or positive?")
    typed = argparse.Namespace(instruction=None, template="Review: {text}\\nMood:")
    assert cli._template(typed, tokenizer) == "Review: {text}\nMood:"


@pytest.mark.parametrize("extra, message", [
    (["--template", "Review: no field"], "must hold exactly one {text} field"),
    (["--template", "Review: {txt}"], "must hold exactly one {text} field"),
    (["--template", "Review: {text"], "is not a format string"),
    (["--template", "{text}", "--instruction", "Why?"], "not both"),
])
def test_bad_template_options_are_one_line_errors(causal_lm_folder, tmp_path, extra, message,
                                                  capsys):
    folder, _ = causal_lm_folder
    task = tmp_path / "sentiment.csv"
    write_csv(task, sentiment_task(40).split((0.6, 0.2, 0.2)))
    assert cli.main(["localize", "--model", str(folder), "--task", str(task), "--out",
                     str(tmp_path / "e"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_prompt_text_and_a_prompt_start_are_a_one_line_error(tmp_path, capsys):
    assert cli.main(["localize", "--model", "m", "--task", "t.csv", "--out", str(tmp_path / "e"),
                     "--prompt-init", "hi", "--prompt-start", "random"]) == 2
    err = capsys.readouterr().err
    assert "not both" in err and "Traceback" not in err


def test_instruction_for_a_classifier_is_a_one_line_error(task_and_expert, capsys):
    task, _ = task_and_expert
    capsys.readouterr()
    for option in (["--instruction", "Negative or positive?"], ["--label-words", "no,yes"],
                   ["--template", "{text} ->"]):
        assert cli.main(["localize", "--model", minilm_dir(), "--task", str(task), "--out", "e",
                         *option]) == 2
        err = capsys.readouterr().err
        assert "for causal LMs" in err and err.count("\n") == 1, err  # checked before loading


def test_localize_options_are_built_from_the_config_classes(capsys):
    """Every field of localize's configs is an option of `doe-kernels localize`, in a group per
    config, with the field's default; the parsed options build the configs back."""
    import dataclasses

    from doe_kernels.localize.config import CONFIGS

    base = ["localize", "--model", "m", "--task", "t.csv", "--out", "e"]
    defaults = cli.configs_from_args(cli.parser().parse_args(base))
    assert defaults == {key: cls() for key, cls in CONFIGS.items()}
    args = cli.parser().parse_args(base + [
        "--virtual-tokens", "4", "--epochs", "2", "--lr", "0.1", "--head-lr", "0.2",
        "--prompt-init", "hi", "--method", "ig", "--ig-steps", "3", "--attribution-examples", "7",
        "--signed-scores", "--tolerance", "0.02", "--confidence", "0.5", "--scope", "layer",
        "--prune-heads", "--max-rate", "0.5", "--resolution", "0.1", "--tp-shards", "2",
        "--recover-epochs", "2", "--recover-lr", "0.01", "--recover-examples", "9"])
    configs = cli.configs_from_args(args)
    assert configs["prompt"] == CONFIGS["prompt"](4, 2, 0.1, 0.2, "hi")
    assert configs["attribution"] == CONFIGS["attribution"]("ig", 3, 7, False)
    assert configs["search"] == CONFIGS["search"](0.02, 0.5, "layer", True, 0.5, 0.1, 2)
    assert configs["recovery"] == CONFIGS["recovery"](2, 0.01, 9)
    for negation in ("--ffn-only", "--keep-heads"):  # the default, asked for explicitly
        assert cli.parser().parse_args(base + [negation]).prune_heads is False
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["localize", "--help"])
    text = capsys.readouterr().out
    for key, cls in CONFIGS.items():
        assert f"{cls.__name__} (localize {key}=)" in text
        for field in dataclasses.fields(cls):  # the flag itself, not inside a longer one
            assert re.search(rf"(?<![\w-]){re.escape(field.metadata['flag'])}(?![\w-])", text)


def test_a_max_length_no_tokenizer_takes_is_a_one_line_error(capsys):
    """--max-length past 2**31 - 1 was taken and ended in the tokenizer's OverflowError (a
    traceback): refused as the option is read."""
    assert cli.main(["localize", "--model", "m", "--task", "t.csv", "--out", "e",
                     "--max-length", "99999999999999999999999"]) == 2
    err = capsys.readouterr().err
    assert "--max-length: must be a whole number in [1, 2147483647]" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    """A tiny BERT classifier with MiniLM's tokenizer, saved as a folder."""
    from transformers import AutoTokenizer

    from expert_utils import tiny_bert

    folder = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert().save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


def _truncated_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def _config_with(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


@pytest.mark.parametrize("breakage", [_truncated_weights, _config_with(hidden_size="abc"),
                                      _config_with(num_attention_heads=0)],
                         ids=["truncated-weights", "hidden-size-abc", "no-heads"])
def test_a_broken_model_folder_is_a_one_line_error(tiny_bert_folder, tmp_path, breakage,
                                                   capsys):
    """Truncated weights (SafetensorError), a config value of the wrong type or a zero the model
    divides by ended in a traceback: one line naming the folder, exit 2."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_folder, folder)
    breakage(folder)
    assert cli.main(["bench", "--model", str(folder), "--seq", "8", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert f"doe-kernels bench: error: cannot load the model in {folder}: " in err
    assert len(err.strip().splitlines()) == 1


def _eval_dense(folder, expert, tmp_path):
    task = tmp_path / "task.csv"
    write_csv(task, sentiment_task(40).split((0.6, 0.2, 0.2)))
    return cli.main(["eval", "--model", str(folder), "--expert", str(expert), "--task",
                     str(task), "--dense"])


def test_eval_dense_refuses_a_misshapen_dense_head_naming_the_file(tiny_bert_folder, tmp_path,
                                                                    capsys, monkeypatch):
    """An expert file whose dense head has another shape than its head was taken, and
    `eval --dense` failed only after timing the expert, naming neither the file nor the dense
    head: refused as the file is read, before any timing."""
    import torch

    from doe_kernels.expert import Expert
    from expert_utils import seq_cls_expert, tiny_bert, write_expert_file

    timed = []
    monkeypatch.setattr(cli, "_timed_correct", lambda *args, **kwargs: timed.append(args))
    expert = seq_cls_expert(tiny_bert())
    Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names, head=expert.head,
           sizes=expert.sizes, dense_head={k: v + 1 for k, v in expert.head.items()}).save(
        tmp_path / "e.safetensors")
    bad = write_expert_file(tmp_path / "e.safetensors", tmp_path / "bad.safetensors",
                            tensors=lambda t: {**t, "dense.head.classifier.weight":
                                               torch.zeros(7, 3)})
    assert _eval_dense(tiny_bert_folder, bad, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{bad}: dense_head parameter 'classifier.weight' has shape (7, 3)" in err
    assert timed == []


def test_eval_checks_the_dense_baseline_before_any_timing(tiny_bert_folder, tmp_path, capsys,
                                                          monkeypatch):
    """`eval --dense` checks that the unpruned baseline fits the model before it times the
    expert (it timed the whole evaluation, then failed on the baseline)."""
    from doe_kernels.expert import Expert
    from expert_utils import seq_cls_expert, tiny_bert

    timed = []
    monkeypatch.setattr(cli, "_timed_correct", lambda *args, **kwargs: timed.append(args))
    expert = seq_cls_expert(tiny_bert())
    expert.save(tmp_path / "e.safetensors")
    other = seq_cls_expert(tiny_bert(layers=3))  # a baseline made for another model
    monkeypatch.setattr(Expert, "dense", lambda self: other)
    assert _eval_dense(tiny_bert_folder, tmp_path / "e.safetensors", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"--dense: the unpruned baseline in {tmp_path / 'e.safetensors'} does not fit" in err
    assert "num_layers" in err and timed == []


def test_a_new_classifier_head_is_drawn_from_the_seed_alone():
    """localize trains from the classifier head `load_model` draws for a checkpoint without one:
    it comes from the seed, whatever the process drew before (a test run's order, a notebook's
    earlier cells changed `doe-kernels localize`'s expert), and the caller's random stream goes
    on untouched."""
    heads = []
    for earlier in (0, 1):
        torch.manual_seed(earlier)
        expected = torch.rand(3, generator=torch.Generator().manual_seed(earlier))
        model, _ = cli.load_model(minilm_dir(), num_labels=3, seed=7)
        assert torch.equal(torch.rand(3), expected)
        heads.append(model.classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    other, _ = cli.load_model(minilm_dir(), num_labels=3, seed=8)
    assert not torch.equal(other.classifier.weight, heads[0])


def test_bench_refuses_more_tokens_than_a_roberta_model_takes(tmp_path, capsys):
    """RoBERTa's position table holds two positions fewer than its config's
    max_position_embeddings (its padding offset): a --seq between the two was taken and failed
    in the model with a traceback; it is a one-line error."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, vocab_size=30522, max_position_embeddings=66,
                           pad_token_id=1, architectures=["RobertaForSequenceClassification"])
    RobertaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path)
    capsys.readouterr()  # (the save's progress bar)
    for seq, code in ((64, 0), (65, 2)):
        assert cli.main(["bench", "--model", str(tmp_path), "--seq", str(seq), "--repeats",
                         "1"]) == code
    err = capsys.readouterr().err
    assert err.strip() == ("doe-kernels bench: error: --seq 65 is longer than the model's 64 "
                           "positions")
