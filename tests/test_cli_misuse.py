"""The command line's promise under misuse: every user mistake prints one line on stderr (no
traceback, no usage block) and exits 2, checked before long work starts (before the model loads,
but for the mistakes only loading the model shows, and always before evaluating, training or
serving); `serve` answers every bad request with an error line and goes on answering."""
import importlib
import io
import json
import os
import subprocess
import sys

import pytest

from doe_kernels import backends, cli
from doe_kernels.data import write_csv
from doe_kernels.serve import ExpertRouter
from expert_utils import seq_cls_expert, sentiment_task, tiny_bert
from expert_utils import edit, write_expert_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict:
    """A tiny BERT folder, a sound expert and task for it, and broken versions of each."""
    root = tmp_path_factory.mktemp("misuse")
    paths = {"root": str(root)}
    model = root / "model"
    tiny_bert().save_pretrained(model)
    tokenizer.save_pretrained(model)
    paths["model"] = str(model)
    bad_config = root / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    (root / "empty_folder").mkdir()
    expert = root / "expert.safetensors"
    sound = seq_cls_expert(tiny_bert())
    sound.max_length = 48  # with its 3 virtual tokens within the model's 64 positions
    sound.save(expert)
    paths["expert"] = str(expert)
    seq_cls_expert(tiny_bert(layers=3)).save(root / "other_model.safetensors")
    seq_cls_expert(tiny_bert()).dense().save(root / "dense.safetensors")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "text.safetensors").write_text("text,label\nhello,a\n")
    (root / "corrupt.safetensors").write_bytes(expert.read_bytes()[:-64])
    write_expert_file(expert, root / "no_names.safetensors", header=edit({}, ["label_names"]))
    write_expert_file(expert, root / "str_names.safetensors",
                      header=edit({"label_names": "np"}))
    write_expert_file(expert, root / "zero_length.safetensors", header=edit({"max_length": 0}))
    task = root / "task.csv"
    write_csv(task, sentiment_task(40).split((0.6, 0.2, 0.2)))
    paths["task"] = str(task)
    (root / "short_row.csv").write_text("text,label,split\nfine film,positive,test\nno label\n")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9,positive\n".encode("latin-1"))
    (root / "columns.csv").write_text("sentence,category\nhello,a\n")
    (root / "huge_field.csv").write_text(f"text,label\n{'a' * 200_000},positive\n")
    (root / "extra_field.csv").write_text("text,label\nhello, world,positive\nbad,negative\n")
    (root / "twice.csv").write_text("text,label,text\na,positive,b\n")
    (root / "empty_label.csv").write_text("text,label\na,positive\nb, \n")
    (root / "one_label.csv").write_text("text,label\n" + "fine,positive\n" * 8)
    three = root / "three_labels"  # a classifier fine-tuned with another label count
    tiny_bert(num_labels=3).save_pretrained(three)
    tokenizer.save_pretrained(three)
    long = root / "long"  # 8 + 10 virtual tokens past its positions
    tiny_bert(positions=16).save_pretrained(long)
    tokenizer.save_pretrained(long)
    too_long = seq_cls_expert(tiny_bert(positions=16))
    too_long.max_length = 16
    too_long.save(root / "too_long.safetensors")
    return {**paths, **{p.stem.replace("-", "_"): str(p) for p in root.iterdir()}}


def _eval(expert="{expert}", task="{task}", model="{model}", *extra):
    return ["eval", "--model", model, "--expert", expert, "--task", task, *extra]


def _bench(*extra, model="{model}"):
    return ["bench", "--model", model, "--repeats", "1", "--seq", "8", *extra]


def _localize(*extra, out="{root}/e.safetensors", task="{task}"):
    return ["localize", "--model", "{model}", "--task", task, "--out", out, "--epochs", "1",
            *extra]


MISUSE = [
    # expert files
    pytest.param(_eval("{root}/none.safetensors"), "expert file not found", id="expert-missing"),
    pytest.param(_eval("{empty}"), "is not a readable safetensors file", id="expert-zero-bytes"),
    pytest.param(_eval("{corrupt}"), "is not a readable safetensors file", id="expert-corrupt"),
    pytest.param(_eval("{text}"), "is not a readable safetensors file", id="expert-text"),
    pytest.param(_eval("{root}"), "is a directory", id="expert-directory"),
    pytest.param(_eval("{no_names}"), "its header has no 'label_names' key",
                 id="expert-header-missing-key"),
    pytest.param(_eval("{str_names}"), "'label_names' is 'np', not a list",
                 id="expert-names-str"),
    pytest.param(_eval("{zero_length}"), "max_length must be an int >= 1",
                 id="expert-max-length-0"),
    pytest.param(_eval("{other_model}"), "num_layers", id="expert-other-model"),
    pytest.param(_bench("--expert", "{empty}"), "is not a readable safetensors file",
                 id="bench-expert-zero-bytes"),
    pytest.param(_bench("--expert", "{dense}"), "holds no mask", id="bench-expert-no-mask"),
    pytest.param(["serve", "--model", "{model}", "--expert", "s={corrupt}"],
                 "is not a readable safetensors file", id="serve-expert-corrupt"),
    pytest.param(["serve", "--model", "{model}", "--expert", "s"], "--expert takes NAME=PATH",
                 id="serve-expert-no-name"),
    pytest.param(["serve", "--model", "{model}", "--expert", "s={expert}", "--expert",
                  "s={expert}"], "--expert s= is given twice", id="serve-expert-twice"),
    # task files
    pytest.param(_eval(task="{root}/none.csv"), "task file not found", id="task-missing"),
    pytest.param(_eval(task="{columns}"), "missing column(s) ['text', 'label']",
                 id="task-columns"),
    pytest.param(_eval(task="{short_row}"), "data row 2 has no 'label' value", id="task-short-row"),
    pytest.param(_eval(task="{latin1}"), "is not utf-8 text", id="task-not-utf8"),
    pytest.param(_eval(task="{huge_field}"), "is not a readable CSV file: field larger",
                 id="task-field-over-the-csv-limit"),
    pytest.param(_eval("{expert}", "{task}", "{model}", "--split", "dev"), "has no 'dev' split",
                 id="task-split"),
    pytest.param(_eval(task="{extra_field}"), "data row 1 has more fields than the header",
                 id="task-extra-field"),
    pytest.param(_eval(task="{twice}"), "column(s) ['text'] appear more than once",
                 id="task-column-twice"),
    pytest.param(_eval(task="{empty_label}"), "data row 2 has an empty label",
                 id="task-empty-label"),
    pytest.param(_eval(task="/proc/self/mem"), "cannot read /proc/self/mem",
                 id="task-unreadable"),
    pytest.param(_localize(task="{one_label}"), "the training examples hold one label",
                 id="task-one-label"),
    # positions: the soft prompt and the longest texts must fit a BERT's position table
    pytest.param(_eval("{too_long}", model="{long}"), "need 19 positions, but the model has 16",
                 id="eval-texts-past-the-positions"),
    pytest.param(["serve", "--model", "{long}", "--expert", "s={too_long}"],
                 "need 19 positions, but the model has 16", id="serve-texts-past-the-positions"),
    pytest.param(_localize("--max-length", "160"),
                 "10 virtual tokens and texts of up to 160 tokens need 170 positions, but the "
                 "model has 160: use a max_length of 150 or less",
                 id="localize-texts-past-the-positions"),
    # model folders
    pytest.param(_eval(model="{root}/none"), "model folder not found", id="model-missing"),
    pytest.param(_eval(model="{bad_config}"), "is not a valid JSON file", id="model-config-json"),
    pytest.param(_bench(model="{empty_folder}"), "cannot load the model in",
                 id="model-empty-folder"),
    # backends
    pytest.param(_bench("--backend", "cuda"), "backend 'cuda' is not available",
                 id="backend-cuda"),
    pytest.param(_bench("--backend", "triton"), "backend 'triton' is not available",
                 id="backend-triton"),
    pytest.param(_eval("{expert}", "{task}", "{model}", "--backend", "metal"), "invalid choice",
                 id="backend-unknown"),
    # bench sizes
    pytest.param(_bench("--repeats", "0"), "--repeats: must be a whole number >= 1",
                 id="bench-repeats-0"),
    pytest.param(_bench("--seq", "0"), "--seq: must be a whole number >= 1", id="bench-seq-0"),
    pytest.param(_bench("--batch", "0"), "--batch: must be a whole number >= 1",
                 id="bench-batch-0"),
    pytest.param(_bench("--seq", "x"), "--seq: must be a whole number >= 1", id="bench-seq-x"),
    pytest.param(_bench("--seq", "161"), "--seq 161 is longer than the model's 160 positions",
                 id="bench-seq-too-long"),
    pytest.param(_bench("--prune", "1.5"), "--prune: must be a pruning rate in [0, 1)",
                 id="bench-prune-1.5"),
    pytest.param(_bench("--prune", "-0.1"), "--prune: must be a pruning rate in [0, 1)",
                 id="bench-prune-negative"),
    pytest.param(_bench("--expert", "{expert}", "--prune", "0.1"),
                 "give --expert or --prune, not both", id="bench-expert-and-prune"),
    pytest.param(_bench("--expert", "{root}/dense.safetensors", "--prune", "0.1"),
                 "give --expert or --prune, not both", id="bench-dense-expert-and-prune"),
    # localize outputs and settings, checked before any training
    pytest.param(_localize(out="{root}/no/such/folder/e.safetensors"), "does not exist",
                 id="localize-out-missing-folder"),
    pytest.param(_localize(out="{task}/e.safetensors"), "is not a folder",
                 id="localize-out-under-a-file"),
    pytest.param(_localize(out="{root}"), "is a directory", id="localize-out-directory"),
    pytest.param(_localize(out=""), "--out '' names no file", id="localize-out-empty"),
    pytest.param(_localize(out="{root}/new/"), "names no file", id="localize-out-trailing-slash"),
    pytest.param(_localize(out="{task}"), "is the task file", id="localize-out-is-the-task"),
    pytest.param(_localize("--label-words", "bad,good"), "--label-words is for causal LMs",
                 id="localize-label-words-for-a-classifier"),
    pytest.param(_localize("--max-length", "0"), "--max-length: must be a whole number >= 1",
                 id="localize-max-length-0"),
    pytest.param(_localize("--max-train", "0"), "--max-train: must be a whole number >= 1",
                 id="localize-max-train-0"),
    pytest.param(_localize("--seed", "99999999999999999999"),
                 "--seed: must be a whole number in [0, 2**63)", id="localize-seed-too-large"),
    pytest.param(_localize("--lr", "nan"), "PromptConfig.lr (--lr) must be a finite number > 0",
                 id="localize-lr-nan"),
    pytest.param(_localize("--recover-epochs", "-1"), "(--recover-epochs) must be a finite number",
                 id="localize-recover-epochs"),
    pytest.param(_localize("--tolerance", "abc"), "--tolerance: must be a number, got 'abc'",
                 id="localize-tolerance-not-a-number"),
    pytest.param(_localize("--template", "Review: {{text}}"), "are for causal LMs",
                 id="localize-template-for-a-classifier"),
    # the command line itself
    pytest.param(["bench"], "the following arguments are required: --model", id="no-model"),
    pytest.param([], "the following arguments are required: command", id="no-command"),
]


# the mistakes only the loaded model shows (its layers, its positions) or loading it finds (a
# missing or broken folder, read by load_model where nothing read it before); every other one is
# refused before cli.load_model runs
FOUND_BY_LOADING = {"expert-other-model", "eval-texts-past-the-positions",
                    "serve-texts-past-the-positions", "localize-texts-past-the-positions",
                    "model-missing", "model-config-json"}
assert FOUND_BY_LOADING <= {case.id for case in MISUSE}


def _forbid_long_work(monkeypatch, loading: bool) -> None:
    """Make the long work of each command fail the test if it starts: eval's timed pass, prompt
    tuning, reading requests; and loading the model unless `loading`."""
    localize = importlib.import_module("doe_kernels.localize")  # (the package, not its function)

    def refuse(what):
        def started(*args, **kwargs):
            raise AssertionError(f"{what} before the mistake was found")
        return started

    class Unread(io.StringIO):
        __iter__ = read = readline = refuse("serve read a request")

    if not loading:
        monkeypatch.setattr(cli, "load_model", refuse("the model was loaded"))
    monkeypatch.setattr(cli, "_timed_correct", refuse("eval's timed pass started"))
    monkeypatch.setattr(localize, "_tune_prompt", refuse("prompt tuning started"))
    monkeypatch.setattr("sys.stdin", Unread())


@pytest.mark.parametrize("argv, message", MISUSE)
def test_misuse_reads_as_one_line_and_exits_2(files, argv, message, capsys, monkeypatch,
                                              request):
    """`{name}` in argv: a path of the `files` fixture (`{{` a literal brace). Refused before the
    model loads, but for FOUND_BY_LOADING, and before any long work."""
    monkeypatch.setattr(backends.cuda, "available", lambda device_type, index=None: False)
    monkeypatch.setattr(backends.triton, "available", lambda device_type, index=None: False)
    _forbid_long_work(monkeypatch, loading=request.node.callspec.id in FOUND_BY_LOADING)
    capsys.readouterr()
    code = cli.main([arg.format(**files) for arg in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()  # less transformers' bar while loading a model
             if line.strip() and not line.startswith("Loading weights")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("doe-kernels") and message in lines[0], lines[0]


def test_localize_checks_its_output_before_any_work(files, monkeypatch, capsys):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cli, "load_model", load_model)
    out = os.path.join(files["root"], "missing", "e.safetensors")
    link = os.path.join(files["root"], "link.safetensors")  # (written through: to missing/)
    os.symlink(out, link)
    for given in (out, link):
        assert cli.main(["localize", "--model", files["model"], "--task", files["task"],
                         "--out", given]) == 2
        assert "does not exist" in capsys.readouterr().err


def test_bench_checks_its_sizes_before_loading_the_model(files, monkeypatch, capsys):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --seq was checked")

    monkeypatch.setattr(cli, "load_model", load_model)
    assert cli.main(_bench("--seq", "161", model=files["model"])) == 2
    assert "--seq 161 is longer than the model's 160 positions" in capsys.readouterr().err


def test_the_console_command_prints_one_line_and_exits_2():
    result = subprocess.run([sys.executable, "-m", "doe_kernels.cli", "bench", "--model", "m",
                             "--prune", "1.5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("doe-kernels bench: error: argument --prune: must be a "
                                     "pruning rate in [0, 1), got '1.5' (see doe-kernels bench "
                                     "--help)")


@pytest.mark.parametrize("value", ["1", "yes", "0", "off", "False", ""])
def test_debug_switch_prints_the_traceback(monkeypatch, capsys, value):
    monkeypatch.setenv("DOE_KERNELS_DEBUG", value)
    assert cli.main(["bench", "--model", "no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert ("Traceback" in err) == (value in ("1", "yes"))
    assert err.strip().splitlines()[-1].startswith("doe-kernels bench: error")


BAD_REQUESTS = [
    b'{"task": ["s"], "text": "a fine film"}',
    b'{"task": {"name": "s"}, "text": "a fine film"}',
    b'{"task": null, "text": "a fine film"}',
    b'{"task": "s", "text": "\\ud800"}',
    b'{"task": "s", "text": ["fine", "bad \\udfff end"]}',
    b'{"task": "s", "text": 5}',
    b'{"task": "s", "text": []}',
    b'{"task": "nope", "text": "x"}',
    b'{"task": "s"}',
    b'"just a string"',
    b'{"task": "s", "text": "caf\xe9"}',  # Latin-1, not UTF-8
    b"[" * 100000,
    b"not json",
]


def test_serve_answers_every_bad_request_and_goes_on(files, monkeypatch, capsys):
    good = b'{"task": "s", "text": "a fine film"}'
    # a first line with a byte-order mark (a Windows editor's UTF-8) is the same request
    lines = [b"\xef\xbb\xbf" + good, *BAD_REQUESTS, b"", good,
             b'{"task": "s", "text": ["one", "two"]}']
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\n".join(lines) + b"\n"),
                                                      encoding="utf-8"))
    capsys.readouterr()
    assert cli.main(["serve", "--model", files["model"], "--expert", f"s={files['expert']}"]) == 0
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert len(answers) == len(BAD_REQUESTS) + 3  # the blank line is skipped
    first, *bad, again, batch = answers
    assert set(first) == {"task", "label"} and again == first
    assert all(set(answer) <= {"error", "task"} and answer["error"] for answer in bad), bad
    assert '"task" must be a string' in bad[0]["error"]
    assert "is not valid Unicode text" in bad[3]["error"] and bad[3]["task"] == "s"
    assert "unknown task 'nope'" in bad[7]["error"]
    assert bad[10]["error"].startswith("not JSON") and "utf-8" in bad[10]["error"]
    assert len(batch["label"]) == 2
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("text_stream", [False, True])
def test_serve_answers_a_line_over_its_limit_unserved_and_goes_on(files, monkeypatch, capsys,
                                                                  text_stream):
    """A request line longer than --max-request-bytes is answered with an error without being
    tokenized (nor held whole); a line exactly at the limit is served; so are the lines after."""
    good = b'{"task": "s", "text": "a fine film"}'
    limit = len(good)
    too_long = b'{"task": "s", "text": "' + b"word " * 5000 + b'"}'
    # a CRLF line end is no part of the limit; the last line has no line end
    data = b"\n".join([good, too_long, good + b"\r", too_long]) + b"\n" + good
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(data.decode()) if text_stream else stdin)
    served = []
    original = ExpertRouter.run
    monkeypatch.setattr(ExpertRouter, "run",
                        lambda self, task, text: served.append(text) or original(self, task, text))
    capsys.readouterr()
    assert cli.main(["serve", "--model", files["model"], "--expert", f"s={files['expert']}",
                     "--max-request-bytes", str(limit)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(answer) for answer in answers] == [{"task", "label"}, {"error"}] * 2 + [
        {"task", "label"}]
    assert answers[1]["error"] == (f"the request line is longer than {limit} bytes "
                                   "(--max-request-bytes)")
    assert served == ["a fine film"] * 3


def test_a_model_saved_with_another_label_count_serves_the_experts_head(files, capsys):
    """Its saved head is replaced (eval plugs the expert's in whole) instead of failing to load."""
    assert cli.main(_eval(files["expert"], files["task"], files["three_labels"])) == 0, \
        capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["examples"] > 0


def test_serve_ends_quietly_when_its_reader_goes_away(files, monkeypatch, capsys):
    """`doe-kernels serve ... | head -1`: a closed stdout ends serving, not in a traceback."""
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdin", io.StringIO('{"task": "s", "text": "fine"}\n' * 3))
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["serve", "--model", files["model"], "--expert", f"s={files['expert']}"]) == 0
    assert "Traceback" not in capsys.readouterr().err


class _BrokenRouter:
    def run(self, name, batch):
        raise RuntimeError("a bug inside the router")


def test_serve_answers_an_internal_error_as_an_error_and_shows_it(capsys):
    answer = cli._answer(_BrokenRouter(), '{"task": "s", "text": "x"}')
    assert answer == {"error": "internal error: RuntimeError: a bug inside the router",
                      "task": "s"}
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug inside the router" in err


def test_eval_of_a_file_without_splits_takes_all_of_it(files, tmp_path, capsys):
    """`eval` asks for the test split by default; a task file without a split column is
    evaluated whole (split "all"); another split asked of it is refused."""
    from doe_kernels.data import read_csv

    whole = tmp_path / "whole.csv"
    write_csv(whole, {"all": read_csv(files["task"])["test"]})
    capsys.readouterr()
    assert cli.main(["eval", "--model", files["model"], "--expert", files["expert"], "--task",
                     str(whole)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "all" and result["examples"] == 8
    assert cli.main(["eval", "--model", files["model"], "--expert", files["expert"], "--task",
                     str(whole), "--split", "validation"]) == 2
    assert "has no 'validation' split; it has ['all']" in capsys.readouterr().err
