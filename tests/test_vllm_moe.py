"""doe_kernels.vllm on a Mixtral: plugged engines route among the kept MoE experts as
doe_kernels.patch does on the HuggingFace model.

A random float32 Mixtral (2 layers, 4 experts, top 2), eager and compiled at tensor-parallel size 1,
eager at size 2:
whole experts and heads (with head scales and attention bias deltas) plugged, swapped and
unplugged; masks vLLM does not serve (neurons inside the experts, skipping thresholds) refused
without a change; mixed-task batches. Skipped without vLLM; marked `vllm`.
"""
import pytest
import torch

pytest.importorskip("vllm")

import doe_kernels  # noqa: E402
import doe_kernels.vllm as dkv  # noqa: E402
from test_vllm import (_expected_mixed, _generate, _generate_mixed, _hf_generate,  # noqa: E402
                       _hf_patched, _start_engine, _stop_engine, assert_same_generation)

pytestmark = pytest.mark.vllm


def _tiny_mixtral(path) -> str:
    """A random float32 Mixtral: 2 layers, hidden 128, 4 experts of 256 neurons (top 2), 4
    heads / 2 KV heads."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, vocab_size=1024, max_position_embeddings=1024,
                           initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    MixtralForCausalLM(config).save_pretrained(path)
    return str(path)


def _masks(spec):
    """Two experts: (kept experts 3 / 2 of 4, heads with scales and an attention bias delta),
    and (other experts, every head)."""
    gen = torch.Generator().manual_seed(3)
    heads = {0: [1, 2], 1: [3]}
    first = doe_kernels.ExpertMask(heads=heads, moe={0: [0, 2, 3], 1: [1, 3]},
                                   spec=spec.as_dict())
    first = first.with_scales(head_scales={l: 1 + 0.2 * torch.randn(len(h), generator=gen)
                                           for l, h in heads.items()})
    first = first.with_bias(attn_bias={l: 0.02 * torch.randn(spec.hidden_size, generator=gen)
                                       for l in heads})
    second = doe_kernels.ExpertMask(moe={0: [1, 2], 1: [0, 1, 2]}, spec=spec.as_dict())
    return first, second


@pytest.mark.parametrize("mode, tp", [("eager", 1), ("compiled", 1), ("eager", 2)])
def test_mixtral_serves_kept_experts_and_heads(mode, tp, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _tiny_mixtral(tmp_path / "mixtral")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = doe_kernels.models.spec_of(hf)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 21)]
    first, second = _masks(spec)
    references = {"first": _hf_patched(hf, first, prompts),
                  "second": _hf_patched(hf, second, prompts)}
    llm = _start_engine(path, tp=tp, enforce_eager=mode == "eager", skip_tokenizer_init=True)
    try:
        dense = _generate(llm, prompts)
        assert_same_generation(dense, _hf_generate(hf, prompts))
        # each expert changes what the model says
        assert len({str(tokens) for tokens in (dense[0], references["first"][0],
                                               references["second"][0])}) == 3

        dkv.plug(llm, first)
        plugged = _generate(llm, prompts)
        assert_same_generation(plugged, references["first"])
        status = dkv.status(llm)[0]
        assert status["kept_experts"] == [3, 2] and status["world_size"] == tp
        assert status["kept_heads"] == ([2, 1] if tp == 1 else [1, 0])  # rank 0: heads 0, 1
        assert status["kept"] == [None, None] and status["local_neurons"] is None
        for bad, match in ((first.replace(ffn={0: torch.arange(0, 256, 2)}), "inside the MoE"),
                           (first.with_skip({0: 0.5}), "skipping thresholds")):
            with pytest.raises(ValueError, match=match):
                dkv.plug(llm, bad)
        assert_same_generation(_generate(llm, prompts), plugged, exact=True)

        dkv.plug(llm, second)
        assert_same_generation(_generate(llm, prompts), references["second"])
        dkv.plug(llm, first)
        dkv.add(llm, "second", second)
        requests = [("second", 1), (None, 0), ("second", 0), (None, 1)]
        got = _generate_mixed(llm, [(name, prompts[i]) for name, i in requests])
        references[None] = references["first"]
        assert_same_generation(got, _expected_mixed(references, requests))

        dkv.unplug(llm)
        dkv.remove(llm, "second")
        assert dkv.status(llm)[0]["kept_experts"] == [None, None]
        assert_same_generation(_generate(llm, prompts), dense, exact=True)
    finally:
        _stop_engine(llm)
