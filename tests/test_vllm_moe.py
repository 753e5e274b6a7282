"""doe_kernels.vllm on a Mixtral: plugged engines route among the kept MoE experts, run the kept
neurons inside them and skip small second experts as doe_kernels.patch (with dynamic skipping) does
on the HuggingFace model.

A random float32 Mixtral (2 layers, 4 experts, top 2), eager and compiled at tensor-parallel sizes 1
and 2: experts that drop whole experts (run by vLLM's fused experts), with heads (head scales, an
attention bias delta), and one that also prunes neurons and skips (run by doe_kernels' own expert
FFNs) plugged, swapped and unplugged; bad masks refused without a change; mixed-task batches of
both kinds. Without an engine: MoE blocks recognised or refused, expert weights kept where vLLM
leaves them in place, and a mixed step's rows reassembled in order. Skipped without vLLM; marked
`vllm`.
"""
import itertools
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

import doe_kernels  # noqa: E402
import doe_kernels.vllm as dkv  # noqa: E402
from test_vllm import (_expected_mixed, _generate, _generate_mixed, _hf_generate,  # noqa: E402
                       _start_engine, _stop_engine, assert_same_generation)

pytestmark = pytest.mark.vllm


def _tiny_mixtral(path, vocab_size: int = 1024) -> str:
    """A random float32 Mixtral: 2 layers, hidden 128, 4 experts of 256 neurons (top 2), 4
    heads / 2 KV heads."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, vocab_size=vocab_size,
                           max_position_embeddings=1024,
                           initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    MixtralForCausalLM(config).save_pretrained(path)
    return str(path)


def _masks(spec):
    """Three experts: kept experts 3 / 2 of 4 with heads (scales, an attention bias delta); other
    experts in layer 0 (every expert in layer 1) with every head; and experts, neurons inside them
    and skipping thresholds."""
    gen = torch.Generator().manual_seed(3)
    heads = {0: [1, 2], 1: [3]}
    first = doe_kernels.ExpertMask(heads=heads, moe={0: [0, 2, 3], 1: [1, 3]},
                                   spec=spec.as_dict())
    first = first.with_scales(head_scales={l: 1 + 0.2 * torch.randn(len(h), generator=gen)
                                           for l, h in heads.items()})
    first = first.with_bias(attn_bias={l: 0.02 * torch.randn(spec.hidden_size, generator=gen)
                                       for l in heads})
    second = doe_kernels.ExpertMask(moe={0: [1, 2], 1: [0, 1, 2, 3]}, spec=spec.as_dict())
    # layer 1 keeps every neuron: its experts run as grouped GEMMs, layer 0's as gather ops
    third = doe_kernels.ExpertMask({0: torch.arange(0, 256, 3)}, heads={1: [0, 2]},
                                   moe={0: [0, 1, 3]}, skip={0: 0.8, 1: 0.9},
                                   spec=spec.as_dict())
    return first, second, third


def _hf_patched(model, mask, prompts):
    with doe_kernels.plugged(model, mask, dynamic_skip=bool(mask.skip)):
        return _hf_generate(model, prompts)


@pytest.mark.parametrize("mode, tp", [("eager", 1), ("compiled", 1), ("eager", 2),
                                      ("compiled", 2)])
def test_mixtral_serves_kept_experts_and_heads(mode, tp, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _tiny_mixtral(tmp_path / "mixtral")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = doe_kernels.models.spec_of(hf)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 21)]
    first, second, third = _masks(spec)
    references = {name: _hf_patched(hf, mask, prompts)
                  for name, mask in (("first", first), ("second", second), ("third", third))}
    unskipped = _hf_patched(hf, third.with_skip({}), prompts)
    assert max(abs(a - b) for a, b in zip(unskipped[1][1], references["third"][1][1])) > 1e-3
    llm = _start_engine(path, tp=tp, enforce_eager=mode == "eager", skip_tokenizer_init=True)
    try:
        dense = _generate(llm, prompts)
        assert_same_generation(dense, _hf_generate(hf, prompts))
        # each expert changes what the model says
        assert len({str(tokens[0]) for tokens in [dense] + list(references.values())}) == 4

        dkv.plug(llm, first)
        plugged = _generate(llm, prompts)
        assert_same_generation(plugged, references["first"])
        status = dkv.status(llm)[0]
        assert status["kept_experts"] == [3, 2] and status["world_size"] == tp
        assert status["kept_heads"] == ([2, 1] if tp == 1 else [1, 0])  # rank 0: heads 0, 1
        assert status["kept"] == [None, None] and status["local_neurons"] == 256 // tp
        bad_scales = third.replace(ffn_scales={0: torch.ones(86)})
        for bad, match in ((first.replace(moe={0: torch.tensor([0, 4])}, spec={}),
                            "out of range"),
                           (bad_scales, "FFN scales"),
                           # as patch(..., dynamic_skip=True) refuses it
                           (third.with_skip({0: 0.8}), r"no skipping threshold for layers \[1\]")):
            with pytest.raises(ValueError, match=match):
                dkv.plug(llm, bad)
        assert_same_generation(_generate(llm, prompts), plugged, exact=True)

        dkv.plug(llm, third)
        assert_same_generation(_generate(llm, prompts), references["third"])
        status = dkv.status(llm)[0]  # rank 0 holds neurons [0, 256 / tp)
        assert status["kept"] == [86 if tp == 1 else 43, None]
        assert status["kept_experts"] == [3, 4]
        dkv.plug(llm, second)
        assert_same_generation(_generate(llm, prompts), references["second"])
        dkv.plug(llm, first)
        dkv.add(llm, "second", second)
        references[None] = references["first"]
        for held in (["second"], ["second", "third"]):  # vLLM's experts alone, then with ours
            if "third" in held:
                dkv.add(llm, "third", third)
            requests = [(held[-1], 1), (None, 0), ("second", 0), (None, 1), (held[-1], 0)]
            got = _generate_mixed(llm, [(name, prompts[i]) for name, i in requests])
            assert_same_generation(got, _expected_mixed(references, requests))

        dkv.unplug(llm)
        for name in ("second", "third"):
            dkv.remove(llm, name)
        assert dkv.status(llm)[0]["kept_experts"] == [None, None]
        assert_same_generation(_generate(llm, prompts), dense, exact=True)
    finally:
        _stop_engine(llm)


class _Router:
    """A router with the attributes both vLLM builds have (FusedTopKRouter on GPUs has no more)."""

    top_k, global_num_experts, renormalize, scoring_func = 2, 4, True, "softmax"


def _block(name="MixtralMoE", router=None, **config):
    """A module shaped like vLLM's MoE block: a gate (4 experts) and experts holding `router`
    and a moe_config (tensor parallelism alone unless `config` says otherwise)."""
    from types import SimpleNamespace

    experts = torch.nn.Module()
    experts.router = router if router is not None else _Router()
    experts.moe_config = SimpleNamespace(**{**dict(ep_size=1, dp_size=1, tp_size=1,
                                                  is_sequence_parallel=False), **config})
    block = type(name, (torch.nn.Module,), {})()
    block.gate, block.experts = torch.nn.Linear(8, 4, bias=False), experts
    block.gate.output_size = 4
    return block


def test_moe_blocks_are_recognised_by_structure_and_routing_rule():
    from types import SimpleNamespace

    from doe_kernels.models import UnsupportedModelError
    from doe_kernels.vllm.moe import moe_block_of, routing_sizes

    block = _block()
    assert moe_block_of(SimpleNamespace(block_sparse_moe=block), 0) is block
    assert routing_sizes(block) == (4, 2)
    grouped = type("Grouped", (_Router,), dict(use_grouped_topk=True))()
    sigmoid = type("Sigmoid", (_Router,), dict(scoring_func="sigmoid"))()
    own_gate = _block()
    own_gate.experts.gate = torch.nn.Linear(8, 4)
    for bad, match in ((_block("GraniteMoeMoE"), "neither"), (_block(router=grouped), "routing"),
                       (_block(router=sigmoid), "routing"), (own_gate, "own router logits"),
                       (_block(ep_size=2), "only tensor parallelism")):
        with pytest.raises(UnsupportedModelError, match=match):
            moe_block_of(SimpleNamespace(block_sparse_moe=bad), 3)


def test_expert_weights_are_kept_only_where_vllm_leaves_them_in_place():
    from types import SimpleNamespace

    from doe_kernels.vllm.weights import expert_weights, keeping_experts

    def process(method, layer):  # as vLLM's CPU build: the parameters replaced by repacked ones
        layer.w13_weight = torch.nn.Parameter(torch.zeros_like(layer.w13_weight))
        layer.w2_weight = torch.nn.Parameter(torch.zeros_like(layer.w2_weight))

    keep = keeping_experts(process)
    w13, w2 = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    for backend in ("CPU", "FLASHINFER_TRTLLM"):
        block = torch.nn.Module()
        block.experts = torch.nn.Module()
        block.experts.routed = layer = torch.nn.Module()
        layer.w13_weight, layer.w2_weight = torch.nn.Parameter(w13), torch.nn.Parameter(w2)
        keep(SimpleNamespace(unquantized_backend=SimpleNamespace(name=backend)), layer)
        if backend == "CPU":
            weights = expert_weights(block)
            assert torch.equal(weights.gate_up, w13)
            assert torch.equal(weights.down_t, w2.transpose(1, 2))
            assert weights.down_t.is_contiguous() and expert_weights(block) is weights
        else:
            with pytest.raises(RuntimeError, match="FLASHINFER_TRTLLM may rewrite"):
                expert_weights(block)


@pytest.mark.parametrize("repacked", [True, False], ids=["copies-cpu", "in-place-gpu"])
def test_expert_weights_written_in_place_are_read_again_or_refused(repacked):
    """A reload in kernel format copies new weights into vLLM's parameters in place. Where vLLM
    left the experts as loaded (GPUs), the kept experts read them: the down projections converted
    from them are converted again. Where vLLM repacked them (the CPU), the kept ones are a copy of
    the old weights: refused, by name, and listed for the reload's own check."""
    from types import SimpleNamespace

    from doe_kernels.vllm.weights import copies_a_reload_misses, expert_weights, keeping_experts

    def process(method, layer):  # vLLM's CPU build replaces them; Triton's leaves them
        if repacked:
            layer.w13_weight = torch.nn.Parameter(layer.w13_weight + 1, requires_grad=False)
            layer.w2_weight = torch.nn.Parameter(layer.w2_weight + 1, requires_grad=False)

    block = torch.nn.Module()
    block.experts = torch.nn.Module()
    block.experts.routed = layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(torch.randn(4, 12, 8), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(torch.randn(4, 8, 6), requires_grad=False)
    keeping_experts(process)(SimpleNamespace(unquantized_backend=SimpleNamespace(name="CPU")),
                             layer)
    before = expert_weights(block)
    assert copies_a_reload_misses(block) == (["experts.routed"] if repacked else [])
    new_w13, new_w2 = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    with torch.no_grad():  # what vLLM's reload_weights(is_checkpoint_format=False) does
        layer.w13_weight.copy_(new_w13)
        layer.w2_weight.copy_(new_w2)
    if repacked:
        with pytest.raises(RuntimeError, match="written in place .* checkpoint format"):
            expert_weights(block)
    else:
        after = expert_weights(block)
        assert after is not before and torch.equal(after.gate_up, new_w13)
        assert torch.equal(after.down_t, new_w2.transpose(1, 2))
        assert expert_weights(block) is after
        _reload_in_checkpoint_format(layer, keeping_experts(process))
        assert copies_a_reload_misses(block) == []  # kept from vLLM's parameters again
        reloaded = expert_weights(block)
        assert reloaded.gate_up.data_ptr() == layer.w13_weight.data_ptr()
        with torch.no_grad():
            layer.w2_weight.copy_(new_w2 - 1)
        assert torch.equal(expert_weights(block).down_t, (new_w2 - 1).transpose(1, 2))


def _reload_in_checkpoint_format(layer, keep) -> None:
    """What vLLM 0.32's layer-wise reload does (model_loader/reload/layerwise.py): new weights
    loaded into new parameters, processed (`keep`, the wrapped processing), copied into the
    parameters vLLM had, which are put back."""
    old = dict(layer.named_parameters())
    for name in old:
        delattr(layer, name)
    for name, parameter in old.items():
        setattr(layer, name, torch.nn.Parameter(torch.randn_like(parameter) + 5,
                                                requires_grad=False))
    keep(SimpleNamespace(unquantized_backend=SimpleNamespace(name="TRITON")), layer)
    for name, parameter in old.items():
        parameter.data.copy_(getattr(layer, name))
        delattr(layer, name)
        layer.register_parameter(name, parameter)


class _Gate(torch.nn.Linear):
    """vLLM's ReplicatedLinear: returns (output, bias)."""

    def forward(self, x):
        return super().forward(x), None


class _FusedExperts(torch.nn.Module):
    """vLLM's fused experts in float64 torch: softmax, top 2, renormalised, SwiGLU experts."""

    def __init__(self, w13, w2):
        from types import SimpleNamespace

        super().__init__()
        self.router = _Router()
        self.moe_config = SimpleNamespace(ep_size=1, dp_size=1, tp_size=1,
                                          is_sequence_parallel=False)
        self.w13, self.w2 = torch.nn.Parameter(w13), torch.nn.Parameter(w2)

    @torch.no_grad()
    def forward(self, h, logits):
        weights, experts = torch.softmax(logits, -1).topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for k in range(2):
            gate, up = torch.einsum("th,tnh->tn", h, self.w13[experts[:, k]]).chunk(2, -1)
            down = torch.einsum("tn,thn->th", torch.nn.functional.silu(gate) * up,
                                self.w2[experts[:, k]])
            out += weights[:, k, None] * down
        return out


def test_mixed_moe_steps_give_each_row_its_own_experts_plan():
    """A step of five groups in an interleaved row order (two experts on doe_kernels' own experts,
    one that drops experts, the dense model, an empty group): every row equals its group run
    alone on its plan (dense: vLLM's block); and a step whose own-routing expert has no rows."""
    from types import SimpleNamespace

    from doe_kernels.vllm.mixed import layout_of, set_step
    from doe_kernels.vllm.moe import MixedMoe, MoePlan, moe_forward
    from doe_kernels.vllm.weights import keeping_experts

    gen = torch.Generator().manual_seed(5)
    w13 = torch.randn(4, 12, 8, generator=gen, dtype=torch.float64)
    w2 = torch.randn(4, 8, 6, generator=gen, dtype=torch.float64)
    block = type("MixtralMoE", (torch.nn.Module,), {})()
    block.hidden_size = 8
    block.gate = _Gate(8, 4, bias=False).double()
    block.gate.output_size = 4
    block.experts = _FusedExperts(w13, w2)
    layer = SimpleNamespace(w13_weight=w13, w2_weight=w2)
    keeping_experts(lambda method, layer: None)(
        SimpleNamespace(unquantized_backend=SimpleNamespace(name="CPU")), layer)
    block.experts.routed = torch.nn.Module()
    block.experts.routed.__dict__.update(layer.__dict__)
    plans = {"a": MoePlan(block, torch.tensor([0, 1, 3]), torch.tensor([0, 2, 5]), beta=0.8),
             "b": MoePlan(block, torch.tensor([1, 2]), torch.tensor([1, 3, 4])),
             "c": MoePlan(block, torch.tensor([0, 2, 3])), "empty": MoePlan(block, torch.arange(4))}
    assert not plans["a"].routes_in_vllm and plans["c"].routes_in_vllm
    names = ["a", None, "b", "c", "a", "empty", "b"]
    counts = [3, 2, 1, 4, 2, 0, 3]
    x = torch.randn(sum(counts), 8, generator=gen, dtype=torch.float64)
    mixed = MixedMoe(block, None, plans, dense=lambda x: pytest.fail("a mixed step ran dense"))
    set_step(layout_of(names, counts, sum(counts)))
    try:
        got = mixed.forward(x)
    finally:
        set_step(None)
    start = 0
    for name, count in zip(names, counts):
        rows = x[start:start + count]
        want = (moe_forward(block, rows, torch.zeros(4, dtype=torch.bool)) if name is None
                else plans[name].forward(rows))
        torch.testing.assert_close(got[start:start + count], want, rtol=1e-12, atol=1e-12)
        start += count
    assert not torch.equal(plans["a"].forward(x[:3]), plans["b"].forward(x[:3]))
    # a step whose only expert of its own routing has no rows this step: dense rows alone
    set_step(layout_of(["a", None], [0, 3], 3))
    try:
        got = mixed.forward(x[:3])
    finally:
        set_step(None)
    torch.testing.assert_close(got, moe_forward(block, x[:3], torch.zeros(4, dtype=torch.bool)),
                               rtol=1e-12, atol=1e-12)


def test_the_mixed_ffns_packed_lists_stay_bounded():
    """MixedFfn keeps its packed kept lists per order of a step's experts, which varies with
    vLLM's batch order: bounded as its union plans are (it grew with every order seen)."""
    from types import SimpleNamespace

    from doe_kernels.vllm.mixed import UNION_PLANS, MixedFfn

    ffn = object.__new__(MixedFfn)
    ffn.weights = SimpleNamespace(w_gate=torch.zeros(6, 4), w_down_t=torch.zeros(6, 4))
    ffn.plans = {name: None for name in (None, "a", "b", "c", "d", "e")}
    ffn._packed = {}
    orders = list(itertools.permutations(ffn.plans, 4))
    assert len(orders) > UNION_PLANS
    for names in orders:
        kept, offsets, scales = ffn._pack(names)
        assert kept.numel() == 24 and offsets.tolist() == [0, 6, 12, 18, 24] and scales is None
    assert 0 < len(ffn._packed) <= UNION_PLANS


def test_the_mixed_ffns_union_plans_stay_bounded_in_bytes(monkeypatch):
    """MixedFfn keeps a union plan per composition of a step's rows (reused by each decoding step
    of the same requests), at most UNION_PLAN_BYTES of them: a plan's row mask is rows x union,
    megabytes at a hundred rows of an 8B model (64 of them per layer held gigabytes)."""
    from types import SimpleNamespace

    from doe_kernels.vllm import mixed

    built = []

    def union_plan(x, segments, *packed, **kwargs):  # a plan of 3 MiB in bfloat16
        built.append(x.shape[0])
        return torch.zeros(4), torch.zeros(x.shape[0], 3 * 2**20 // (2 * x.shape[0]),
                                           dtype=torch.bfloat16)

    monkeypatch.setattr(mixed.library, "union_plan", union_plan)
    ffn = object.__new__(mixed.MixedFfn)
    ffn.weights = SimpleNamespace(w_gate=torch.zeros(6, 4), w_down_t=torch.zeros(6, 4))
    ffn.plans = {name: None for name in (None, "a", "b")}
    ffn._packed, ffn._unions, ffn._union_bytes = {}, {}, 0
    x = torch.zeros(8, 4, dtype=torch.bfloat16)
    for rows in range(1, 9):
        step = mixed.StepLayout(("a", "b"), [rows, 8 - rows], None, None)
        plan = ffn._union(step, x, None)
        assert ffn._union(step, x, None) is plan  # the next decoding step's: reused
        assert ffn._union_bytes <= mixed.UNION_PLAN_BYTES
        held = sum(t.numel() * t.element_size() for p in ffn._unions.values() for t in p)
        assert held == ffn._union_bytes
    assert len(built) == 8 and len(ffn._unions) < 8
    monkeypatch.setattr(mixed, "UNION_PLAN_BYTES", 2**20)  # a plan larger than the bound
    held = dict(ffn._unions)
    step = mixed.StepLayout(("b", "a"), [4, 4], None, None)
    assert ffn._union(step, x, None) is not ffn._union(step, x, None)  # built, not kept
    assert ffn._unions == held


def test_a_model_runner_without_what_mixed_batches_wrap_is_named():
    """check_runner (which doe_check_mask runs for an expert to be held, before any rank
    changes) names what vLLM's model runner lacks."""
    from types import SimpleNamespace

    from doe_kernels.vllm.mixed import check_runner

    with pytest.raises(RuntimeError, match=r"to have \['_model_forward', 'requests'\] \(this one "
                                           r"is a SimpleNamespace\)"):
        check_runner(SimpleNamespace(execute_model=None, input_batch=None))
    check_runner(SimpleNamespace(execute_model=None, _model_forward=None, input_batch=None,
                                 requests=None))
