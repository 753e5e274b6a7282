"""doe_kernels.data: task data from lists, CSV files and `datasets` splits."""
import pytest

from doe_kernels.data import TaskData, TaskDataError, read_csv


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.5, 0.25, 0.25)])
def test_splits_summing_to_one_use_every_example_once(fractions):
    for count in range(1, 60):
        data = TaskData([f"t{i}" for i in range(count)], ["a", "b"] * (count // 2) + ["a"] *
                        (count % 2))
        splits = data.split(fractions, seed=count)
        pairs = [pair for part in splits.values() for pair in zip(part.texts, part.labels)]
        # every (text, label) pair once: the labels stay with their texts
        assert sorted(pairs) == sorted(zip(data.texts, data.labels)), (
            count, {k: len(v) for k, v in splits.items()})
    exact = TaskData([str(i) for i in range(320)], ["a"] * 320).split((0.6, 0.2, 0.2))
    assert [len(part) for part in exact.values()] == [192, 64, 64]
    assert len(TaskData(["x"] * 10, ["a"] * 10).split((0.8, 0.2, 0.0))["test"]) == 0


@pytest.mark.parametrize("fractions, message", [
    ((0.9, -0.2, 0.3), "must be numbers >= 0"),  # (put 2 of 10 examples in train and test)
    ((1.2, 0.2, 0), "must sum to at most 1, got .* .sum 1.4."),  # (left validation empty)
    ((float("nan"),), "must be numbers >= 0"),
    ((0.5, "0.5"), "must be numbers >= 0"),
    ((0.5, 0.2, 0.2, 0.1), "one to three"),
    ((), "one to three"),
])
def test_bad_split_fractions_are_refused(fractions, message):
    with pytest.raises(ValueError, match=message):
        TaskData([f"t{i}" for i in range(10)], ["a"] * 10).split(fractions)


def test_split_fractions_may_come_from_a_generator():
    data = TaskData([f"t{i}" for i in range(10)], ["a"] * 10)
    split = data.split(f for f in (0.5, 0.3, 0.2))  # (read once: checked, then used)
    assert [len(part) for part in split.values()] == [5, 3, 2]


def test_texts_and_the_name_must_be_strings():
    """A text that is not a str (None, a number: a template would format it into text) or a name
    that is not one is refused when the task is made, naming the example."""
    with pytest.raises(TaskDataError, match="example 1's text is a NoneType, not a str"):
        TaskData(["fine", None], ["a", "b"])
    with pytest.raises(TaskDataError, match="example 0's text is a int, not a str: 3"):
        TaskData.from_lists([3], ["a"])
    with pytest.raises(TaskDataError, match="name must be a str, got a NoneType"):
        TaskData(["fine"], ["a"], name=None)


def test_label_names_are_strings_and_distinct():
    assert TaskData.from_lists(["x", "y"], [0, 1], [0, 1]).label_ids == [0, 1]
    with pytest.raises(TaskDataError, match="label_names must be distinct"):
        TaskData.from_lists(["x", "y"], ["a", "a"], ["a", "a"])


class _Dataset:
    """What from_dataset reads of a `datasets` split: columns, features and the columns' values."""

    def __init__(self, texts, labels, names):
        self.column_names, self._columns = ["text", "label"], {"text": texts, "label": labels}
        self.features = {"label": type("ClassLabel", (), {"names": names})()}

    def __getitem__(self, column):
        return self._columns[column]


def test_unlabelled_dataset_rows_are_refused():
    names = ["neg", "pos"]
    assert TaskData.from_dataset(_Dataset(["x", "y"], [1, 0], names)).labels == ["pos", "neg"]
    for bad in (-1, 2, None):  # -1: GLUE's test sets
        with pytest.raises(TaskDataError, match=f"label holds {bad!r}, not a class"):
            TaskData.from_dataset(_Dataset(["x", "y"], [bad, 0], names))


def test_a_csv_with_a_byte_order_mark_and_crlf_lines_reads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\r\ngood film,pos\r\n\"bad, dull\",neg\r\n".encode("utf-8"))
    data = read_csv(path)["all"]
    assert data.texts == ["good film", "bad, dull"] and data.labels == ["pos", "neg"]


def test_labels_read_as_a_user_means_them(tmp_path):
    """Spaces around a label do not make another class; a missing label is refused; integer
    labels are ordered as numbers; a file without a split column is written back as one."""
    from doe_kernels.data import write_csv

    path = tmp_path / "t.csv"
    path.write_text("text,label\na,pos\nb,pos \nc, neg\n", encoding="utf-8")
    task = read_csv(path)["all"]
    assert task.label_names == ["neg", "pos"] and task.labels == ["pos", "pos", "neg"]
    for bad in (None, "", "  "):
        with pytest.raises(TaskDataError, match="example 1 has no label"):
            TaskData(["a", "b"], ["pos", bad])
    numbers = TaskData(["a", "b", "c", "d"], [2, 10, 1, 0])
    assert numbers.label_names == ["0", "1", "2", "10"] and numbers.label_ids == [2, 3, 1, 0]
    write_csv(tmp_path / "t2.csv", read_csv(path))
    back = read_csv(tmp_path / "t2.csv")["all"]
    assert (back.texts, back.labels, back.label_names) == (task.texts, task.labels,
                                                           task.label_names)


def test_what_write_csv_writes_read_csv_reads_or_it_is_refused_before_writing(tmp_path):
    """What read_csv would refuse (a text past the csv module's field limit, 131072 characters,
    splits it does not know, no rows) and what UTF-8 cannot hold are refused before the file is
    made (they were written, then refused when read, or failed halfway)."""
    from doe_kernels.data import write_csv

    task = TaskData(["a", "b"], ["pos", "neg"])
    for splits, message in [({"all": task, "train": task}, r"unknown split\(s\) \['all'\]"),
                            ({"dev": task}, r"unknown split\(s\) \['dev'\]: a task file holds"),
                            ({"train": TaskData(["a", "b\udc80"], ["pos", "neg"])},
                             "train example 1: its text 'b.udc80' is not valid Unicode text"),
                            ({"test": TaskData(["a", "b"], ["pos", "n\udc80"])},
                             "test example 1: its label 'n.udc80' is not valid Unicode text"),
                            ({"train": TaskData(["word " * 40000, "b"], ["pos", "neg"])},
                             "train example 0: a text of 200000 characters, more than read_csv "
                             "takes .131072."),
                            ({}, "no examples to write")]:
        path = tmp_path / "refused.csv"
        with pytest.raises(TaskDataError, match=message):
            write_csv(path, splits)
        assert not path.exists()


def test_split_values_are_stripped_and_bad_counts_and_directories_named(tmp_path):
    """A split value with spaces reads as the split (labels already did); a directory is named
    as one; sample refuses a negative count (it silently dropped an example)."""
    path = tmp_path / "task.csv"
    path.write_text("text,label,split\na,pos,train \nb,neg, validation\n")
    splits = read_csv(path)
    assert sorted(splits) == ["train", "validation"] and splits["train"].texts == ["a"]
    with pytest.raises(TaskDataError, match="is a directory, not a task file"):
        read_csv(tmp_path)
    data = TaskData(["a", "b"], ["x", "y"], ["x", "y"])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="count must be an int >= 0"):
            data.sample(bad)
    assert data.sample(0).texts == [] and len(data.sample(5)) == 2


def test_a_digest_names_the_examples_in_any_order():
    """TaskData.digest: the same for the same (text, label) pairs in another order, another for
    a text or label changed, an example left out or added twice."""
    data = TaskData(["a", "b", "c"], ["x", "y", "x"])
    assert data.digest() == TaskData(["c", "a", "b"], ["x", "x", "y"]).digest()
    assert len(data.digest()) == 16
    others = [TaskData(["a", "b", "d"], ["x", "y", "x"]),
              TaskData(["a", "b", "c"], ["x", "y", "y"]), TaskData(["a", "b"], ["x", "y"]),
              TaskData(["a", "b", "c", "c"], ["x", "y", "x", "x"])]
    assert len({data.digest(), *(other.digest() for other in others)}) == 5
