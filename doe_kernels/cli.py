"""The `doe-kernels` command line: localize an expert, evaluate it, serve experts, time them.

  doe-kernels localize --model PATH --task CSV --out EXPERT
  doe-kernels eval     --model PATH --expert EXPERT --task CSV [--split test]
  doe-kernels serve    --model PATH --expert NAME=EXPERT [--expert ...]   (JSON lines on stdin)
  doe-kernels bench    --model PATH [--expert EXPERT | --prune 0.65] [--seq 128] [--batch 1]

User mistakes (bad arguments, missing or unreadable files, bad columns, a mismatched expert, a
backend this machine lacks) print one line on stderr and exit 2; they are checked before any long
work starts (localize checks where it will write before it trains). `serve` answers a bad request
with an {"error": ...} line and goes on with the next one. DOE_KERNELS_DEBUG=1 prints the
traceback above that line (for a bug report).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
import typing

import torch

from doe_kernels.backends import BACKEND_NAMES, BackendUnavailableError, available_backends

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the command's arguments or files: reported in one line, no traceback."""


# What main reports as a user's mistake: ValueError covers bad task files (TaskDataError),
# unreadable expert files (FileFormatError) and experts or masks made for another model.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, BackendUnavailableError)


class _UsageError(UserError):
    """A command line argparse refuses; `prog` names the (sub)command."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (no usage block), exit code 2 through main."""

    def error(self, message):
        raise _UsageError(self.prog, f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _max_length(text: str) -> int:
    """A --max-length a tokenizer takes: a whole number in [1, MAX_LENGTH]."""
    from doe_kernels.expert import MAX_LENGTH

    value = _positive_int(text)
    if value > MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"must be a whole number in [1, {MAX_LENGTH}] (tokens "
                                         f"per example), got {text!r}")
    return value


def _seed(text: str) -> int:
    """A seed torch, random and numpy all take: a whole number in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, 2**63), got {text!r}")
    return value


def _number(text: str) -> float:
    """`text` as a float; NaN (which every range check below refuses) when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _float(text: str) -> float:
    """`text` as a float (a config checks its range); not a number: the error echoes it."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _prune_rate(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a pruning rate in [0, 1), got {text!r}")
    return value


def _backend(text: str) -> str:
    """A --backend present on this machine's CPU (the command line runs models on the CPU)."""
    if text not in BACKEND_NAMES or text == "auto":
        return text  # argparse's choices answer a name it does not know
    present = available_backends("cpu")
    if text not in present:
        raise argparse.ArgumentTypeError(
            f"backend {text!r} is not available here (the command line runs on the CPU); "
            f"available: {['auto', *present]}")
    return text


def model_config(path: str):
    """The HuggingFace config of the model folder `path` (UserError for a missing or broken
    one): what the commands check their options against before loading any weights."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise UserError(f"model folder not found: {path}")
    with _broken_folder(path):
        return AutoConfig.from_pretrained(path)


def is_causal(config) -> bool:
    """Whether a config's checkpoint is a causal LM (else it is loaded as a classifier)."""
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


@contextlib.contextmanager
def _broken_folder(path: str):
    """A broken model folder's error as a UserError naming the folder: transformers' OSError and
    ValueError, safetensors' SafetensorError (truncated weights), and what a config with a value
    of the wrong type ("hidden_size": "abc": huggingface_hub's StrictDataclassError) or a zero
    ("num_attention_heads": 0: ZeroDivisionError) raises. (Other errors keep their traceback:
    they may be bugs.)"""
    try:
        yield
    except (OSError, ValueError, ZeroDivisionError, *_loading_errors()) as error:
        reason = str(error).strip().split("\n\n")[0]
        if not isinstance(error, (OSError, ValueError)):  # ("division by zero" says little)
            reason = f"{type(error).__name__}: {reason}"
        raise UserError(f"cannot load the model in {path}: {reason}") from None


def _loading_errors() -> tuple:
    """safetensors' SafetensorError and huggingface_hub's StrictDataclassError (a config field
    of the wrong type), where this version has it."""
    from safetensors import SafetensorError

    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # (an older huggingface_hub: configs are not checked)
        return (SafetensorError,)
    return SafetensorError, StrictDataclassError


@contextlib.contextmanager
def _quiet_loading():
    """transformers' loading logs and progress bars off: its report of a missing classifier head
    (which the commands make) would fill stderr, where a misuse gets one line."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(path: str, num_labels: int | None = None, config=None, seed: int = 0):
    """(model, tokenizer) from a HuggingFace folder: a causal LM if the checkpoint is one, else a
    sequence classifier (with a new head of `num_labels` when the checkpoint has none, drawn
    with `seed`: localize trains from it, so the process's earlier random draws must not change
    it; torch's global random state is left as it was). `config`: its `model_config`, when the
    caller has read it already."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    from doe_kernels.caller_state import seeded

    config = model_config(path) if config is None else config
    with _broken_folder(path), _quiet_loading(), seeded(seed):
        if is_causal(config):
            model = AutoModelForCausalLM.from_pretrained(path)
        else:
            # a saved head of another label count is replaced (and only it: the other weights
            # must fit): localize trains its own, eval, serve and bench plug each expert's
            labels = {} if num_labels in (None, config.num_labels) else {
                "num_labels": num_labels, "ignore_mismatched_sizes": True}
            model = AutoModelForSequenceClassification.from_pretrained(path, **labels)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _task_split(path: str, split: str) -> tuple:
    """(split, TaskData) of one split of the task file ("test" asked of a file without a split
    column: all of it, "all")."""
    from doe_kernels.data import read_csv

    splits = read_csv(path)
    if split == "test" and set(splits) == {"all"}:
        split = "all"
    if split not in splits:
        raise UserError(f"{path} has no {split!r} split; it has {sorted(splits)}")
    return split, splits[split]


def _load_expert(path: str):
    """The Expert at `path`; an unreadable file raises FileFormatError (a ValueError)."""
    from doe_kernels.expert import Expert

    if not os.path.exists(path):
        raise UserError(f"expert file not found: {path}")
    return Expert.load(path)


def _check_output(path: str) -> None:
    """Refuse an output path that cannot be written, before the work that would fill it."""
    if not path or path.endswith((os.sep, "/")):
        raise UserError(f"--out {path!r} names no file; give a file name")
    folder = os.path.dirname(os.path.realpath(path))  # (a link is written through)
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UserError(f"--out {path}: {folder} {what}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--out {path} is not writable")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """localize's options, one group per config class (PromptConfig, ...), built from the
    classes' fields: flag, help and default from each field, the parsed value under the flat
    name (`args.recover_epochs`); `configs_from_args` builds the configs back."""
    from doe_kernels.localize.config import CONFIGS, flat_name

    for key, cls in CONFIGS.items():
        group = parser.add_argument_group(f"{cls.__name__} (localize {key}=)",
                                          " ".join(cls.__doc__.split()))
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            meta = field.metadata
            flags = (meta["flag"], *meta["aliases"])
            if hints[field.name] is bool:  # a flag that turns the default off (or on)
                group.add_argument(*flags, dest=flat_name(field), default=field.default,
                                   action="store_false" if field.default else "store_true",
                                   help=meta["help"])
                if meta["negations"]:  # flags that ask for the default explicitly
                    group.add_argument(*meta["negations"], dest=flat_name(field),
                                       action="store_true" if field.default else "store_false",
                                       help="the default: the opposite of " + meta["flag"])
                continue
            kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],)
                        if t is not type(None))
            parse = {float: _float}.get(kind, kind)  # the config checks the value when built
            shown = "" if field.default is None else f" (default: {field.default})"
            group.add_argument(*flags, dest=flat_name(field), type=parse, default=field.default,
                               choices=meta["choices"],
                               metavar=meta["metavar"] or {int: "N", float: "X"}.get(kind),
                               help=meta["help"] + shown)


def configs_from_args(args) -> dict:
    """{"prompt": PromptConfig, ...} from the options `add_config_options` added; a value a
    config refuses raises its ValueError (a user error)."""
    from doe_kernels.localize.config import CONFIGS, flat_name

    return {key: cls(**{field.name: getattr(args, flat_name(field))
                        for field in dataclasses.fields(cls)})
            for key, cls in CONFIGS.items()}


def cmd_localize(args) -> None:
    from doe_kernels.data import read_csv
    from doe_kernels.localize import localize

    configs = configs_from_args(args)
    _check_output(args.out)
    if os.path.realpath(args.out) == os.path.realpath(args.task):
        raise UserError(f"--out {args.out} is the task file; give the expert its own file")
    splits = read_csv(args.task)
    train = splits.get("train", splits.get("all"))
    if train is None:
        raise UserError(f"{args.task} has no 'train' split (or no split column)")
    train, validation = _training_examples(train, splits.get("validation"), args)
    if len(set(train.labels)) < 2:
        raise UserError(f"{args.task}: the training examples hold one label "
                        f"({train.labels[0]!r}); a task needs two or more")
    config = model_config(args.model)
    _check_causal_options(args, is_causal(config))
    model, tokenizer = load_model(args.model, num_labels=len(train.label_names), config=config,
                                  seed=args.seed)
    template = _template(args, tokenizer)
    expert = localize(model, tokenizer, train, validation,
                      label_words=_label_words(args, train.label_names), template=template,
                      max_length=args.max_length, backend=args.backend, seed=args.seed,
                      **configs)
    expert.name = args.name or os.path.splitext(os.path.basename(args.task))[0]
    expert.save(args.out)
    print(json.dumps({"expert": args.out, **expert.figures}))


def _training_examples(train, validation, args):
    """(train, validation) for localize: without a validation split, 20% of `train` is held out
    (localize's own split, made here so that --max-train counts training examples); --max-train
    then samples at most N training examples and a held-out validation set of at most N/4."""
    if validation is None:
        from doe_kernels.localize import split_validation

        train, validation = split_validation(train, args.seed)
        if args.max_train:
            validation = validation.sample(-(-args.max_train // 4), seed=args.seed)
    if args.max_train:
        train = train.sample(args.max_train, seed=args.seed)
    return train, validation


def _check_causal_options(args, causal: bool) -> None:
    """Refuse --template, --instruction and --label-words where they do not apply (before the
    model loads)."""
    from doe_kernels.expert import check_template

    if args.template is not None and args.instruction is not None:
        raise UserError("give --template or --instruction, not both")
    if not causal and (args.template is not None or args.instruction is not None):
        raise UserError("--template and --instruction are for causal LMs; a classifier reads the "
                        "text as it is")
    if not causal and args.label_words:
        raise UserError("--label-words is for causal LMs; a classifier answers with its head")
    if args.template is not None:
        try:
            check_template(args.template)
        except ValueError as error:
            raise UserError(f"--template: {error}") from None


def _template(args, tokenizer) -> str | None:
    """The causal-LM template that --template or --instruction asks for (None: the default;
    `_check_causal_options` has checked them)."""
    from doe_kernels.expert import chat_template

    if args.instruction is not None:
        return chat_template(tokenizer, _as_typed(args.instruction))
    if args.template is not None:
        return _as_typed(args.template)
    return None


def _as_typed(text: str) -> str:
    """`text` with the \\n and \\t a shell user types read as a new line and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _label_words(args, label_names) -> list | None:
    """--label-words; with --instruction the label names as they are (the assistant's answer
    starts without a space); else None (localize's default: " " + each label name)."""
    if args.label_words:
        return args.label_words.split(",")
    return list(label_names) if args.instruction is not None else None


def cmd_eval(args) -> None:
    expert = _load_expert(args.expert)
    split, data = _task_split(args.task, args.split)
    model, tokenizer = load_model(args.model, num_labels=len(expert.label_names))
    expert.check_fits(model)
    dense = expert.dense() if args.dense else None  # the unpruned baseline the expert was
    # compared with: checked too, before any timing
    if dense is not None:
        try:
            dense.check_fits(model)
        except ValueError as error:
            raise UserError(f"--dense: the unpruned baseline in {args.expert} does not fit the "
                            f"model: {error}") from None
    result = {"task": args.task, "split": split, "examples": len(data)}
    correct, result["expert_seconds"] = _timed_correct(expert, model, tokenizer, data,
                                                       args.backend)
    result["expert_accuracy"] = float(correct.float().mean())
    if dense is not None:
        from doe_kernels.localize.search import paired_change

        dense_correct, result["dense_seconds"] = _timed_correct(dense, model, tokenizer, data)
        result["dense_accuracy"] = float(dense_correct.float().mean())
        # expert minus dense, with its paired standard error; gained / lost: examples it
        # answers right where the dense model did not, and the other way round
        result.update(paired_change(correct.tolist(), dense_correct.tolist()))
    print(json.dumps(result))


def _timed_correct(expert, model, tokenizer, data, backend: str = "auto"):
    """(which of `data` the expert answers right, seconds of that pass) with the expert plugged
    for it: a first batch, untimed, pays the one-off costs (the process's first forward pass,
    loading kernels), which would otherwise land on whichever model ran first. (Triton's
    autotuner still tunes each new shape the timed pass meets.)"""
    with expert.plugged(model, backend=backend):
        expert.correct(model, tokenizer, data.subset(range(min(32, len(data)))))
        start = time.perf_counter()
        correct = expert.correct(model, tokenizer, data)
        return correct, time.perf_counter() - start


def cmd_serve(args) -> None:
    from doe_kernels.serve import ExpertRouter

    experts = {}
    for spec in args.expert:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise UserError(f"--expert takes NAME=PATH, got {spec!r}")
        if name in experts:
            raise UserError(f"--expert {name}= is given twice")
        experts[name] = _load_expert(path)
    num_labels = len(next(iter(experts.values())).label_names)
    model, tokenizer = load_model(args.model, num_labels=num_labels)
    with ExpertRouter(model, tokenizer, backend=args.backend) as router:
        for name, expert in experts.items():
            router.add(name, expert)
        try:
            stream = getattr(sys.stdin, "buffer", sys.stdin)  # bytes: bad UTF-8 answered too
            for line in _request_lines(stream, args.max_request_bytes):
                answer = _answer(router, line) if line is not None else {"error": (
                    f"the request line is longer than {args.max_request_bytes} bytes "
                    "(--max-request-bytes)")}
                print(json.dumps(answer), flush=True)
        except BrokenPipeError:  # the reader went away (`... | head -1`): nothing to answer
            sys.stdout = open(os.devnull, "w")  # Python's flush at exit would fail again


def _request_lines(stream, limit: int):
    """The non-blank lines of `stream`, each read whole only up to `limit` bytes (characters,
    from a text stream) before its line end (\\n or \\r\\n): a longer line yields None, its rest
    read in pieces and dropped (so that one huge line neither fills the memory nor keeps the
    tokenizer busy for seconds)."""
    while line := stream.readline(limit + 2):
        newline, crlf = ("\n", "\r\n") if isinstance(line, str) else (b"\n", b"\r\n")
        ended = line.endswith(newline)
        body = line.removesuffix(crlf).removesuffix(newline) if ended else line
        if len(body) > limit:
            while not ended and (rest := stream.readline(limit)):
                ended = rest.endswith(newline)
            yield None
        elif line.strip():
            yield line


def _answer(router, line: str | bytes) -> dict:
    """The answer to one request line. Never raises: a bad request is answered {"error": ...};
    so is an unexpected error inside the router, whose traceback also goes to stderr."""
    try:
        request = json.loads(line.decode("utf-8-sig") if isinstance(line, bytes)
                             else line.removeprefix("\ufeff"))  # a byte-order mark is no JSON
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, nesting
        return {"error": f"not JSON: {error}"}
    if not isinstance(request, dict) or "task" not in request or "text" not in request:
        return {"error": 'a request is {"task": ..., "text": ...}'}
    task, text = request["task"], request["text"]
    if not isinstance(task, str):
        return {"error": f'"task" must be a string (a task name), got {json.dumps(task)[:80]}'}
    try:
        label = router.run(task, text)
    except (KeyError, ValueError) as error:
        return {"error": error.args[0] if error.args else str(error), "task": task}
    except Exception as error:  # a bug, not the request's fault: answered, and shown on stderr
        traceback.print_exc(file=sys.stderr)
        return {"error": f"internal error: {type(error).__name__}: {error}", "task": task}
    return {"task": task, "label": label[0] if isinstance(text, str) else label}


def cmd_bench(args) -> None:
    import doe_kernels as dk
    from doe_kernels.expert import position_limit

    if args.expert and args.prune is not None:
        raise UserError("give --expert or --prune, not both")
    expert = _load_expert(args.expert) if args.expert else None
    if expert is not None and expert.mask is None:
        raise UserError(f"{args.expert} holds no mask (an unpruned expert): nothing to compare")
    positions = getattr(model_config(args.model), "max_position_embeddings", None)
    if positions is not None and args.seq > positions:  # (before any weight is loaded)
        raise UserError(f"--seq {args.seq} is longer than the model's {positions} positions")
    model, tokenizer = load_model(args.model, None if expert is None else len(expert.label_names))
    limit = position_limit(model)  # (RoBERTa's models hold two positions fewer than the config)
    if limit is not None and args.seq > limit:
        raise UserError(f"--seq {args.seq} is longer than the model's {limit} positions")
    if expert is not None:
        expert.mask.validate(model)  # before the dense timing
    prune = 0.65 if args.prune is None else args.prune
    mask = expert.mask if expert is not None else dk.ExpertMask.random(
        model, ffn_keep=1 - prune, heads_keep=1 - prune, seed=0)
    vocab = min(tokenizer.vocab_size, model.get_input_embeddings().num_embeddings)
    ids = torch.randint(min(100, vocab - 1), min(vocab, 20000), (args.batch, args.seq))

    def median_seconds():
        times = []
        with torch.inference_mode():
            model(input_ids=ids)
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    dense = median_seconds()
    with dk.plugged(model, mask, backend=args.backend):
        patched = median_seconds()
    rates = mask.summary(model)
    print(json.dumps({"batch": args.batch, "seq": args.seq, "device": "cpu",
                      "threads": torch.get_num_threads(),
                      "ffn_pruning_rate": rates["ffn_pruning_rate"],
                      "head_pruning_rate": rates["head_pruning_rate"],
                      "dense_ms": 1e3 * dense, "patched_ms": 1e3 * patched,
                      "speedup": dense / patched}))


def _load_mask(path: str):
    """The mask of the expert file at `path`, or the mask file at `path`."""
    from doe_kernels.files import FileFormatError
    from doe_kernels.mask import ExpertMask

    if not os.path.exists(path):
        raise UserError(f"file not found: {path}")
    try:
        return _load_expert(path)
    except FileFormatError as expert_error:
        try:
            return ExpertMask.load(path)
        except (FileFormatError, ValueError):
            raise expert_error from None


def cmd_vllm(args) -> None:
    """Plug, unplug or show the expert of a running `vllm serve`, or add and remove the experts
    it holds for mixed-task requests (doe_kernels.vllm.http)."""
    from doe_kernels.vllm import http

    try:
        if args.command == "vllm-plug":
            http.plug(args.url, _load_mask(args.expert))
        elif args.command == "vllm-unplug":
            http.unplug(args.url)
        elif args.command == "vllm-add":
            http.add(args.url, args.name, _load_mask(args.expert))
        elif args.command == "vllm-remove":
            http.remove(args.url, args.name)
        if args.command in ("vllm-add", "vllm-remove"):
            print(json.dumps(dict(experts=http.experts(args.url))))
        else:
            print(json.dumps(http.status(args.url)))
    except KeyError as error:  # removing a name the server does not hold
        raise UserError(error.args[0]) from error
    except RuntimeError as error:  # the server cannot take the call: one line, not a traceback
        raise UserError(str(error)) from error


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="doe-kernels", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("localize", help="find a task's expert and save it")
    p.add_argument("--model", required=True, help="HuggingFace model folder")
    p.add_argument("--task", required=True, help="CSV with text,label[,split] columns")
    p.add_argument("--out", required=True, help="expert file to write (.safetensors)")
    p.add_argument("--name", help="task name stored in the expert (default: the CSV's name)")
    p.add_argument("--label-words", help="causal LMs: comma-separated words, one per label")
    p.add_argument("--instruction", help="causal LMs: ask in the model's chat format with this "
                                         "instruction (label words then take no leading space)")
    p.add_argument("--template", help="causal LMs: a prompt around the text, e.g. "
                                      "'Review: {text}\\nSentiment:'")
    p.add_argument("--max-length", type=_max_length, default=128,
                   help="tokens per example at most (long texts are cut)")
    p.add_argument("--max-train", type=_positive_int,
                   help="use at most this many training examples (without a validation "
                        "split, also at most N/4 of the held-out 20%% for validation)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the validation split, the samples drawn and the training")
    add_config_options(p)
    p.set_defaults(run=cmd_localize)

    p = sub.add_parser("eval", help="accuracy of an expert on a task split")
    p.add_argument("--model", required=True, help="HuggingFace model folder")
    p.add_argument("--expert", required=True, help="expert file (.safetensors)")
    p.add_argument("--task", required=True, help="CSV with text,label[,split] columns")
    p.add_argument("--split", default="test", help="the split to evaluate on (default: test; a "
                   "file without a split column: all of it)")
    p.add_argument("--dense", action="store_true", help="also the unpruned prompt-tuned "
                   "model, and the change from it with its paired standard error")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("serve", help='answer {"task","text"} JSON lines from stdin')
    p.add_argument("--model", required=True, help="HuggingFace model folder")
    p.add_argument("--expert", required=True, action="append", metavar="NAME=PATH",
                   help="a task's name and expert file; repeat for each task")
    p.add_argument("--max-request-bytes", type=_positive_int, default=2 ** 20,
                   help="a longer request line is answered with an error and skipped (default: "
                   "1 MiB; a text is cut to the model's positions anyway)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("bench", help="forward latency of the model, dense against patched")
    p.add_argument("--model", required=True, help="HuggingFace model folder")
    p.add_argument("--expert", help="expert file (default: a random mask at --prune)")
    p.add_argument("--prune", type=_prune_rate, default=None,
                   help="pruning rate of the random mask's FFN neurons and attention heads, "
                   "in [0, 1) (default: 0.65)")
    p.add_argument("--seq", type=_positive_int, default=128,
                   help="tokens per sequence (default: 128)")
    p.add_argument("--batch", type=_positive_int, default=1,
                   help="sequences per forward pass (default: 1)")
    p.add_argument("--repeats", type=_positive_int, default=20,
                   help="timed passes of each model; the median is reported (default: 20)")
    p.set_defaults(run=cmd_bench)

    for name, command in sub.choices.items():
        command.add_argument("--backend", default="auto", type=_backend, choices=BACKEND_NAMES,
                             help="the kernels' backend (default: auto)")

    url = dict(required=True, help="the server, e.g. http://localhost:8000 (started with "
               "VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
               "doe_kernels.vllm.WorkerExtension; on a GPU without CUDA graphs)")
    p = sub.add_parser("vllm-plug", help="plug (or swap) an expert into a running vllm serve")
    p.add_argument("--url", **url)
    p.add_argument("expert", help="expert or mask file (.safetensors)")
    p.set_defaults(run=cmd_vllm)
    p = sub.add_parser("vllm-unplug", help="give a running vllm serve its dense model back")
    p.add_argument("--url", **url)
    p.set_defaults(run=cmd_vllm)
    p = sub.add_parser("vllm-status", help="the expert a running vllm serve has plugged")
    p.add_argument("--url", **url)
    p.set_defaults(run=cmd_vllm)
    p = sub.add_parser("vllm-add", help="hold an expert under a name in a running vllm serve, "
                       "for the requests that name it (the server also runs --middleware "
                       "doe_kernels.vllm.gate.ExpertGate)")
    p.add_argument("--url", **url)
    p.add_argument("--name", required=True, help="the name requests give in their vllm_xargs "
                   '({"doe_expert": NAME})')
    p.add_argument("expert", help="expert or mask file (.safetensors)")
    p.set_defaults(run=cmd_vllm)
    p = sub.add_parser("vllm-remove", help="stop holding the expert of a name")
    p.add_argument("--url", **url)
    p.add_argument("--name", required=True)
    p.set_defaults(run=cmd_vllm)
    return top


def _debugging() -> bool:
    """DOE_KERNELS_DEBUG set to anything but empty, 0, false, no or off."""
    value = os.environ.get("DOE_KERNELS_DEBUG", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def main(argv=None) -> int:
    """Run one command; a user's mistake prints one line on stderr and returns 2."""
    command = "doe-kernels"
    try:
        args = parser().parse_args(argv)
        command = f"doe-kernels {args.command}"
        args.run(args)
    except USER_ERRORS as error:
        command = getattr(error, "prog", command)
        if _debugging():  # the whole traceback, for a bug report
            traceback.print_exc()
        print(f"{command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
