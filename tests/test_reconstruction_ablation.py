"""python/reconstruction_ablation.py on a tiny budget (a built-in task instead of the real data, so
nothing is downloaded): the results file's structure and its figures' consistency."""
import json

import pytest

from doe_kernels.localize import paired_change
from expert_utils import sentiment_task
from real_models import minilm_dir

import reconstruction_ablation  # python/, on the tests' path (pyproject.toml: pythonpath)

pytestmark = pytest.mark.usefixtures("one_thread")


def _paired_from_counts(gained, lost, examples) -> dict:
    """paired_change of answers gaining `gained` and losing `lost` of `examples`: what a row's
    change and standard error must be, whichever examples changed."""
    same = examples - gained - lost
    return paired_change([True] * gained + [False] * lost + [True] * same,
                         [False] * gained + [True] * lost + [True] * same)


def test_tiny_ablation_writes_a_row_per_variant(tmp_path, monkeypatch, capsys):
    out = tmp_path / "polarity"
    minilm_dir()  # the script loads all-MiniLM-L6-v2: skips where its package is missing
    data = sentiment_task(64).split((0.5, 0.0, 0.5))
    monkeypatch.setattr(reconstruction_ablation, "load_task",
                        lambda task, max_examples, seed: {k: v.sample(max_examples, seed=seed)
                                                          for k, v in data.items()})
    result = reconstruction_ablation.main([
        "--max-train", "16", "--test", "16", "--epochs", "1", "--rates", "0.5", "0.8",
        "--calibration", "8", "--attribution-examples", "8", "--out", str(out)])
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    meta = saved["metadata"]
    for key in ("date", "commit", "torch", "transformers", "cpu", "threads", "task", "sizes",
                "seed", "command"):
        assert meta[key] is not None, key
    assert meta["sizes"] == dict(train=16, test=16, calibration=8, fidelity=8, attribution=8)
    assert meta["threads"] == 1 and meta["scope"] == "global" and meta["prompt"]["epochs"] == 1
    dense = saved["dense"]["accuracy"]
    assert 0.0 <= dense <= 1.0 and saved["dense"]["correct"] == round(16 * dense)
    assert [(row["method"], row["rate"]) for row in saved["rows"]] == [
        ("grad", 0.5), ("grad", 0.8), ("fisher", 0.5), ("fisher", 0.8)]
    assert meta["methods"] == ["grad", "fisher"] and meta["ridge"] > 0
    for row in saved["rows"]:
        assert row["ffn_pruning_rate"] == pytest.approx(row["rate"], abs=0.01)
        assert row["ffn_bias_layers"] and row["attn_bias_layers"]  # compensation did something
        assert set(row["kl_to_dense"]) == set(reconstruction_ablation.GUARDED_FROM)
        assert all(kl >= -1e-9 for kl in row["kl_to_dense"].values())
        choice = row["guarded_choice"]
        assert row["kl_to_dense"][choice] == min(row["kl_to_dense"].values())
        assert row["guarded"] == row[choice]  # the chosen variant's test figures
        for kind in reconstruction_ablation.VARIANTS:
            figures = row[kind]
            assert figures["change"] == pytest.approx(figures["accuracy"] - dense)
            # the paired figures (a standard error of 0 where no answer changed), not unpaired
            paired = {k: figures[k] for k in ("change", "change_se", "gained", "lost")}
            assert paired == pytest.approx(_paired_from_counts(figures["gained"],
                                                               figures["lost"], 16))
        versus = row["scales_vs_plain"]
        assert versus["change"] == pytest.approx(row["scales"]["accuracy"]
                                                 - row["plain"]["accuracy"])
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table in printed and table.count("\n| grad | 0.") == table.count("\n| fisher | 0.") == 2
    summary = reconstruction_ablation.summarize(str(tmp_path))
    assert summary.count("\n| polarity | ") == 4 and (tmp_path / "accuracy_vs_pruning.png").exists()
    assert summary == (tmp_path / "summary.md").read_text()


def test_metadata_records_the_fixed_split_seed():
    """--seed draws the capped subsets; the train / validation / test split is tasks.py's own."""
    import tasks

    args = reconstruction_ablation.parse_args(["--seed", "3"])
    begun = dict(commit="abc", load_start=0.5)
    meta = reconstruction_ablation.metadata(args, ["--seed", "3"], {}, 0.0, begun)
    assert meta["seed"] == 3 and meta["split_seed"] == tasks.SPLIT_SEED != 3
    assert meta["commit"] == "abc"  # the commit read as the run began, not at its end
