"""An expert's soft prompt in vLLM: requests as prompt embeddings, and the expert's answers.

A causal-LM expert reads a text through its template (its `max_length` cutting the text, never
the template's end) with its trained soft prompt in front, as PEFT's prompt tuning does. vLLM takes
such inputs as `{"prompt_embeds": (tokens, hidden)}` when the engine is created with
`enable_prompt_embeds=True`: `expert_prompts` builds them from the model's input-embedding matrix,
and `answer` asks the engine for the expert's label: one greedy token restricted to the label
words' first tokens, the same argmax as `Expert.predict` on the HuggingFace model;
`answer_mixed` asks several held experts at once (doe_kernels.vllm.add). Needs no vLLM
itself (`answer` calls the engine it is given).
"""
import torch

from doe_kernels.expert import CAUSAL_LM, Expert


def expert_prompts(expert: Expert, tokenizer, texts, embeddings: torch.Tensor) -> list[dict]:
    """One vLLM prompt per text: {"prompt_embeds": cat(expert.prompt, embeddings[token ids])}
    of the text in the expert's template. `embeddings`: the model's input-embedding matrix
    (vocab, hidden), e.g. `hf_model.get_input_embeddings().weight`; the result has its dtype.
    ValueError for a tokenizer that encodes the expert's label words to other tokens than it was
    trained with (as Expert.predict refuses it)."""
    if not isinstance(expert, Expert) or expert.task_type != CAUSAL_LM:
        raise ValueError("expert_prompts needs a causal-LM Expert (vLLM generates text; a "
                         "classifier's expert is served by doe_kernels.ExpertRouter)")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError("embeddings must be the model's (vocab, hidden) input-embedding matrix")
    if embeddings.shape[1] != expert.prompt.shape[1]:
        raise ValueError(f"the embeddings are {embeddings.shape[1]} wide, the expert's soft "
                         f"prompt {expert.prompt.shape[1]}: an expert of another model")
    weight = embeddings.detach()
    prompt = expert.prompt.to(weight.device, weight.dtype)
    ids, attention = expert.encode(tokenizer, list(texts))
    return [{"prompt_embeds": torch.cat((prompt, weight[row[real.bool()].to(weight.device)]))}
            for row, real in zip(ids, attention)]  # each text without its left padding


def answer(llm, expert: Expert, tokenizer, texts, embeddings: torch.Tensor) -> list[str]:
    """The expert's label for each text, from the engine `llm` (created with
    enable_prompt_embeds=True; plug the expert's mask with doe_kernels.vllm.plug first): the most
    probable of the label words' first tokens after the prompt, as Expert.predict scores them."""
    from vllm import SamplingParams

    token_ids = list(expert.label_token_ids)
    params = SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=token_ids)
    outputs = llm.generate(expert_prompts(expert, tokenizer, texts, embeddings), params,
                           use_tqdm=False)
    return [_label_of(expert, out) for out in outputs]


def _label_of(expert: Expert, output) -> str:
    """The label word whose first token the engine chose (a vLLM RequestOutput)."""
    return expert.label_names[list(expert.label_token_ids).index(output.outputs[0].token_ids[0])]


def answer_mixed(llm, experts: dict, tokenizer, requests, embeddings: torch.Tensor) -> list[str]:
    """Each request's label from its own expert, several experts in the same engine steps.
    `experts`: {name: causal-LM Expert}, each held by `llm` under its name
    (doe_kernels.vllm.add); `requests`: (name, text) pairs. The same labels as `answer` with
    each expert plugged in turn."""
    from vllm import SamplingParams

    from doe_kernels.vllm.engine import for_experts

    requests = [tuple(r) for r in requests]
    missing = sorted({str(name) for name, _ in requests if name not in experts})
    if missing:
        raise ValueError(f"no Expert given for the names {missing}")
    prompts, params = [], []
    for name, text in requests:
        expert = experts[name]
        prompts.append(expert_prompts(expert, tokenizer, [text], embeddings)[0])
        params.append(SamplingParams(temperature=0, max_tokens=1,
                                     allowed_token_ids=list(expert.label_token_ids)))
    prompts, params = for_experts(llm, list(zip((n for n, _ in requests), prompts)), params)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [_label_of(experts[name], out) for (name, _), out in zip(requests, outputs)]
