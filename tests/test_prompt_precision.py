"""python/prompt_precision.py on a tiny budget (a built-in task on all-MiniLM-L6-v2): a row per
task with each precision's prompt scored, and the bfloat16 prompt's paired change from the
float32 one."""
import json

import pytest

from expert_utils import sentiment_task
from real_models import minilm_dir

import prompt_precision  # python/, on the tests' path (pyproject.toml: pythonpath)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_precision_trains_its_own_prompt(tmp_path, monkeypatch):
    minilm_dir()  # the script loads all-MiniLM-L6-v2: skips where its package is missing
    data = sentiment_task(48).split((0.5, 0.25, 0.25))
    monkeypatch.setattr(prompt_precision.up, "task_splits", lambda task, args: data)
    out = tmp_path / "precision.json"
    result = prompt_precision.main(["--tasks", "sentiment", "--epochs", "1",
                                    "--virtual-tokens", "2", "--max-length", "32",
                                    "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["rows"]
    for precision in ("float32", "bfloat16"):
        assert len(row[precision]["losses"]) == 1 and row[precision]["seconds"] > 0
        for split in ("validation", "test"):
            assert 0 <= row[precision][f"{split}_accuracy"] <= 1
    # bfloat16 rounding moves the training losses, so the two prompts differ
    assert row["float32"]["losses"] != row["bfloat16"]["losses"]
    for split in ("validation", "test"):
        change = row[f"{split}_change"]
        assert change["change"] == pytest.approx(row["bfloat16"][f"{split}_accuracy"]
                                                 - row["float32"][f"{split}_accuracy"])
