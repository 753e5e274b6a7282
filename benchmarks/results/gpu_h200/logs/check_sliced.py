"""The bfloat16 gap between the sliced LLaMA-7B and the patched one: rounding or a bug? float32
decides. On a GPU, from the repository root: python benchmarks/results/gpu_h200/logs/check_sliced.py
(output of the reference run: check_sliced.log beside this file)."""
import sys
import torch
sys.path.insert(0, "benchmarks")
import doe_kernels as dk
import test_model_bench as tb

dev = torch.device("cuda")
rel = lambda a, b: float((a - b).norm() / b.norm())
cases = [next(c for c in tb._cases("full", dev) if c.shape == s)
         for s in ("llama-7b-decode", "llama-7b-prefill128")]
out = {}
for dtype in (torch.bfloat16, torch.float32):
    tb._model.cache_clear(); tb._mask.cache_clear(); torch.cuda.empty_cache()
    model = tb._model("llama-7b", "cuda", dtype)
    for case in cases:
        for rate in (0.35, 0.65):
            mask = tb._mask(case.model, "cuda", dtype, rate, case.layers)
            with torch.inference_mode():
                out[case.shape, dtype, rate, "sliced"] = tb.Runner(tb._sliced_model(model, mask), case)().float()
                for b in ("torch", "cuda", "triton"):
                    with dk.plugged(model, mask, backend=b):
                        out[case.shape, dtype, rate, b] = tb.Runner(model, case)().float()
    del model
for case in cases:
    for rate in (0.35, 0.65):
        o = lambda d, v: out[case.shape, d, rate, v]
        ref = o(torch.float32, "torch")
        print(case.shape, rate,
              "| fp32 vs fp32-torch: " + " ".join("%s %.2e" % (v, rel(o(torch.float32, v), ref)) for v in ("sliced", "cuda", "triton")),
              "| bf16 sliced vs bf16-torch %.2e" % rel(o(torch.bfloat16, "sliced"), o(torch.bfloat16, "torch")),
              "| bf16 vs fp32-torch: " + " ".join("%s %.2e" % (v, rel(o(torch.bfloat16, v), ref)) for v in ("torch", "sliced", "cuda", "triton")),
              flush=True)
