"""python/router_benchmark.py on a tiny model: both routers serve every request of both mixes,
the rows carry what the docs table reads, and the plot is written."""
import argparse

import pytest

import router_benchmark as rb
from expert_utils import TEXTS, seq_cls_expert, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def test_router_benchmark_rows_and_plot(tokenizer, tmp_path):
    model = tiny_bert()
    experts = {task: seq_cls_expert(model, rate=0.2 * i, seed=i)
               for i, task in enumerate(rb.TASKS)}
    texts = {task: TEXTS for task in rb.TASKS}
    args = argparse.Namespace(clients=3, requests=4, window=0.005)
    rows = rb.measure(model, tokenizer, experts, texts, args)
    assert [(r["mix"], r["router"]) for r in rows] == [
        (mix, router) for mix in rb.MIXES for router in ("serial", "mixed")]
    for row in rows:
        assert row["requests"] == 12 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        if row["router"] == "mixed":
            assert 1 <= row["mean_batch"] <= 3
    rb.plot(rows, str(tmp_path / "router.png"), "test")
    assert (tmp_path / "router.png").stat().st_size > 0
