"""python/compare_runs.py: two runs' rows side by side, and the plot."""
import json

import pytest

import compare_runs  # python/, on the tests' path


def _run(path, rows):
    path.write_text(json.dumps(dict(rows=rows)))
    return str(path)


def _row(task, rate, change, se=0.01, base=0.8):
    return dict(task=task, prompt_tuned_accuracy=base, expert_accuracy=base + change,
                change=change, change_se=se, pruning_rate=rate, speedup=1.0 + rate)


def test_table_and_plot(tmp_path, capsys):
    before = _run(tmp_path / "a.json", [_row("polarity", 0.2, 0.0), _row("tweets", 0.1, -0.004)])
    after = _run(tmp_path / "b.json", [_row("tweets", 0.55, -0.021, se=0.007),
                                       _row("newsgroups", 0.3, 0.0)])
    compare_runs.main([before, after, "--labels", "old", "new", "--out", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "| tweets | old | 0.800 | 0.796 | -0.4 (1.0) | 10.0% | 1.10x |" in out
    assert "| tweets | new | 0.800 | 0.779 | -2.1 (0.7) | 55.0% | 1.55x |" in out
    assert "polarity" not in out and "newsgroups" not in out.split("wrote")[0]  # only shared tasks
    assert (tmp_path / "p.png").stat().st_size > 0


def test_labels_must_match_the_runs(tmp_path):
    run = _run(tmp_path / "a.json", [_row("polarity", 0.2, 0.0)])
    with pytest.raises(SystemExit):
        compare_runs.main([run, run, "--labels", "one", "--out", str(tmp_path / "p.png")])


def test_a_run_from_several_files(tmp_path, capsys):
    before = _run(tmp_path / "a.json", [_row("polarity", 0.2, 0.0), _row("tweets", 0.1, 0.0)])
    first = _run(tmp_path / "b.json", [_row("polarity", 0.4, 0.01)])
    second = _run(tmp_path / "c.json", [_row("tweets", 0.3, -0.01)])
    compare_runs.main([before, f"{first},{second}", "--out", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "| polarity | run 2 | 0.800 | 0.810 | +1.0 (1.0) | 40.0% | 1.40x |" in out
    assert "| tweets | run 2 | 0.800 | 0.790 | -1.0 (1.0) | 30.0% | 1.30x |" in out


def test_a_task_twice_in_one_run_is_an_error(tmp_path):
    first = _run(tmp_path / "a.json", [_row("polarity", 0.2, 0.0)])
    second = _run(tmp_path / "b.json", [_row("polarity", 0.4, 0.0)])
    with pytest.raises(SystemExit, match="polarity"):
        compare_runs.main([first, f"{first},{second}", "--out", str(tmp_path / "p.png")])
