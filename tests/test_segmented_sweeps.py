"""python/segmented_regimes.py and segmented_union_sweep.py's results files, the sweeps left out:
the commit recorded is the one the run began on."""
import json
import sys

import pytest
from conftest import stub_commit

import segmented_regimes
import segmented_union_sweep  # python/, on the tests' path (pyproject.toml: pythonpath)


@pytest.mark.parametrize("script, rows", [
    (segmented_regimes, [dict(rows=1)]),
    (segmented_union_sweep, [dict(rows=1, auto_vs_faster=1.0)])])
def test_results_name_the_commit_the_run_began_on(script, rows, tmp_path, monkeypatch):
    stub_commit(monkeypatch, "at-start")

    def sweep(counts, dtype):  # the checkout moves on during the run
        stub_commit(monkeypatch, "later")
        return rows

    monkeypatch.setattr(script, "sweep", sweep)
    monkeypatch.setattr(script, "fit", lambda rows: {}, raising=False)
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", ["script.py", "--out", str(out)])
    script.main()
    saved = json.loads(out.read_text())
    assert saved["commit"] == "at-start" and "load_start" in saved and saved["rows"] == rows
