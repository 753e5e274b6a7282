"""doe_kernels.vllm against HuggingFace: plugged vLLM engines generate what doe_kernels.patch does.

SmolLM2-135M at tensor-parallel size 1 and a small random Llama (8 heads, 4 KV heads) at size 2,
float32, greedy. One engine per configuration (class-scoped fixtures: an engine starts in ~30 s),
prompts as token ids (no tokenizer differences). Skipped without vLLM; marked `vllm`.
"""
import gc
import os

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

import doe_kernels  # noqa: E402
import doe_kernels.vllm as dkv  # noqa: E402
from real_models import smollm2_dir  # noqa: E402

pytestmark = pytest.mark.vllm

NEW_TOKENS = 12
LOGPROB_ATOL = 1e-3  # float32, 30 layers, oneDNN vs PyTorch GEMMs: seen <= 3e-5


def _start_engine(path: str, tp: int, enforce_eager: bool = True, **kwargs):
    """A float32 vLLM engine with the doe_kernels worker extension, eager unless told (then
    compiled as vLLM does by default on the CPU: traced once, Inductor)."""
    from vllm import LLM

    env = dict(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1" if tp == 2 else "auto",
               HF_HUB_OFFLINE="1")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update({key: os.environ.get(key, value) for key, value in env.items()})
    try:
        return LLM(model=path, dtype="float32", enforce_eager=enforce_eager, seed=0,
                   max_model_len=512, tensor_parallel_size=tp,
                   worker_extension_cls="doe_kernels.vllm.WorkerExtension", **kwargs)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _stop_engine(llm) -> None:
    """Stop the engine's processes now (the next class starts another engine). vLLM's shutdown
    walks the process tree with psutil, which raises when a child exits during the walk (seen
    once in CI, after every assertion of the test had passed): that child is stopped already."""
    import psutil

    try:
        llm.llm_engine.engine_core.shutdown()
    except psutil.NoSuchProcess:
        pass
    gc.collect()


def _generate(llm, prompts):
    """Greedy continuations: (token lists, the chosen tokens' log-probabilities). One request at
    a time: vLLM's results depend (in the last bits) on how requests share a batch."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    return _results([llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
                     for ids in prompts])


def _results(outs):
    """(token lists, the chosen tokens' log-probabilities) of vLLM RequestOutputs asked for
    logprobs."""
    tokens = [list(out.outputs[0].token_ids) for out in outs]
    logprobs = [[step[token].logprob for token, step in zip(out.outputs[0].token_ids,
                                                            out.outputs[0].logprobs)]
                for out in outs]
    return tokens, logprobs


def _capture_with_logprobs(llm, monkeypatch) -> list:
    """Make `llm.generate` (for the rest of the test) also return the chosen tokens'
    log-probabilities, and keep its outputs in the list returned."""
    generate, outputs = llm.generate, []

    def with_logprobs(prompts, params, **kwargs):
        params = [p.clone() for p in params] if isinstance(params, list) else params.clone()
        for p in params if isinstance(params, list) else [params]:
            p.logprobs = 0
        outputs.extend(generate(prompts, params, **kwargs))
        return outputs[-len(prompts):]

    monkeypatch.setattr(llm, "generate", with_logprobs)
    return outputs


def _as_generation(choices):
    """(token, log-probability) pairs as one-token generations, for assert_same_generation."""
    return [[token] for token, _ in choices], [[logprob] for _, logprob in choices]


def _generate_mixed(llm, requests):
    """Greedy continuations of (expert name or None, token ids) requests, all in one generate
    call (vLLM batches them into the same steps)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    prompts, named = dkv.for_experts(llm, [(name, {"prompt_token_ids": ids})
                                           for name, ids in requests], params)
    return _results(llm.generate(prompts, named, use_tqdm=False))


def _expected_mixed(references: dict, requests: list):
    """The single-expert results (`references[name]`: (tokens, logprobs) per prompt index) of
    (name, prompt index) requests."""
    return ([references[name][0][index] for name, index in requests],
            [references[name][1][index] for name, index in requests])


def _hf_generate(model, prompts, new_tokens: int = NEW_TOKENS):
    """The same greedy continuations from a HuggingFace model (patched or not), step by step
    with its KV cache (no EOS handling). A prompt: token ids, or a (length, hidden) tensor of
    prompt embeddings."""
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            step_input = (dict(inputs_embeds=prompt[None]) if isinstance(prompt, torch.Tensor)
                          else dict(input_ids=torch.tensor([prompt])))
            cache, chosen = None, []
            for _ in range(new_tokens):
                out = model(**step_input, past_key_values=cache, use_cache=True)
                step = torch.log_softmax(out.logits[0, -1].double(), -1)
                cache, token = out.past_key_values, int(step.argmax())
                chosen.append((token, float(step[token])))
                step_input = dict(input_ids=torch.tensor([[token]]))
            tokens.append([token for token, _ in chosen])
            logprobs.append([logprob for _, logprob in chosen])
    return tokens, logprobs


def _hf_patched(model, mask, prompts):
    with doe_kernels.plugged(model, mask):
        return _hf_generate(model, prompts)


def assert_same_generation(got, expected, exact: bool = False):
    tokens, logprobs = got
    assert tokens == expected[0]
    for row, ref in zip(logprobs, expected[1]):
        if exact:
            assert row == ref
        else:
            assert max(abs(a - b) for a, b in zip(row, ref)) <= LOGPROB_ATOL


def _with_reconstruction(mask, spec, seed: int, heads: bool = False):
    """`mask` with random FFN scales (around 1) and bias deltas in every layer (and the same for
    its kept heads and attention output when `heads`)."""
    gen = torch.Generator().manual_seed(seed)

    def vectors(sizes, scale, offset):
        return {layer: offset + scale * torch.randn(size, generator=gen)
                for layer, size in enumerate(sizes)}

    layers = range(spec.num_layers)
    mask = mask.with_scales(ffn_scales=vectors([mask.ffn[l].numel() for l in layers], 0.2, 1),
                            head_scales=vectors([mask.heads[l].numel() for l in layers], 0.2, 1)
                            if heads else None)
    return mask.with_bias(ffn_bias=vectors([spec.hidden_size] * len(layers), 0.02, 0),
                          attn_bias=vectors([spec.hidden_size] * len(layers), 0.02, 0)
                          if heads else None)


def _causal_expert(hf, mask, seed: int = 8):
    """A causal-LM Expert on SmolLM2 (random soft prompt, `mask` with its scales and bias
    deltas, its chat template) and texts to ask it."""
    from transformers import AutoTokenizer

    from doe_kernels.expert import CAUSAL_LM, label_token_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    words = ["negative", "positive"]
    prompt = 0.02 * torch.randn(6, hf.config.hidden_size,
                                generator=torch.Generator().manual_seed(seed))
    expert = doe_kernels.Expert(
        mask, prompt, CAUSAL_LM, words, label_words=words,
        label_token_ids=label_token_ids(tokenizer, words),
        template=doe_kernels.chat_template(tokenizer, "Negative or positive?"), max_length=64)
    texts = ["A tender, funny and wise film.", "Dull, long and pointless.",
             "I would watch it again tomorrow.", "The worst two hours of my year."]
    return expert, texts


def _embeds(expert, tokenizer, texts, model):
    """Per text, the input embeddings Expert.predict runs for it alone: the expert's soft prompt,
    then the text in its template (the reference for doe_kernels.vllm.expert_prompts)."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids, attention = expert.encode(tokenizer, [text])
            out.append(expert.model_inputs(model, ids, attention)["inputs_embeds"][0])
    return out


def _hf_generate_embeds(model, expert, tokenizer, text):
    """(tokens, log-probabilities) of the patched HF model's greedy continuation of the expert's
    prompt embeddings of `text` (no EOS)."""
    with doe_kernels.plugged(model, expert.mask):
        return _hf_generate(model, _embeds(expert, tokenizer, [text], model))


def _hf_label_choices(model, expert, tokenizer, texts):
    """Per text, the label word's first token the patched HF model ranks highest after the
    expert's prompt embeddings, and its log-probability over the whole vocabulary (what vLLM
    reports for a token chosen under allowed_token_ids)."""
    labels = torch.tensor(expert.label_token_ids)
    choices = []
    with torch.no_grad(), doe_kernels.plugged(model, expert.mask):
        for embeds in _embeds(expert, tokenizer, texts, model):
            step = torch.log_softmax(model(inputs_embeds=embeds[None]).logits[0, -1].double(), -1)
            token = int(labels[step[labels].argmax()])
            choices.append((token, float(step[token])))
    return choices


@pytest.fixture(scope="class")
def smol():
    """SmolLM2 at tensor-parallel size 1: the engine, the HF model, prompts, masks, dense output."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_dir()
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = doe_kernels.models.spec_of(hf)
    gen = torch.Generator().manual_seed(0)
    # the last prompt spans more than one KV block (128 tokens): a stale prefix cache would
    # hand a plugged expert the dense model's blocks
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (5, 17, 160)]
    masks = dict(
        a=doe_kernels.ExpertMask.random(hf, ffn_keep=0.75, seed=0),
        b=_with_reconstruction(doe_kernels.ExpertMask.random(hf, ffn_keep=0.6, seed=1),
                               spec, seed=2),
        # 6 of 9 heads per layer (some KV groups lose every query head), with head scales and
        # attention bias deltas
        heads=_with_reconstruction(doe_kernels.ExpertMask.random(hf, ffn_keep=0.5,
                                                                 heads_keep=0.67, seed=5),
                                   spec, seed=6, heads=True))
    # HuggingFace first: it runs faster before the engine's processes share the CPU
    hf_out = dict(dense=_hf_generate(hf, prompts),
                  **{name: _hf_patched(hf, mask, prompts) for name, mask in masks.items()})
    expert, texts = _causal_expert(hf, masks["b"])
    other, _ = _causal_expert(hf, masks["heads"], seed=9)
    tokenizer = AutoTokenizer.from_pretrained(path)
    expert_out = dict(answers=expert.predict(hf, tokenizer, texts),
                      other_answers=other.predict(hf, tokenizer, texts),
                      choices=_hf_label_choices(hf, expert, tokenizer, texts),
                      other_choices=_hf_label_choices(hf, other, tokenizer, texts),
                      generated=_hf_generate_embeds(hf, expert, tokenizer, texts[0]))
    llm = _start_engine(path, tp=1, enable_prompt_embeds=True)
    dense = _generate(llm, prompts)  # before any plug
    yield dict(llm=llm, hf=hf, hf_out=hf_out, spec=spec, prompts=prompts, masks=masks,
               dense=dense, expert=expert, other=other, texts=texts, tokenizer=tokenizer,
               expert_out=expert_out)
    _stop_engine(llm)


class TestSmolLM2:
    """Tensor-parallel size 1 on SmolLM2-135M."""

    def test_dense_engine_matches_hf(self, smol):
        assert_same_generation(smol["dense"], smol["hf_out"]["dense"])

    def test_plug_matches_hf_patched(self, smol):
        llm, prompts, mask = smol["llm"], smol["prompts"], smol["masks"]["a"]
        dkv.plug(llm, mask)
        assert_same_generation(_generate(llm, prompts), smol["hf_out"]["a"])
        assert dkv.status(llm)[0]["kept"] == [mask.ffn[l].numel() for l in range(30)]

    def test_swap_with_scales_and_bias_then_unplug(self, smol):
        llm, prompts, mask = smol["llm"], smol["prompts"], smol["masks"]["b"]
        dkv.plug(llm, smol["masks"]["a"])
        dkv.plug(llm, mask)  # swap
        assert_same_generation(_generate(llm, prompts), smol["hf_out"]["b"])
        dkv.unplug(llm)
        assert_same_generation(_generate(llm, prompts), smol["dense"], exact=True)
        assert dkv.status(llm)[0]["kept"] == [None] * 30
        dkv.unplug(llm)  # unplugging twice is a no-op

    def test_heads_pruned_with_reconstruction(self, smol):
        llm, prompts, mask = smol["llm"], smol["prompts"], smol["masks"]["heads"]
        dkv.plug(llm, mask)
        assert_same_generation(_generate(llm, prompts), smol["hf_out"]["heads"])
        assert dkv.status(llm)[0]["kept_heads"] == [mask.heads[l].numel() for l in range(30)]
        dkv.plug(llm, smol["masks"]["a"])  # a swap back to every head
        assert dkv.status(llm)[0]["kept_heads"] == [None] * 30
        assert_same_generation(_generate(llm, prompts), smol["hf_out"]["a"])
        dkv.unplug(llm)

    def test_a_batch_of_prompts(self, smol):
        """All prompts in one generate call (vLLM batches them): the same tokens and log-probs
        as the patched HF model, each prompt alone."""
        from vllm import SamplingParams

        llm, prompts, mask = smol["llm"], smol["prompts"], smol["masks"]["heads"]
        dkv.plug(llm, mask)
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                logprobs=0)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params,
                            use_tqdm=False)
        assert_same_generation(_results(outs), smol["hf_out"]["heads"])
        dkv.unplug(llm)

    def test_keep_everything(self, smol):
        llm, prompts, spec = smol["llm"], smol["prompts"], smol["spec"]
        keep_all = doe_kernels.ExpertMask.random(smol["hf"], ffn_keep=1.0)
        dkv.plug(llm, keep_all)  # vLLM's own forward in every layer
        assert_same_generation(_generate(llm, prompts), smol["dense"], exact=True)
        unit_scales = keep_all.with_scales(ffn_scales={l: torch.ones(spec.intermediate_size)
                                                       for l in range(spec.num_layers)})
        dkv.plug(llm, unit_scales)  # the gather kernels over every neuron
        assert dkv.status(llm)[0]["kept"] == [spec.intermediate_size] * spec.num_layers
        assert_same_generation(_generate(llm, prompts), smol["dense"])
        dkv.unplug(llm)

    def test_bad_masks_are_refused_and_change_nothing(self, smol):
        llm, prompts, spec = smol["llm"], smol["prompts"], smol["spec"]
        mask = smol["masks"]["a"]
        dkv.plug(llm, mask)
        before = _generate(llm, prompts)
        size = spec.intermediate_size
        bad = {
            "out of range": doe_kernels.ExpertMask({0: [0, size]}),
            "layers": doe_kernels.ExpertMask({30: [0]}),
            "made for a model with": mask.replace(spec=dict(mask.spec, intermediate_size=size * 2)),
            # without the sizes it records (checked when a mask is made): the engine's check
            "out of range for 9 heads": mask.replace(heads={3: [0, 9]}, spec={}),
            "hidden size": mask.with_bias(attn_bias={0: torch.zeros(spec.hidden_size + 1)}),
            "one scale per kept unit": doe_kernels.ExpertMask({}, ffn_scales={0: [1.0, 2.0]}),
        }
        for message, bad_mask in bad.items():
            with pytest.raises(ValueError, match=message):
                dkv.plug(llm, bad_mask)
        with pytest.raises(TypeError, match="ExpertMask or Expert"):
            dkv.plug(llm, {0: [1, 2]})
        # the same computation as `before`, not one that reuses its cached prefix blocks: the
        # kernels' rounding may depend on how many rows a call gets
        assert llm.reset_prefix_cache()
        assert_same_generation(_generate(llm, prompts), before, exact=True)
        dkv.unplug(llm)

    def test_an_experts_soft_prompt_as_prompt_embeddings(self, smol, monkeypatch):
        """The expert's answers equal Expert.predict on the HF model, the chosen label tokens'
        log-probabilities the patched HF model's; its generation from the prompt embeddings
        equals the patched HF model's from the same embeddings."""
        from vllm import SamplingParams

        llm, expert, texts, tokenizer = (smol[k] for k in ("llm", "expert", "texts", "tokenizer"))
        embeddings = smol["hf"].get_input_embeddings().weight
        dkv.plug(llm, expert)
        outputs = _capture_with_logprobs(llm, monkeypatch)
        assert dkv.answer(llm, expert, tokenizer, texts, embeddings) == \
            smol["expert_out"]["answers"]
        assert_same_generation(_results(outputs), _as_generation(smol["expert_out"]["choices"]))
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
        out = llm.generate(dkv.expert_prompts(expert, tokenizer, texts[:1], embeddings), params,
                           use_tqdm=False)
        assert_same_generation(_results(out), smol["expert_out"]["generated"])
        dkv.unplug(llm)
        with pytest.raises(ValueError, match="causal-LM Expert"):
            dkv.expert_prompts(None, tokenizer, texts, embeddings)
        with pytest.raises(ValueError, match="an expert of another model"):
            dkv.expert_prompts(expert, tokenizer, texts, embeddings[:, :100])

    def test_mixed_batch_each_request_on_its_expert(self, smol):
        """Two held experts and the plugged one in the same engine steps (requests interleaved,
        so every step regroups its rows): each request generates what the patched HF model
        generates with its expert alone; without them the engine is dense again, bit for bit."""
        llm, prompts, masks = smol["llm"], smol["prompts"], smol["masks"]
        dkv.plug(llm, masks["a"])  # for the requests that name no expert
        dkv.add(llm, "b", masks["b"])
        dkv.add(llm, "heads", masks["heads"])
        try:
            assert dkv.experts(llm) == ["b", "heads"]
            assert dkv.status(llm)[0]["experts"] == ["b", "heads"]
            references = {**smol["hf_out"], None: smol["hf_out"]["a"]}
            # two requests per expert, then one (decoding then takes the union of the neurons)
            for requests in ([("heads", 0), (None, 1), ("b", 2), ("b", 0), ("heads", 2),
                              (None, 0)], [("b", 1), (None, 2), ("heads", 1)]):
                got = _generate_mixed(llm, [(name, prompts[i]) for name, i in requests])
                assert_same_generation(got, _expected_mixed(references, requests))
        finally:
            dkv.remove(llm, "b")
            dkv.remove(llm, "heads")
            dkv.unplug(llm)
        assert dkv.experts(llm) == []
        assert_same_generation(_generate(llm, prompts), smol["dense"], exact=True)

    def test_mixed_prefix_cache_is_per_expert(self, smol):
        """The 160-token prompt under one expert, then under another: the second computes its own
        KV blocks (the engine salts the prefix cache per expert) and plugs nothing."""
        llm, prompt, masks = smol["llm"], smol["prompts"][2], smol["masks"]
        dkv.add(llm, "b", masks["b"])
        dkv.add(llm, "heads", masks["heads"])
        try:
            for name in ("b", "heads", None):
                assert_same_generation(_generate_mixed(llm, [(name, prompt)]),
                                       _expected_mixed({**smol["hf_out"], None: smol["dense"]},
                                                       [(name, 2)]))
        finally:
            dkv.remove(llm, "b")
            dkv.remove(llm, "heads")

    def test_requests_naming_experts_their_own_way_are_checked_and_salted(self, smol):
        """Requests whose SamplingParams name an expert without for_experts: one naming a held
        expert runs on it, with its own prefix-cache salt (the dense request after it computes
        its own KV blocks for the same 160-token prompt); one naming an expert never added, or
        a removed one, is refused as the engine takes it, the call's other requests aborted, and
        the engine serves on."""
        from vllm import SamplingParams

        llm, prompt, masks = smol["llm"], smol["prompts"][2], smol["masks"]
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                logprobs=0)

        def raw(name):
            return params if name is None else SamplingParams(
                temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0,
                extra_args={"doe_expert": name})

        def run(name):
            return _results(llm.generate([{"prompt_token_ids": prompt}], raw(name),
                                         use_tqdm=False))

        dkv.add(llm, "b", masks["b"])
        try:
            assert_same_generation(run("b"), _expected_mixed(smol["hf_out"], [("b", 2)]))
            assert_same_generation(run(None), _expected_mixed({None: smol["dense"]},
                                                              [(None, 2)]))
            with pytest.raises(ValueError, match="names the expert 'tweets', which this engine "
                                                 r"does not hold \(held: \['b'\]\)"):
                llm.generate([{"prompt_token_ids": prompt}] * 2, [raw(None), raw("tweets")],
                             use_tqdm=False)
            assert llm.llm_engine.get_num_unfinished_requests() == 0
            llm.enqueue([{"prompt_token_ids": prompt}], raw("b"), use_tqdm=False)
            with pytest.raises(RuntimeError, match="requests naming the expert 'b' may be "
                                                   "unfinished"):
                dkv.remove(llm, "b")  # the queued request still runs on it
            queued = llm.wait_for_completion(use_tqdm=False)
            assert_same_generation(_results(queued), _expected_mixed(smol["hf_out"], [("b", 2)]))
        finally:
            dkv.remove(llm, "b")
        with pytest.raises(ValueError, match="names the expert 'b'"):
            run("b")
        assert_same_generation(run(None), _expected_mixed({None: smol["dense"]}, [(None, 2)]))

    def test_mixed_bad_input_is_refused_and_changes_nothing(self, smol):
        llm, prompts, mask = smol["llm"], smol["prompts"], smol["masks"]["a"]
        size = smol["spec"].intermediate_size
        dkv.add(llm, "a", mask)
        try:
            with pytest.raises(ValueError, match=r"no expert held under the names \['tweets'\]"):
                dkv.for_experts(llm, [("a", prompts[0]), ("tweets", prompts[1])])
            with pytest.raises(ValueError, match="non-empty string"):
                dkv.add(llm, "", mask)
            with pytest.raises(ValueError, match="out of range"):  # "a" keeps its expert
                dkv.add(llm, "a", doe_kernels.ExpertMask({0: [0, size]}))
            with pytest.raises(ValueError, match="2 sampling params for 1 requests"):
                dkv.for_experts(llm, [("a", prompts[0])], [None, None])
            with pytest.raises(KeyError, match="tweets"):
                dkv.remove(llm, "tweets")
            with pytest.raises(ValueError, match="non-empty string, got \\['a'\\]"):
                dkv.remove(llm, ["a"])
            for params in ("greedy", [None], {"temperature": 0}):
                with pytest.raises(TypeError, match="params must be a vllm.SamplingParams"):
                    dkv.for_experts(llm, [("a", prompts[0])], params)
            assert dkv.experts(llm) == ["a"]
            assert_same_generation(_generate_mixed(llm, [("a", prompts[1])]),
                                   _expected_mixed(smol["hf_out"], [("a", 1)]))
        finally:
            dkv.remove(llm, "a")

    def test_mixed_answers_of_two_soft_prompt_experts(self, smol, monkeypatch):
        llm, texts, tokenizer = smol["llm"], smol["texts"], smol["tokenizer"]
        experts = dict(first=smol["expert"], second=smol["other"])
        for name, expert in experts.items():
            dkv.add(llm, name, expert)
        try:
            requests = [("second", texts[0]), ("first", texts[0]), ("second", texts[3]),
                        ("first", texts[1]), ("second", texts[2]), ("first", texts[3])]
            expected = dict(first=smol["expert_out"]["answers"],
                            second=smol["expert_out"]["other_answers"])
            choices = dict(first=smol["expert_out"]["choices"],
                           second=smol["expert_out"]["other_choices"])
            embeddings = smol["hf"].get_input_embeddings().weight
            outputs = _capture_with_logprobs(llm, monkeypatch)
            assert dkv.answer_mixed(llm, experts, tokenizer, requests, embeddings) == [
                expected[name][texts.index(text)] for name, text in requests]
            assert_same_generation(_results(outputs), _as_generation(
                [choices[name][texts.index(text)] for name, text in requests]))
            with pytest.raises(ValueError, match="no Expert given"):
                dkv.answer_mixed(llm, experts, tokenizer, [("third", texts[0])], embeddings)
        finally:
            for name in experts:
                dkv.remove(llm, name)

    def test_engine_that_captures_cuda_graphs_is_refused(self, smol):
        import copy
        from types import SimpleNamespace

        from vllm.config import CompilationMode, CUDAGraphMode

        config = copy.copy(smol["llm"].llm_engine.vllm_config)
        config.compilation_config = copy.copy(config.compilation_config)
        config.compilation_config.mode = CompilationMode.VLLM_COMPILE  # a GPU's default
        config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        config.compilation_config.cudagraph_capture_sizes = [1, 2, 4]  # a GPU's (the CPU's: [])
        graphs = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config))
        with pytest.raises(RuntimeError, match="cudagraph_mode"):
            dkv.plug(graphs, smol["masks"]["a"])
        # not compiled, but capturing whole decode steps (a GPU engine with compilation off)
        config.compilation_config.mode = CompilationMode.NONE
        config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY
        config.compilation_config.cudagraph_capture_sizes = [1, 2, 4]
        with pytest.raises(RuntimeError, match="cudagraph_mode FULL_DECODE_ONLY"):
            dkv.plug(graphs, smol["masks"]["a"])
        config.compilation_config.cudagraph_capture_sizes = []  # the CPU platform's: no graphs
        assert dkv.worker.check_engine_config(config) is None
        config.compilation_config = smol["llm"].llm_engine.vllm_config.compilation_config
        config.parallel_config = copy.copy(config.parallel_config)
        config.parallel_config.worker_extension_cls = ""
        with pytest.raises(RuntimeError, match="worker_extension_cls"):
            dkv.plug(graphs, smol["masks"]["a"])


def _tiny_llama(path, seed: int = 0) -> str:
    """A random float32 Llama: 2 layers, hidden 256, 512 neurons, 8 heads / 4 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                         max_position_embeddings=1024, initializer_range=0.1,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="class", params=["eager", "compiled"])
def tp2(request, tmp_path_factory):
    """The random Llama at tensor-parallel size 2, on an eager engine and on a compiled one (the
    swap reaches the traced graph through doe_kernels.vllm.routes)."""
    from transformers import LlamaForCausalLM

    path = _tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = doe_kernels.models.spec_of(hf)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (4, 9, 30)]
    llm = _start_engine(path, tp=2, enforce_eager=request.param == "eager",
                        skip_tokenizer_init=True)
    dense = _generate(llm, prompts)
    yield dict(llm=llm, hf=hf, spec=spec, prompts=prompts, dense=dense)
    _stop_engine(llm)


class TestTensorParallel2:
    """Tensor-parallel size 2 on a small random Llama: each rank maps the global lists."""

    def test_dense_engine_matches_hf(self, tp2):
        assert_same_generation(tp2["dense"], _hf_generate(tp2["hf"], tp2["prompts"]))

    def test_plug_matches_hf_patched_then_unplug(self, tp2):
        llm, prompts, spec = tp2["llm"], tp2["prompts"], tp2["spec"]
        # layer 0: random neurons on both ranks; layer 1: rank 0's half only (rank 1 keeps none
        # and still joins the all-reduce)
        mask = doe_kernels.ExpertMask(
            {0: torch.randperm(512, generator=torch.Generator().manual_seed(3))[:300].sort().values,
             1: torch.arange(0, 256, 3)}, spec=spec.as_dict())
        mask = _with_reconstruction(mask, spec, seed=4)
        dkv.plug(llm, mask)
        kept = [rank["kept"] for rank in dkv.status(llm)]
        assert kept[1][1] == 0 and kept[0][0] + kept[1][0] == 300
        assert_same_generation(_generate(llm, prompts), _hf_patched(tp2["hf"], mask, prompts))
        dkv.unplug(llm)
        assert_same_generation(_generate(llm, prompts), tp2["dense"], exact=True)

    def test_heads_on_both_ranks_then_unplug(self, tp2):
        llm, prompts, spec = tp2["llm"], tp2["prompts"], tp2["spec"]
        # each rank holds 4 query heads and 2 KV heads. Layer 0: heads 1, 2 (rank 0; KV head 0
        # only) and 5, 6, 7 (rank 1; both KV heads); layer 1: rank 0's heads only, so rank 1
        # computes no query and adds zeros to the all-reduce
        mask = doe_kernels.ExpertMask({0: torch.arange(0, 512, 2), 1: torch.arange(100, 400)},
                                      heads={0: [1, 2, 5, 6, 7], 1: [0, 3]}, spec=spec.as_dict())
        mask = _with_reconstruction(mask, spec, seed=7, heads=True)
        dkv.plug(llm, mask)
        assert [rank["kept_heads"] for rank in dkv.status(llm)] == [[2, 2], [3, 0]]
        assert_same_generation(_generate(llm, prompts), _hf_patched(tp2["hf"], mask, prompts))
        dkv.unplug(llm)
        assert_same_generation(_generate(llm, prompts), tp2["dense"], exact=True)


    def test_mixed_batch_on_both_ranks(self, tp2):
        """Two held experts (heads and neurons split over both ranks) and the dense model in the
        same steps, each request equal to its expert alone on the patched HF model."""
        llm, prompts, spec, hf = tp2["llm"], tp2["prompts"], tp2["spec"], tp2["hf"]
        masks = dict(
            heads=_with_reconstruction(doe_kernels.ExpertMask(
                {0: torch.arange(0, 512, 2), 1: torch.arange(100, 400)},
                heads={0: [1, 2, 5, 6, 7], 1: [0, 3]}, spec=spec.as_dict()), spec, seed=9,
                heads=True),
            ffn=_with_reconstruction(doe_kernels.ExpertMask(
                {0: torch.arange(1, 512, 3), 1: torch.arange(0, 256)}, spec=spec.as_dict()),
                spec, seed=10))
        references = {name: _hf_patched(hf, mask, prompts) for name, mask in masks.items()}
        references[None] = tp2["dense"]
        for name, mask in masks.items():
            dkv.add(llm, name, mask)
        try:
            requests = [("ffn", 2), ("heads", 0), (None, 1), ("heads", 2), ("ffn", 1)]
            got = _generate_mixed(llm, [(name, prompts[i]) for name, i in requests])
            assert_same_generation(got, _expected_mixed(references, requests))
        finally:
            for name in masks:
                dkv.remove(llm, name)
        assert_same_generation(_generate(llm, prompts), tp2["dense"], exact=True)


@pytest.mark.parametrize("names, counts, rows, groups, group_counts, grouped", [
    ([None, None], [3, 2], 5, None, None, None),
    (["a", "a", None], [2, 1, 1], 4, ("a", None), [3, 1], None),
    (["a", None, "b", "a"], [1, 2, 1, 2], 7, ("a", None, "b"), [3, 3, 1],
     [0, 4, 5, 1, 2, 6, 3]),  # one padding row goes with the unnamed
    (["b", "a"], [0, 2], 2, ("b", "a", None), [0, 2, 0], None),
])
def test_step_layout_groups_rows_by_expert(names, counts, rows, groups, group_counts, grouped):
    from doe_kernels.vllm.mixed import layout_of

    layout = layout_of(names, counts, rows)
    if groups is None:
        assert layout is None
        return
    assert layout.names == groups and layout.counts == group_counts
    x = torch.arange(rows, dtype=torch.float32)[:, None]
    assert layout.grouped(x)[:, 0].tolist() == (grouped or list(range(rows)))
    assert torch.equal(layout.ungrouped(layout.grouped(x)), x)
    assert [stop - start for _, start, stop in layout.bounds()] == group_counts
    # the segmented ops' offsets, on the host (read there: no copy back from a GPU), made once
    segments = layout.segments()
    assert segments.device.type == "cpu" and segments is layout.segments()
    assert segments.tolist() == [sum(group_counts[:g]) for g in range(len(group_counts) + 1)]


def test_holding_an_expert_changes_a_rank_only_when_every_layer_is_ready(monkeypatch):
    """A stand-in rank of three layers: adding or removing an expert builds every layer's
    forwards before setting any, so one that fails (out of memory, say) leaves the rank's
    forwards, plans and held names as they were; one that works sets them all."""
    from types import SimpleNamespace

    from doe_kernels.vllm import worker

    layers = [(SimpleNamespace(qkv_proj=SimpleNamespace(), o_proj=SimpleNamespace()),
               SimpleNamespace()) for _ in range(3)]
    rank = worker.WorkerExtension()
    rank._doe_layers_cache, rank.model_runner = layers, None
    monkeypatch.setattr(worker, "watch_steps", lambda *args: None)
    built = []

    def forwards_of(attn, mlp, attn_plan, ffn_plan, held):
        if len(built) == 1 and "bad" in held:
            raise torch.OutOfMemoryError("CUDA out of memory")
        built.append(sorted(held))
        return tuple(f"{sorted(held)} {name}" for name in ("mlp", "qkv", "o"))

    monkeypatch.setattr(worker, "_forwards_of", forwards_of)
    plans = [(None, None)] * 3
    good, bad = doe_kernels.ExpertMask({0: [1]}), doe_kernels.ExpertMask({0: [2]})
    rank._doe_stage("t1", plans, good)  # as doe_check_mask stages them
    assert rank.doe_add_expert("good", "t1") == 0
    assert rank.doe_experts() == ["good"] and mlp_forwards(layers) == ["['good'] mlp"] * 3
    rank._doe_stage("t2", plans, bad)
    built.clear()
    with pytest.raises(torch.OutOfMemoryError):
        rank.doe_add_expert("bad", "t2")
    assert rank.doe_experts() == ["good"] and mlp_forwards(layers) == ["['good'] mlp"] * 3
    assert rank._doe_masks() == {"good": good}  # what a weight reload builds again
    assert rank.doe_remove_expert("good") and rank.doe_experts() == []
    assert mlp_forwards(layers) == ["[] mlp"] * 3 and rank._doe_masks() == {}


def test_a_model_type_patch_refuses_is_refused_on_a_rank_too(monkeypatch):
    """A model whose layers hold the LLaMA family's modules but whose type computes otherwise
    (Qwen3's normed queries and keys) was plugged: now refused as `patch` refuses it. A rank
    nothing was plugged into unplugs as a no-op without checking its layers, and its status
    names what is unsupported instead of failing in the worker."""
    from types import SimpleNamespace

    from doe_kernels.vllm import engine, worker

    rank = worker.WorkerExtension()
    rank.model_runner = SimpleNamespace(model=SimpleNamespace())
    rank.vllm_config = SimpleNamespace(model_config=SimpleNamespace(
        hf_text_config=SimpleNamespace(model_type="qwen3")))
    monkeypatch.setattr(worker, "decoder_layers", lambda model: [object(), object()])
    monkeypatch.setattr(worker, "attention_of", lambda layer, index: SimpleNamespace())
    monkeypatch.setattr(worker, "ffn_of", lambda layer, index: SimpleNamespace())
    monkeypatch.setattr(worker, "_watch_reloads", lambda rank: None)
    assert rank.doe_unplug() == 0
    with pytest.raises(doe_kernels.UnsupportedModelError,
                       match=r"model_type 'qwen3'\) is not supported: its layers hold the llama "
                             r"family's modules"):
        rank._doe_layers()
    reply = rank.doe_status()
    assert "model_type 'qwen3'" in reply["error"]
    with pytest.raises(doe_kernels.UnsupportedModelError, match="model_type 'qwen3'"):
        engine.statuses([reply])
    rank.vllm_config.model_config.hf_text_config.model_type = "qwen2"
    assert len(rank._doe_layers()) == 2
    # a checkpoint in Mistral's own format: model_type "transformer", by its architecture
    mistral = SimpleNamespace(hf_text_config=SimpleNamespace(model_type="transformer"),
                              architectures=["MistralForCausalLM"])
    assert worker._model_type(mistral) == "mistral"
    mistral.architectures = ["SomethingElse"]
    assert worker._model_type(mistral) == "transformer"


def _stand_in_rank(monkeypatch, layers: int = 2):
    """A WorkerExtension over stand-in layers whose forwards name the experts they serve, and a
    stand-in model runner holding `requests` (req_id -> request naming an expert or none)."""
    from types import SimpleNamespace

    from doe_kernels.vllm import worker

    rank = worker.WorkerExtension()
    rank._doe_layers_cache = [(SimpleNamespace(qkv_proj=SimpleNamespace(),
                                               o_proj=SimpleNamespace()), SimpleNamespace())
                              for _ in range(layers)]
    rank.model_runner = SimpleNamespace(requests={})
    monkeypatch.setattr(worker, "watch_steps", lambda *args: None)
    monkeypatch.setattr(worker, "_forwards_of", lambda attn, mlp, attn_plan, ffn_plan, held: (
        f"{sorted(held)} mlp", None, None))
    return rank


def _naming(name):
    from types import SimpleNamespace

    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"doe_expert": name}))


def test_an_expert_removed_while_a_request_names_it_retires(monkeypatch):
    """A request aborted between steps still sits in the runner when its expert is removed (the
    server's gate has let the remove through): the expert stops being listed at once, but keeps
    serving until no request names it, after a step; then it is dropped. Adding the name again
    takes it back."""
    rank = _stand_in_rank(monkeypatch)
    plans = [(None, None)] * 2
    for name in ("a", "b"):
        rank._doe_stage(name, plans, doe_kernels.ExpertMask({0: [1]}))
        rank.doe_add_expert(name, name)
    rank.model_runner.requests = {"r1": _naming("a"), "r2": _naming(None)}
    assert rank.doe_remove_expert("a") and rank.doe_experts() == ["b"]
    assert not rank.doe_remove_expert("a")  # no longer held, as far as callers can tell
    assert mlp_forwards(rank._doe_layers_cache) == ["['a', 'b'] mlp"] * 2  # still serving r1
    assert sorted(rank._doe_masks()) == ["a", "b"]  # what a weight reload builds again
    rank._doe_drop_retired()  # a step: r1 is still there
    assert mlp_forwards(rank._doe_layers_cache) == ["['a', 'b'] mlp"] * 2
    del rank.model_runner.requests["r1"]  # the step that dropped the aborted request
    rank._doe_drop_retired()
    assert mlp_forwards(rank._doe_layers_cache) == ["['b'] mlp"] * 2
    assert sorted(rank._doe_masks()) == ["b"] and rank.doe_experts() == ["b"]
    rank.model_runner.requests = {"r3": _naming("b")}
    assert rank.doe_remove_expert("b") and rank.doe_experts() == []
    rank._doe_stage("t", plans, doe_kernels.ExpertMask({0: [2]}))
    rank.doe_add_expert("b", "t")  # added again before it was dropped: held, listed, kept
    assert rank.doe_experts() == ["b"]
    del rank.model_runner.requests["r3"]
    rank._doe_drop_retired()
    assert rank.doe_experts() == ["b"] and mlp_forwards(rank._doe_layers_cache) == \
        ["['b'] mlp"] * 2


def test_the_engine_admits_only_requests_naming_held_experts_and_salts_them():
    """doe_kernels.vllm.admission on a stand-in engine: a request naming no expert passes as it
    is; one naming a held expert gets its salt (over the prompt's own salt, whatever form the
    prompt takes); one naming another, or naming with anything but a non-empty string, is
    refused before the engine sees it, as is one naming none with a salt that could pass for an
    expert's; the names follow the ranks' after a refresh. A name admitted since the engine was
    last idle may be pending (remove refuses it); the guard makes no reference cycle."""
    import weakref
    from types import SimpleNamespace

    from doe_kernels.vllm import admission
    from doe_kernels.vllm.protocol import cache_salt

    taken, held = [], [["a"]]

    class Engine:
        unfinished = 0

        def add_request(self, request_id, prompt, params, arrival_time=None, priority=0):
            taken.append((request_id, prompt, priority))
            return request_id

        def get_num_unfinished_requests(self):
            return self.unfinished

    class LLM:
        def __init__(self):
            self.llm_engine = Engine()

        def collective_rpc(self, method):
            return held[0] if method == "doe_experts" else None

    llm = LLM()
    guard = admission.guard(llm)
    assert admission.guard(llm) is guard  # installed once

    def params(name):
        return SimpleNamespace(extra_args=None if name is None else {"doe_expert": name})

    engine = llm.llm_engine
    assert engine.add_request("0", {"prompt": "x"}, params(None), priority=3) == "0"
    engine.add_request("1", {"prompt": "x", "cache_salt": "mine"}, params("a"))
    engine.add_request("2", "text", params=params("a"))
    engine.add_request("3", [1, 2], params("a"))
    core = SimpleNamespace(sampling_params=params("a"), cache_salt=None)
    engine.add_request("4", core, None)
    assert taken == [("0", {"prompt": "x"}, 3),
                     ("1", {"prompt": "x", "cache_salt": cache_salt("a", "mine")}, 0),
                     ("2", {"prompt": "text", "cache_salt": cache_salt("a")}, 0),
                     ("3", {"prompt_token_ids": [1, 2], "cache_salt": cache_salt("a")}, 0),
                     ("4", core, 0)]
    assert core.cache_salt == cache_salt("a")
    for name, match in (("b", r"names the expert 'b', which this engine does not hold "
                              r"\(held: \['a'\]\)"), ("", "non-empty string"),
                        (3, "non-empty string")):
        with pytest.raises(ValueError, match=match):
            engine.add_request("5", {"prompt": "x"}, params(name))
    with pytest.raises(ValueError, match="own cache_salt may not start with 'doe_kernels-'"):
        engine.add_request("5", {"prompt": "x", "cache_salt": cache_salt("a")}, params(None))
    held[0] = ["b"]  # an add of "b" and a remove of "a" on the ranks
    guard.refresh()
    engine.add_request("6", {"prompt": "x"}, params("b"))
    with pytest.raises(ValueError, match="names the expert 'a'"):
        engine.add_request("7", {"prompt": "x"}, params("a"))
    assert [request[0] for request in taken] == ["0", "1", "2", "3", "4", "6"]
    assert not guard.may_be_pending("b")  # the engine is idle: every request finished
    engine.unfinished = 1
    engine.add_request("8", {"prompt": "x"}, params("b"))
    assert guard.may_be_pending("b") and not guard.may_be_pending("a")
    engine.unfinished = 0
    assert not guard.may_be_pending("b")
    engine_ref, guard_ref = weakref.ref(engine), weakref.ref(guard)
    del llm, engine, guard
    assert engine_ref() is None and guard_ref() is None  # freed without the garbage collector


class _StandInLLM:
    """A stand-in vllm.LLM for doe_kernels.vllm.engine: `ranks` ranks that accept every mask and
    hold what `doe_add_expert` adds, an engine whose `unfinished` requests the test sets (its
    prefix cache cannot be reset while there are any); `calls` lists the worker methods run,
    `taken` the requests the engine took, `during` (method -> function) runs inside an RPC."""

    def __init__(self, ranks: int = 1):
        from types import SimpleNamespace

        from vllm.config import CUDAGraphMode

        from doe_kernels.vllm.engine import EXTENSION

        self.ranks, self.held, self.calls, self.taken, self.during = ranks, [], [], [], {}
        self.remove_replies = None  # (per rank; None: whether the name is held)
        config = SimpleNamespace(
            parallel_config=SimpleNamespace(worker_extension_cls=EXTENSION,
                                            pipeline_parallel_size=1),
            compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.NONE,
                                               cudagraph_capture_sizes=[]))
        llm = self

        class Engine:
            vllm_config, unfinished = config, 0

            def add_request(self, request_id, prompt, params):
                llm.during.get("add_request", lambda: None)()
                llm.taken.append(prompt)

            def get_num_unfinished_requests(self):
                return self.unfinished

        self.llm_engine = Engine()

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        self.during.get(method, lambda: None)()
        if method == "doe_add_expert" and args[0] not in self.held:
            self.held.append(args[0])
        if method == "doe_remove_expert":
            replies = self.remove_replies or [args[0] in self.held] * self.ranks
            self.held = [name for name in self.held if name != args[0]]
            return replies
        return [list(self.held) if method == "doe_experts" else None] * self.ranks

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return self.llm_engine.unfinished == 0

    def request(self, name, own_salt=None):
        """A request naming `name` (None: none), as LLM.generate hands it to the engine."""
        from vllm import SamplingParams

        prompt = {"prompt_token_ids": [1, 2], **({} if own_salt is None else
                                                  {"cache_salt": own_salt})}
        self.llm_engine.add_request(str(len(self.taken)), prompt, SamplingParams(
            extra_args=None if name is None else {"doe_expert": name}))
        return self.taken[-1].get("cache_salt")


MASK = doe_kernels.ExpertMask({0: [1]})


def test_first_calls_from_two_threads_install_one_guard():
    """Two threads making their first doe_kernels.vllm call on one engine at once installed two
    guards, the second wrapping the first's add_request: every later request failed (KeyError
    'prompt'). One guard is installed, and both experts' requests are admitted."""
    import threading
    import time

    llm = _StandInLLM()
    llm.during["doe_experts"] = lambda: time.sleep(0.2)  # an RPC takes a while
    threads = [threading.Thread(target=dkv.add, args=(llm, name, MASK)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(dkv.experts(llm)) == ["a", "b"]
    assert llm.request("a") != llm.request("b")  # each its expert's salt
    assert llm.request(None) is None and len(llm.taken) == 3


def test_replacing_an_expert_requests_may_still_name_is_refused_before_any_rpc():
    """An add of a held name while a request naming it may be unfinished swapped the expert
    under that request (its tokens half one expert's, half the other's): refused, as `remove`
    is, nothing asked of any rank. Once the engine is idle the add replaces it, and the name's
    requests get a new salt (the replaced expert's KV blocks unreachable, no reset needed)."""
    from doe_kernels.vllm.protocol import cache_salt

    llm = _StandInLLM()
    dkv.add(llm, "a", MASK)
    first = llm.request("a", "own")
    llm.llm_engine.unfinished = 1
    calls = len(llm.calls)
    with pytest.raises(RuntimeError, match="requests naming the expert 'a' may be unfinished.*"
                                           r"before replacing it \(nothing was changed\)"):
        dkv.add(llm, "a", MASK)
    assert llm.calls[calls:] == []
    dkv.add(llm, "b", MASK)  # another name: added beside the running request
    llm.llm_engine.unfinished = 0
    dkv.add(llm, "a", MASK)
    assert first == cache_salt("a", "own", 1)
    assert llm.request("a", "own") == cache_salt("a", "own", 2) != first
    assert llm.request("b") == cache_salt("b", None, 1)


def test_adding_and_removing_experts_leave_the_prefix_cache_alone():
    """add and remove reset no prefix cache (it dropped every expert's and the dense model's
    cached blocks, and raised on a busy engine after the add had worked): each add of a name
    gives its requests a salt of their own."""
    llm = _StandInLLM()
    llm.llm_engine.unfinished = 1  # a request naming no expert runs
    dkv.add(llm, "a", MASK)
    dkv.add(llm, "b", MASK)
    dkv.remove(llm, "a")
    assert dkv.experts(llm) == ["b"] and "reset_prefix_cache" not in llm.calls
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        dkv.plug(llm, MASK)  # plug changes the unnamed model: it still resets


def test_no_request_naming_an_expert_is_admitted_while_it_is_added_or_removed():
    """A request admitted between remove's check and its RPC reached the engine naming a removed
    expert (the engine core dies on it): while an add or remove of a name runs, requests naming
    it are refused, as is another add or remove of it; a request the guard admitted but the
    engine does not count yet keeps remove from going on."""
    llm = _StandInLLM()
    dkv.add(llm, "a", MASK)
    refused = []

    def request_and_add():
        for call in (lambda: llm.request("a"), lambda: dkv.add(llm, "a", MASK)):
            with pytest.raises(Exception) as error:
                call()
            refused.append((type(error.value), str(error.value)))
        llm.request(None)  # requests naming no expert pass

    llm.during["doe_remove_expert"] = request_and_add
    dkv.remove(llm, "a")
    assert [kind for kind, _ in refused] == [ValueError, RuntimeError]
    assert "names the expert 'a', which is being added or removed" in refused[0][1]
    assert "being added or removed by another call" in refused[1][1]
    dkv.add(llm, "a", MASK)
    llm.during = dict(add_request=lambda: pytest.raises(RuntimeError, dkv.remove, llm, "a"))
    llm.request("a")  # the engine counts it only once add_request returns
    assert dkv.experts(llm) == ["a"]


def test_a_request_named_none_runs_on_no_held_expert():
    """for_experts with None for a request whose params name an expert kept the params' name:
    None means the plugged expert or the dense model."""
    from vllm import SamplingParams

    from doe_kernels.vllm.admission import naming

    llm = _StandInLLM()
    dkv.add(llm, "a", MASK)
    params = SamplingParams(extra_args={"doe_expert": "a", "mine": 1})
    _, named = dkv.for_experts(llm, [(None, [1]), ("a", [2])], params)
    assert named[0].extra_args == {"mine": 1} and named[1].extra_args["doe_expert"] == "a"
    assert params.extra_args == {"doe_expert": "a", "mine": 1}
    assert naming(SamplingParams(extra_args={"doe_expert": "a"}), None).extra_args is None
    plain = SamplingParams()
    assert naming(plain, None) is plain


def test_removing_a_name_only_some_ranks_hold_names_them():
    """As http.remove: a remove that some ranks did says which (it said no rank held it)."""
    llm = _StandInLLM(ranks=2)
    dkv.add(llm, "a", MASK)
    llm.remove_replies = [True, False]
    with pytest.raises(KeyError, match=r"held by ranks \[0\] only, and is removed from them "
                                       r"\(not held by ranks \[1\]\)"):
        dkv.remove(llm, "a")
    llm.remove_replies = [False, False]
    with pytest.raises(KeyError, match=r"no expert named 'b' is held \(held: \[\]\)"):
        dkv.remove(llm, "b")


def test_the_step_after_a_retiring_experts_last_request_drops_it(monkeypatch):
    """The worker's step hook (watch_steps' after_step) drops a retiring expert once the step has
    dropped the requests naming it, through the model runner's own execute_model."""
    from types import SimpleNamespace

    from doe_kernels.vllm import mixed, worker

    rank = _stand_in_rank(monkeypatch)
    monkeypatch.setattr(worker, "watch_steps", mixed.watch_steps)  # the real hook, this time
    runner = rank.model_runner
    runner.input_batch = SimpleNamespace(req_ids=[], num_reqs=0)
    runner._model_forward = lambda **kwargs: None

    def execute_model(output):  # vLLM's: drop the finished requests, then run the model
        for req_id in output.finished_req_ids:
            runner.requests.pop(req_id)
        runner._model_forward(input_ids=torch.zeros(1))

    runner.execute_model = execute_model
    rank._doe_stage("t", [(None, None)] * 2, doe_kernels.ExpertMask({0: [1]}))
    rank.doe_add_expert("a", "t")  # installs the step hook
    runner.requests = {"r1": _naming("a")}
    assert rank.doe_remove_expert("a") and rank.doe_experts() == []
    assert mlp_forwards(rank._doe_layers_cache) == ["['a'] mlp"] * 2
    runner.execute_model(SimpleNamespace(finished_req_ids={"r1"}, num_scheduled_tokens={}))
    assert mlp_forwards(rank._doe_layers_cache) == ["[] mlp"] * 2 and rank._doe_masks() == {}


def test_swaps_checked_at_once_each_apply_their_own_plan(monkeypatch):
    """Two callers' swaps checked before either applies: each applies its own staged plan (a
    rank stages one per token); a discard drops only its own; the oldest goes past STAGED."""
    from doe_kernels.vllm import worker

    rank = _stand_in_rank(monkeypatch)
    plans = [(None, None)] * 2
    masks = {name: doe_kernels.ExpertMask({0: [index]}) for index, name in enumerate("abc")}
    for name in "abc":
        rank._doe_stage(f"t{name}", plans, masks[name])
    rank.doe_discard_mask("tc")
    rank.doe_add_expert("b", "tb")
    rank.doe_add_expert("a", "ta")
    assert rank._doe_masks() == {"b": masks["b"], "a": masks["a"]}
    with pytest.raises(RuntimeError, match="no mask is staged under this token"):
        rank.doe_add_expert("c", "tc")
    for index in range(worker.STAGED + 1):
        rank._doe_stage(f"s{index}", plans, masks["a"])
    assert list(rank._doe_staged()) == [f"s{i}" for i in range(1, worker.STAGED + 1)]
    rank.doe_discard_mask()
    assert rank._doe_staged() == {}


def test_a_compiled_graph_that_never_calls_the_routes_is_refused():
    """A compiled model loaded from vLLM's compile cache of a run without the extension never
    calls the routes: plug would report an expert that the engine does not serve."""
    from types import SimpleNamespace

    from vllm.config import CompilationMode

    from doe_kernels.vllm.routes import add_route
    from doe_kernels.vllm.worker import WorkerExtension

    attn = SimpleNamespace(qkv_proj=torch.nn.Linear(4, 12), o_proj=torch.nn.Linear(4, 4))
    mlp = torch.nn.Linear(4, 4)
    routes = [add_route(module, 4) for module in (mlp, attn.qkv_proj, attn.o_proj)]
    worker = SimpleNamespace(vllm_config=SimpleNamespace(compilation_config=SimpleNamespace(
        mode=CompilationMode.VLLM_COMPILE)))
    with pytest.raises(RuntimeError, match="never calls layer 0's doe_kernels routes"):
        WorkerExtension._doe_check_routes(worker, [(attn, mlp)])
    with torch.no_grad():
        for module in (mlp, attn.qkv_proj, attn.o_proj):
            module(torch.randn(2, 4))
    assert all(route.calls == 1 for route in routes)
    WorkerExtension._doe_check_routes(worker, [(attn, mlp)])


def test_a_corrupt_mask_payload_is_refused_as_a_mask_error():
    """safetensors' own error is not a ValueError: a worker passed it up the RPC instead of
    answering that the mask (not the model) is wrong."""
    import base64

    from doe_kernels.vllm.protocol import decode_mask, encode_mask

    with pytest.raises(ValueError, match="the mask's tensors are not a safetensors payload"):
        decode_mask(base64.b64encode(b"garbage-bytes-xx").decode(), "null")
    tensors, _ = encode_mask(doe_kernels.ExpertMask({0: [1]}))
    with pytest.raises(ValueError, match="the mask's spec is not JSON"):
        decode_mask(tensors, "{")


def test_expert_prompts_refuse_a_tokenizer_of_other_label_tokens():
    """As Expert.predict does: a tokenizer that encodes the label words to other tokens than the
    expert was trained with would make `answer` pick labels by the wrong tokens."""
    from transformers import AutoTokenizer

    from doe_kernels.expert import CAUSAL_LM, label_token_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    words = ["negative", "positive"]
    trained = [token + 1 for token in label_token_ids(tokenizer, words)]  # another tokenizer's
    expert = doe_kernels.Expert(None, torch.zeros(2, 8), CAUSAL_LM, words, label_words=words,
                                label_token_ids=trained)
    embeddings = torch.randn(len(tokenizer), 8)
    with pytest.raises(ValueError, match="encodes the label words"):
        dkv.expert_prompts(expert, tokenizer, ["A fine film."], embeddings)
    expert.label_token_ids = label_token_ids(tokenizer, words)
    assert dkv.expert_prompts(expert, tokenizer, ["A fine film."], embeddings)[0][
        "prompt_embeds"].shape[1] == 8


def mlp_forwards(layers) -> list:
    return [mlp.__dict__.get("forward") for _, mlp in layers]


def test_plug_on_ranks_prepares_every_layer_only_for_an_expert_to_hold():
    from doe_kernels.vllm.protocol import plug_on_ranks

    checks = []

    def call(method, args):
        if method == "doe_check_mask":
            checks.append(args[3])
        return [None]

    plug_on_ranks(call, doe_kernels.ExpertMask({0: [1]}))
    plug_on_ranks(call, doe_kernels.ExpertMask({0: [1]}), "doe_add_expert", "name")
    assert checks == [False, True]


def test_micro_batching_engines_are_refused():
    """vLLM's micro-batching runs the model once per slice of a step's tokens, in threads of its
    own, while the step's layout describes all of them (a slice's rows would go to other
    experts): refused, as CUDA graphs and pipeline parallelism are."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode

    from doe_kernels.vllm.worker import check_engine_config

    parallel = SimpleNamespace(pipeline_parallel_size=1, use_ubatching=True)
    config = SimpleNamespace(parallel_config=parallel, compilation_config=SimpleNamespace(
        cudagraph_mode=CUDAGraphMode.NONE, cudagraph_capture_sizes=[]))
    with pytest.raises(RuntimeError, match="micro-batching"):
        check_engine_config(config)
    parallel.use_ubatching = False
    assert check_engine_config(config) is None


def test_watch_steps_sets_each_steps_layout():
    """A stand-in model runner: the layout its forward sees comes from the batch order and the
    scheduled tokens; none outside a step; an unknown name is an error naming it; `after_step`
    runs after every step, failed ones too; `named_experts` reads the runner's requests."""
    from types import SimpleNamespace

    from doe_kernels.vllm import mixed

    seen, steps = [], []

    def request(req_id, name):
        extra = None if name is None else {mixed.EXTRA_ARG: name}
        return SimpleNamespace(req_id=req_id, sampling_params=SimpleNamespace(extra_args=extra))

    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=["r2", "r1", "r3"], num_reqs=3),
        requests=dict(r1=request("r1", "a"), r2=request("r2", None), r3=request("r3", "a")),
        _model_forward=lambda **kwargs: seen.append(mixed.current_step()))
    runner.execute_model = lambda output: runner._model_forward(input_ids=torch.zeros(7))
    mixed.watch_steps(runner, known=lambda name: name == "a",
                      after_step=lambda: steps.append(mixed.current_step()))
    mixed.watch_steps(runner, known=lambda name: False)  # idempotent: the first one stays
    runner.execute_model(SimpleNamespace(num_scheduled_tokens=dict(r1=2, r2=3, r3=0)))
    assert seen[0].names == (None, "a") and seen[0].counts == [5, 2]  # r3: no tokens this step
    assert steps == [None] and mixed.named_experts(runner) == {"a"}
    assert mixed.current_step() is None
    runner._model_forward(input_ids=torch.zeros(7))  # a forward outside a step (a dummy run)
    assert seen[1] is None
    runner.requests["r3"] = request("r3", "zz")
    with pytest.raises(RuntimeError, match="request r3 names the expert 'zz'"):
        runner.execute_model(SimpleNamespace(num_scheduled_tokens=dict(r1=2, r2=3, r3=1)))
    assert steps == [None, None] and mixed.named_experts(runner) == {"a", "zz"}
    assert mixed.named_experts(SimpleNamespace()) == set()
    with pytest.raises(RuntimeError, match="model runner to have"):
        mixed.watch_steps(SimpleNamespace(), known=lambda name: True)
    # the runner's own layout (query_start_loc) wins over the scheduler's counts: it trims them
    # (rejected speculative tokens), and a row of another request would be served on "a"
    runner.requests["r3"] = request("r3", "a")
    runner.query_start_loc = SimpleNamespace(np=np.array([0, 3, 4, 4, 4, 4]))
    runner.execute_model(SimpleNamespace(num_scheduled_tokens=dict(r1=3, r2=3, r3=0)))
    want = mixed.layout_of([None, "a", "a"], [3, 1, 0], 7)  # (the 3 rows past them: padding)
    assert seen[-1].names == want.names and seen[-1].counts == want.counts
    assert want.counts != mixed.layout_of([None, "a", "a"], [3, 3, 0], 7).counts


def test_in_process_engines_in_two_threads_each_see_their_own_step():
    """Two engines stepping at once in one process (vLLM without multiprocessing, each driven
    from its own thread): each forward reads its own step's layout, not the other's."""
    import threading
    from types import SimpleNamespace

    from doe_kernels.vllm import mixed

    both_inside = threading.Barrier(2, timeout=30)
    seen = {}

    def runner_of(name):
        extra = {mixed.EXTRA_ARG: name}
        runner = SimpleNamespace(
            input_batch=SimpleNamespace(req_ids=["r"], num_reqs=1),
            requests=dict(r=SimpleNamespace(req_id="r",
                                            sampling_params=SimpleNamespace(extra_args=extra))))

        def forward(**kwargs):
            both_inside.wait()  # the other engine has set its step by now
            seen[name] = mixed.current_step()
            both_inside.wait()

        runner._model_forward = forward
        runner.execute_model = lambda output: runner._model_forward(input_ids=torch.zeros(4))
        mixed.watch_steps(runner, known=lambda held: held == name)
        return runner

    runners = {name: runner_of(name) for name in ("a", "b")}
    threads = [threading.Thread(target=runner.execute_model,
                                args=(SimpleNamespace(num_scheduled_tokens=dict(r=4)),))
               for runner in runners.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert {name: step.names for name, step in seen.items()} == {"a": ("a", None),
                                                                "b": ("b", None)}
    assert mixed.current_step() is None


def _tiny_model(family: str, path) -> str:
    """A random float32 Qwen2 (with visible q/k/v biases, so that a wrong bias row would show) or
    Mistral: 2 layers, hidden 128, 256 neurons, 4 heads / 2 KV heads."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_class, model_class = dict(qwen2=(Qwen2Config, Qwen2ForCausalLM),
                                     mistral=(MistralConfig, MistralForCausalLM))[family]
    config = config_class(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                          max_position_embeddings=1024, initializer_range=0.1,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = model_class(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama"])
def test_llama_family_models_at_tensor_parallel_size_1(family, tmp_path):
    """vLLM's Qwen2 (QKV biases), Mistral and the random 8-head / 4-KV-head Llama at
    tensor-parallel size 1: heads and neurons pruned, then unplugged."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / family
    path = _tiny_llama(folder) if family == "llama" else _tiny_model(family, folder)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = doe_kernels.models.spec_of(hf)
    size = spec.intermediate_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 21)]
    mask = doe_kernels.ExpertMask({0: torch.arange(0, size, 2), 1: torch.arange(size // 5,
                                                                                size - size // 5)},
                                  heads={0: [1, 2], 1: [3]}, spec=spec.as_dict())
    mask = _with_reconstruction(mask, spec, seed=8, heads=True)
    expected = _hf_patched(hf, mask, prompts)
    llm = _start_engine(path, tp=1, skip_tokenizer_init=True)
    try:
        dense = _generate(llm, prompts)
        assert_same_generation(dense, _hf_generate(hf, prompts))
        dkv.plug(llm, mask)
        assert_same_generation(_generate(llm, prompts), expected)
        dkv.unplug(llm)
        assert_same_generation(_generate(llm, prompts), dense, exact=True)
    finally:
        _stop_engine(llm)


@pytest.mark.vllm
def test_a_weight_reload_rebuilds_the_experts_plans(tmp_path, monkeypatch):
    """vLLM's reload_weights loads new weights into the running model in place: the plugged
    expert and one held for mixed-task batches are built again on them (they kept reading dense
    copies of the old weights: the dense model was the new one, the experts the old one's); and
    so after vLLM's weight transfer, which bypasses reload_weights (a stand-in transfer engine,
    sent to the ranks as a function: pickled, which vLLM allows only when told)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

    old, new = _tiny_llama(tmp_path / "old"), _tiny_llama(tmp_path / "new", seed=1)
    hf = AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32).eval()
    plugged = doe_kernels.ExpertMask.random(hf, ffn_keep=0.5, heads_keep=0.5, seed=3)
    held = doe_kernels.ExpertMask.random(hf, ffn_keep=0.6, seed=4)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 21)]
    expected = dict(plugged=_hf_patched(hf, plugged, prompts), held=_hf_patched(hf, held, prompts))
    llm = _start_engine(old, tp=1, skip_tokenizer_init=True)
    try:
        dkv.plug(llm, plugged)
        dkv.add(llm, "held", held)
        before = _generate(llm, prompts)  # the old weights' experts
        requests = [("held", 0), (None, 1)]
        mixed_before = _generate_mixed(llm, [(name, prompts[i]) for name, i in requests])
        norm = torch.ones(hf.config.hidden_size)  # the CPU keeps copies: refused, nothing loaded
        with pytest.raises(Exception, match="reload in checkpoint format"):
            llm.collective_rpc("reload_weights", kwargs=dict(
                weights_iterator=[("model.norm.weight", norm)], is_checkpoint_format=False))
        assert _generate(llm, prompts) == before
        llm.collective_rpc("reload_weights", kwargs=dict(weights_path=new))
        llm.reset_prefix_cache()
        after = _generate(llm, prompts)
        assert after[0] != before[0]
        assert_same_generation(after, expected["plugged"])
        assert_same_generation(
            _generate_mixed(llm, [(name, prompts[i]) for name, i in requests]),
            _expected_mixed({"held": expected["held"], None: expected["plugged"]}, requests))
        assert dkv.experts(llm) == ["held"]
        # vLLM's weight transfer (start / update / finish_weight_update, bypassing
        # reload_weights) back to the old weights: the experts are built again on them too
        llm.collective_rpc(_stand_in_weight_transfer)
        llm.collective_rpc("start_weight_update")
        llm.collective_rpc("update_weights", args=({"path": old},))
        llm.collective_rpc("finish_weight_update")
        llm.reset_prefix_cache()
        assert _generate(llm, prompts) == before
        # (the same tokens, log-probs to rounding: the rebuilt plans may take the union where the
        # first ones took the segments)
        assert_same_generation(
            _generate_mixed(llm, [(name, prompts[i]) for name, i in requests]), mixed_before)
    finally:
        _stop_engine(llm)


def _stand_in_weight_transfer(worker) -> None:
    """Gives `worker` (a rank) a weight transfer engine doing what vLLM's NCCL one does, in
    checkpoint format, with weights read from a folder (`update_weights({"path": folder})`)."""
    class FromFolder:
        supports_draft_weight_update = False

        def start_weight_update(self):
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(worker.model_runner.model)

        def update_weights(self, info):
            from safetensors.torch import load_file

            worker.model_runner.model.load_weights(
                list(load_file(os.path.join(info["path"], "model.safetensors")).items()))

        def finish_weight_update(self):
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(worker.model_runner.model, worker.model_runner.model_config)

        def reset_weight_update_target(self):
            pass

        def shutdown(self):
            pass

    # (a callable gets vLLM's wrapper of the worker, which passes attribute reads through)
    getattr(worker, "worker", worker).weight_transfer_engine = FromFolder()
