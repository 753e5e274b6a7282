"""python/router_benchmark.py on a tiny model: both routers serve every request of both mixes,
the rows carry what the docs table reads, and the plot is written."""
import argparse
import json

import pytest
from conftest import stub_commit

import router_benchmark as rb
from expert_utils import TEXTS, seq_cls_expert, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def test_router_benchmark_rows_and_plot(tokenizer, tmp_path, monkeypatch):
    stub_commit(monkeypatch, "at-start")
    started = rb.run_start()  # as main calls it before loading the model
    stub_commit(monkeypatch, "later")  # the checkout moves on during the run
    model = tiny_bert()
    experts = {task: seq_cls_expert(model, rate=0.2 * i, seed=i)
               for i, task in enumerate(rb.TASKS)}
    texts = {task: TEXTS for task in rb.TASKS}
    args = argparse.Namespace(clients=3, requests=4, window=0.005, model="minilm", experts=None,
                              assets=None, device="cpu", out=str(tmp_path))
    rows = rb.measure(model, tokenizer, experts, texts, args)
    with open(rb.results_writer(args, experts, started)(rows)) as f:
        saved = json.load(f)
    assert saved["rows"] == rows and saved["pruning_rates"].keys() == experts.keys()
    assert saved["commit"] == "at-start" and saved["load_start"] == started["load_start"]
    assert all(saved[key] for key in ("cpu", "device", "commit", "cpu_features", "torch"))
    assert [(r["mix"], r["router"]) for r in rows] == [
        (mix, router) for mix in rb.MIXES for router in ("serial", "mixed")]
    for row in rows:
        assert row["requests"] == 12 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        if row["router"] == "mixed":
            assert 1 <= row["mean_batch"] <= 3
    rb.plot(rows, str(tmp_path / "router.png"), "test")
    assert (tmp_path / "router.png").stat().st_size > 0
    ceiling = rb.batching_ceiling(model, tokenizer, experts, texts, args)
    assert ceiling["one_expert"] == rb.TASKS[0] and ceiling["requests"] == 3 * rb.CEILING_BATCHES
    times = ceiling["ms_per_request"]
    assert all(times[f"{case}, {mode}"] > 0 for case in ("own experts", "one expert")
               for mode in ("alone", "batched"))
    assert times["batching gain, own experts"] == round(
        times["own experts, alone"] / times["own experts, batched"], 2)
    with open(rb.results_writer(args, experts)(rows, ceiling)) as f:
        assert json.load(f)["batching_ceiling"] == ceiling


def test_percentiles_are_nearest_rank():
    """The q percentile of n sorted values is the ceil(q n)-th: the median of an even count is
    the lower middle value, the 99th of 100 values the 99th."""
    assert rb.percentile([1, 2, 3, 4], 0.5) == 2 and rb.percentile([1, 2, 3], 0.5) == 2
    assert rb.percentile(list(range(1, 101)), 0.99) == 99
    assert rb.percentile(list(range(1, 11)), 0.99) == 10 and rb.percentile([7], 0.01) == 7


def test_assets_carry_configs_tokenizers_and_texts_but_no_weights(tokenizer, tmp_path,
                                                                   monkeypatch):
    """--export-assets copies each model's config and tokenizer (never its weights) and the
    request texts; --assets builds the model from the config with random weights and serves
    those texts with stand-in experts."""
    import offline_models
    from expert_utils import tiny_bert, tiny_llama

    sources = {}
    for name, model in (("minilm", tiny_bert()), ("smollm2", tiny_llama())):
        sources[name] = tmp_path / f"{name}_source"
        model.save_pretrained(sources[name])  # with its weights
        tokenizer.save_pretrained(sources[name])
    monkeypatch.setattr(offline_models, "minilm_dir", lambda: str(sources["minilm"]))
    monkeypatch.setattr(offline_models, "smollm2_dir", lambda: str(sources["smollm2"]))
    labels = {task: [f"{task}-{i}" for i in range(2 + i)] for i, task in enumerate(rb.TASKS)}
    monkeypatch.setattr(rb, "task_texts", lambda count: {
        task: {"texts": TEXTS[:count], "label_names": labels[task]} for task in rb.TASKS})
    assets = tmp_path / "assets"
    rb.export_assets(str(assets), 3)
    for name in ("minilm", "smollm2"):
        files = sorted(p.name for p in (assets / name).iterdir())
        assert "config.json" in files and "tokenizer.json" in files
        assert not any(f.endswith((".safetensors", ".bin")) for f in files)
    model, tok = rb.model_from_assets("minilm", str(assets))
    assert model.config.hidden_size == tiny_bert().config.hidden_size and not model.training
    assert tok("a film")["input_ids"] == tokenizer("a film")["input_ids"]
    args = argparse.Namespace(assets=str(assets), experts=None, model="minilm", texts=3)
    experts, texts = rb.experts_and_texts(model, tok, args)
    assert texts == {task: TEXTS[:3] for task in rb.TASKS}
    assert {t: e.label_names for t, e in experts.items()} == labels
    llama, _ = rb.model_from_assets("smollm2", str(assets))
    assert type(llama).__name__ == "LlamaForCausalLM"
