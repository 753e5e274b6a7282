"""The `doe-kernels` command line: localize an expert, evaluate it, serve experts, time them.

  doe-kernels localize --model PATH --task CSV --out EXPERT
  doe-kernels eval     --model PATH --expert EXPERT --task CSV [--split test]
  doe-kernels serve    --model PATH --expert NAME=EXPERT [--expert ...]   (JSON lines on stdin)
  doe-kernels bench    --model PATH [--expert EXPERT | --prune 0.65] [--seq 128] [--batch 1]

User mistakes (missing files, bad columns, a mismatched expert) print one line and exit 2.
"""
import argparse
import json
import os
import sys
import time

import torch

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the command's arguments or files: reported in one line, no traceback."""


def load_model(path: str, num_labels: int | None = None):
    """(model, tokenizer) from a HuggingFace folder: a causal LM if the checkpoint is one, else a
    sequence classifier (with a new head of `num_labels` when the checkpoint has none)."""
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    if not os.path.isdir(path):
        raise UserError(f"model folder not found: {path}")
    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    if causal:
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        labels = {} if num_labels is None else {"num_labels": num_labels}
        model = AutoModelForSequenceClassification.from_pretrained(path, **labels)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _task(path: str, split: str | None):
    from doe_kernels.data import read_csv

    splits = read_csv(path)
    if split is None:
        return splits
    if split not in splits:
        raise UserError(f"{path} has no {split!r} split; it has {sorted(splits)}")
    return splits[split]


def _load_expert(path: str):
    from doe_kernels.expert import Expert

    if not os.path.isfile(path):
        raise UserError(f"expert file not found: {path}")
    return Expert.load(path)


def cmd_localize(args) -> None:
    from doe_kernels.localize import localize

    splits = _task(args.task, None)
    train = splits.get("train", splits.get("all"))
    if train is None:
        raise UserError(f"{args.task} has no 'train' split (or no split column)")
    if args.max_train:
        train = train.sample(args.max_train, seed=args.seed)
    model, tokenizer = load_model(args.model, num_labels=len(train.label_names))
    template = _template(args, model, tokenizer)
    expert = localize(model, tokenizer, train, splits.get("validation"),
                      label_words=_label_words(args, train.label_names),
                      template=template, max_length=args.max_length,
                      epochs=args.epochs, lr=args.lr, scope=args.scope,
                      tolerance=args.tolerance, confidence=args.confidence,
                      prune_heads=not args.keep_heads, recover_epochs=args.recover_epochs,
                      recover_lr=args.recover_lr, prompt_init=args.prompt_init,
                      backend=args.backend, seed=args.seed)
    expert.name = args.name or os.path.splitext(os.path.basename(args.task))[0]
    expert.save(args.out)
    print(json.dumps({"expert": args.out, **expert.figures}))


def _template(args, model, tokenizer) -> str | None:
    """The causal-LM template that --template or --instruction asks for (None: the default)."""
    from doe_kernels.expert import CAUSAL_LM, chat_template, check_template, detect_task_type

    if args.template is None and args.instruction is None:
        return None
    if args.template is not None and args.instruction is not None:
        raise UserError("give --template or --instruction, not both")
    if detect_task_type(model) != CAUSAL_LM:
        raise UserError("--template and --instruction are for causal LMs; a classifier reads the "
                        "text as it is")
    if args.instruction is not None:
        return chat_template(tokenizer, args.instruction)
    try:
        check_template(args.template)
    except ValueError as error:
        raise UserError(f"--template: {error}") from None
    return args.template.replace("\\n", "\n").replace("\\t", "\t")  # as typed in a shell


def _label_words(args, label_names) -> list | None:
    """--label-words; with --instruction the label names as they are (the assistant's answer
    starts without a space); else None (localize's default: " " + each label name)."""
    if args.label_words:
        return args.label_words.split(",")
    return list(label_names) if args.instruction is not None else None


def cmd_eval(args) -> None:
    expert = _load_expert(args.expert)
    data = _task(args.task, args.split)
    model, tokenizer = load_model(args.model, num_labels=len(expert.label_names))
    expert.check_fits(model)
    result = {"task": args.task, "split": args.split, "examples": len(data)}
    start = time.perf_counter()
    with expert.plugged(model, backend=args.backend):
        result["expert_accuracy"] = expert.evaluate(model, tokenizer, data)
    result["expert_seconds"] = time.perf_counter() - start
    if args.dense:
        start = time.perf_counter()
        dense = expert.dense()  # the unpruned baseline the expert was compared with
        with dense.plugged(model):
            result["dense_accuracy"] = dense.evaluate(model, tokenizer, data)
        result["dense_seconds"] = time.perf_counter() - start
    print(json.dumps(result))


def cmd_serve(args) -> None:
    from doe_kernels.serve import ExpertRouter

    experts = {}
    for spec in args.expert:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise UserError(f"--expert takes NAME=PATH, got {spec!r}")
        experts[name] = _load_expert(path)
    model, tokenizer = load_model(args.model, num_labels=len(next(iter(experts.values())).label_names))
    with ExpertRouter(model, tokenizer, backend=args.backend) as router:
        for name, expert in experts.items():
            router.add(name, expert)
        for line in sys.stdin:
            if not line.strip():
                continue
            print(json.dumps(_answer(router, line)), flush=True)


def _answer(router, line: str) -> dict:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as error:
        return {"error": f"not JSON: {error}"}
    if not isinstance(request, dict) or "task" not in request or "text" not in request:
        return {"error": 'a request is {"task": ..., "text": ...}'}
    try:
        label = router.run(request["task"], request["text"])
    except (KeyError, ValueError) as error:
        return {"error": str(error).strip('"'), "task": request["task"]}
    return {"task": request["task"], "label": label[0] if isinstance(request["text"], str) else label}


def cmd_bench(args) -> None:
    import doe_kernels as dk

    expert = _load_expert(args.expert) if args.expert else None
    model, tokenizer = load_model(args.model, None if expert is None else len(expert.label_names))
    mask = expert.mask if expert is not None else dk.ExpertMask.random(
        model, ffn_keep=1 - args.prune, heads_keep=1 - args.prune, seed=0)
    ids = torch.randint(100, min(tokenizer.vocab_size, 20000), (args.batch, args.seq))

    def median_seconds():
        times = []
        with torch.inference_mode():
            model(input_ids=ids)
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    dense = median_seconds()
    with dk.plugged(model, mask, backend=args.backend):
        patched = median_seconds()
    print(json.dumps({"batch": args.batch, "seq": args.seq, "device": "cpu",
                      "threads": torch.get_num_threads(),
                      "ffn_pruning_rate": mask.summary(model)["ffn_pruning_rate"],
                      "dense_ms": 1e3 * dense, "patched_ms": 1e3 * patched,
                      "speedup": dense / patched}))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="doe-kernels", description=__doc__.split("\n")[0])
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
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per example at most (long texts are cut)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-2, help="learning rate of the soft prompt")
    p.add_argument("--prompt-init", metavar="TEXT",
                   help="start the soft prompt as this text's token embeddings (default: random "
                        "vocabulary tokens)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=0.0,
                   help="standard errors of the validation change a pruned candidate must clear "
                        "beyond the tolerance (default 0)")
    p.add_argument("--keep-heads", action="store_true", help="prune FFN neurons only")
    p.add_argument("--recover-epochs", type=int, default=0,
                   help="re-tune the prompt (and head) on each pruned candidate for this many "
                        "epochs before it is measured, and the baseline as long on the unpruned "
                        "model (default 0: off)")
    p.add_argument("--recover-lr", type=float,
                   help="learning rate of the recovery's prompt tuning (default: --lr)")
    p.add_argument("--max-train", type=int, help="use at most this many training examples")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_localize)

    p = sub.add_parser("eval", help="accuracy of an expert on a task split")
    p.add_argument("--model", required=True)
    p.add_argument("--expert", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--dense", action="store_true", help="also the unpruned prompt-tuned model")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("serve", help='answer {"task","text"} JSON lines from stdin')
    p.add_argument("--model", required=True)
    p.add_argument("--expert", required=True, action="append", metavar="NAME=PATH")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("bench", help="forward latency of the model, dense against patched")
    p.add_argument("--model", required=True)
    p.add_argument("--expert", help="expert file (default: a random mask at --prune)")
    p.add_argument("--prune", type=float, default=0.65)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(run=cmd_bench)

    for name, command in sub.choices.items():
        command.add_argument("--backend", default="auto",
                             choices=("auto", "cpu", "cuda", "triton", "torch"))
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        # ValueError: bad task files (TaskDataError), experts or masks for another model
        print(f"doe-kernels {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
