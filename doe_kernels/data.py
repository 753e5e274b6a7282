"""Task data for the DoE pipeline: labelled texts from a CSV, Python lists or a `datasets` split.

A task is `text,label` pairs, optionally with a `split` column (train / validation / test). Labels
are kept as strings; `TaskData.label_names` fixes their order (the class index of each label).
"""
import csv
import hashlib
import json
import math
import numbers
import os
import random
import re
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")


class TaskDataError(ValueError):
    """A task file or dataset that cannot be read as labelled texts (a user mistake, not a bug)."""


def label_order(labels) -> list[str]:
    """The distinct labels in the order a task names them when not told: by number when every
    label is an integer (2 before 10), else as text."""
    names = set(labels)
    if all(re.fullmatch(r"[+-]?[0-9]+", name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def check_fractions(fractions) -> None:
    """ValueError unless `fractions` are at most three numbers >= 0 summing to at most 1 (a
    negative one would put examples in two splits)."""
    values = list(fractions)
    if not 1 <= len(values) <= len(SPLITS):
        raise ValueError(f"split fractions: one to three (train, validation, test), got {values}")
    for value in values:
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or value < 0):
            raise ValueError(f"split fractions must be numbers >= 0, got {values}")
    if sum(values) > 1 + 1e-9:
        raise ValueError(f"split fractions must sum to at most 1, got {values} "
                         f"(sum {sum(values):g})")


@dataclass
class TaskData:
    texts: list[str]
    labels: list[str]
    label_names: list[str] = field(default_factory=list)
    name: str = "task"

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise TaskDataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        odd = next((i for i, text in enumerate(self.texts) if not isinstance(text, str)), None)
        if odd is not None:
            raise TaskDataError(f"example {odd}'s text is a {type(self.texts[odd]).__name__}, "
                                f"not a str: {self.texts[odd]!r:.80}")
        if not isinstance(self.name, str):
            raise TaskDataError(f"name must be a str, got a {type(self.name).__name__}: "
                                f"{self.name!r:.80}")
        blank = next((i for i, label in enumerate(self.labels)
                      if label is None or not str(label).strip()), None)
        if blank is not None:
            raise TaskDataError(f"example {blank} has no label ({self.labels[blank]!r})")
        self.labels = [str(label) for label in self.labels]
        self.label_names = [str(name) for name in self.label_names]
        if len(set(self.label_names)) != len(self.label_names):
            raise TaskDataError(f"label_names must be distinct, got {self.label_names}")
        if not self.label_names:
            self.label_names = label_order(self.labels)
        unknown = set(self.labels) - set(self.label_names)
        if unknown:
            raise TaskDataError(f"labels {sorted(unknown)} are not in label_names {self.label_names}")

    def __len__(self):
        return len(self.texts)

    @property
    def label_ids(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in self.labels]

    def digest(self) -> str:
        """A fingerprint of the examples (text and label pairs, in any order): the same for the
        same examples, another for others (16 hex digits of a SHA-256)."""
        digest = hashlib.sha256()
        for pair in sorted(zip(self.texts, self.labels)):
            digest.update(json.dumps(pair).encode() + b"\n")
        return digest.hexdigest()[:16]

    def subset(self, indices) -> "TaskData":
        indices = list(indices)
        return TaskData([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                        list(self.label_names), self.name)

    def sample(self, count: int, seed: int = 0) -> "TaskData":
        """At most `count` examples, drawn at random (stratification is left to the caller)."""
        return self.subset(self.sample_indices(count, seed))

    def sample_indices(self, count: int, seed: int = 0) -> list[int]:
        """The indices `sample(count, seed)` draws, in the order drawn."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return order[:count]

    def split(self, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, "TaskData"]:
        """Random train/validation/test splits in the given proportions (each split ends where
        the fractions so far reach, rounded: fractions summing to 1 use every example; at most
        three fractions, each >= 0, summing to at most 1)."""
        fractions = list(fractions)  # (read once: a generator would be spent by the check)
        check_fractions(fractions)
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        start, reached, out = 0, 0.0, {}
        for name, fraction in zip(SPLITS, fractions):
            reached += fraction
            end = min(round(reached * len(order)), len(order))
            out[name] = self.subset(order[start:end])
            start = end
        return out

    @classmethod
    def from_lists(cls, texts, labels, label_names=None, name="task") -> "TaskData":
        return cls(list(texts), list(labels), list(label_names or []), name)

    @classmethod
    def from_dataset(cls, dataset, text_column="text", label_column="label", name="task"):
        """From a HuggingFace `datasets` split (class-label names are used when present)."""
        missing = {text_column, label_column} - set(dataset.column_names)
        if missing:
            raise TaskDataError(f"the dataset has no column(s) {sorted(missing)}; columns: "
                                f"{dataset.column_names}")
        labels = list(dataset[label_column])
        feature = dataset.features.get(label_column)
        names = list(getattr(feature, "names", None) or [])
        if names:
            bad = [label for label in labels if not isinstance(label, int)
                   or not 0 <= label < len(names)]
            if bad:  # -1: how GLUE marks its test sets' missing labels
                raise TaskDataError(f"{label_column} holds {bad[0]!r}, not a class of {names} "
                                    "(unlabelled rows?)")
            labels = [names[i] for i in labels]
        return cls(list(dataset[text_column]), labels, names, name)


def check_task_data(name: str, data) -> None:
    """TypeError unless `data` (the argument `name`) is a TaskData."""
    if not isinstance(data, TaskData):
        raise TypeError(f"{name} must be a doe_kernels.data.TaskData, got a "
                        f"{type(data).__name__} (read_csv gives a dict of them by split)")


def read_csv(path, text_column="text", label_column="label", split_column="split",
             encoding="utf-8-sig") -> dict[str, TaskData]:
    """Read a task CSV: {split: TaskData}, or {"all": TaskData} without a split column. A file
    that cannot be read, is not `encoding` text (UTF-8, with or without a byte-order mark) or not
    CSV, has a column twice, a row short of a column or with more fields than the header, or an
    empty label, raises TaskDataError."""
    if os.path.isdir(path):
        raise TaskDataError(f"{path} is a directory, not a task file")
    if not os.path.isfile(path):
        raise TaskDataError(f"task file not found: {path}")
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            twice = sorted({c for c in columns if columns.count(c) > 1})
            if twice:
                raise TaskDataError(f"{path}: column(s) {twice} appear more than once")
            missing = [c for c in (text_column, label_column) if c not in columns]
            if missing:
                raise TaskDataError(f"{path}: missing column(s) {missing}; found {columns} (a task "
                                    f"CSV needs '{text_column}' and '{label_column}', optionally "
                                    f"'{split_column}')")
            rows = list(reader)
    except UnicodeDecodeError as error:
        shown = "utf-8" if encoding == "utf-8-sig" else encoding  # a BOM or none
        raise TaskDataError(f"{path} is not {shown} text: {error}") from None
    except csv.Error as error:
        raise TaskDataError(f"{path} is not a readable CSV file: {error}") from None
    except OSError as error:
        raise TaskDataError(f"cannot read {path}: {error}") from None
    if not rows:
        raise TaskDataError(f"{path}: no rows")
    wanted = [c for c in (text_column, label_column, split_column) if c in columns]
    for number, row in enumerate(rows, start=1):
        short = [c for c in wanted if row[c] is None]
        if short:
            raise TaskDataError(f"{path}: data row {number} has no {short[0]!r} value (it has "
                                f"fewer fields than the header)")
        if None in row:
            raise TaskDataError(f"{path}: data row {number} has more fields than the header "
                                "(quote a text that holds commas)")
        if not row[label_column].strip():
            raise TaskDataError(f"{path}: data row {number} has an empty label")
        row[label_column] = row[label_column].strip()  # "pos " and " pos" are "pos"
        if split_column in row:
            row[split_column] = row[split_column].strip()  # and "train " is "train"
    name = os.path.splitext(os.path.basename(path))[0]
    names = label_order(row[label_column] for row in rows)
    if split_column not in columns:
        return {"all": TaskData([r[text_column] for r in rows], [r[label_column] for r in rows],
                                names, name)}
    out = {}
    for split in sorted({row[split_column] for row in rows}):
        if split not in SPLITS:
            raise TaskDataError(f"{path}: unknown split {split!r}; use {SPLITS}")
        chosen = [r for r in rows if r[split_column] == split]
        out[split] = TaskData([r[text_column] for r in chosen], [r[label_column] for r in chosen],
                              names, name)
    return out


def write_csv(path, splits: dict[str, TaskData]) -> None:
    """`splits` ({split: TaskData}) as a task file `read_csv` reads back: a split column, left
    out when the only split is "all" (what read_csv gives for a file without one). What a CSV
    does not hold comes back as read_csv makes it: the label names in its order (sorted; numeric
    for integer labels), only those with examples, stripped. What read_csv would refuse (no
    example, splits it does not know, a text longer than the csv module's field limit) and what
    UTF-8 cannot hold (lone surrogates) raise TaskDataError before the file is opened."""
    _check_writable(splits)
    with_split = set(splits) != {"all"}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "split"][:3 if with_split else 2])
        for split, data in splits.items():
            for text, label in zip(data.texts, data.labels):
                writer.writerow([text, label, split][:3 if with_split else 2])


def _check_writable(splits) -> None:
    """write_csv's refusals (see there)."""
    if not any(len(data) for data in splits.values()):
        raise TaskDataError("no examples to write (read_csv refuses a file without rows)")
    if set(splits) != {"all"}:
        unknown = [split for split in splits if split not in SPLITS]
        if unknown:
            raise TaskDataError(f"unknown split(s) {unknown}: a task file holds {SPLITS}, or "
                                "'all' alone (no split column)")
    limit = csv.field_size_limit()  # (a longer field than read_csv's csv module takes)
    for split, data in splits.items():
        for number, (text, label) in enumerate(zip(data.texts, data.labels)):
            if len(text) > limit:
                raise TaskDataError(f"{split} example {number}: a text of {len(text)} "
                                    f"characters, more than read_csv takes ({limit})")
            for what, value in (("text", text), ("label", str(label))):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise TaskDataError(f"{split} example {number}: its {what} {value!r:.80} "
                                        f"is not valid Unicode text ({error.reason})") from None
