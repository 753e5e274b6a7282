"""Compile check of the Triton kernels for real GPUs (sm_90, sm_80) on a machine without one.

Every kernel is compiled to PTX and machine code with the installed Triton's own ptxas, as Triton
specializes a real launch with every pointer 16-byte aligned and every integer argument a
multiple of 16 (the usual case on a GPU: float16 and bfloat16 loads then become pipelined
asynchronous copies, and on sm_90 the dot a wgmma, which take the most shared memory): in float32
and bfloat16 with each fixed launch configuration (kernels.fixed_launch) and each autotune
configuration as the autotuner's pruning fits it to the architecture (the segmented kernels
launch fixed configurations only); in float16 with the fixed configurations. Also, in bfloat16
at the fixed configurations, without those hints (odd sizes or offsets), and each epilogue
variant (activation, bias, scales) at one configuration. Catches errors the interpreter cannot
(tl.dot shape rules, shared memory, types), and checks that no compiled kernel uses more shared
memory than the device has, or more than kernels.smem_bytes estimates (the estimate the fitting
relies on) by over kernels._SMEM_MARGIN. Compiles in one process per core. Run from the
repository root: python .ci/compile_triton.py
"""
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import doe_kernels.backends.triton.kernels as k  # noqa: E402

INDEX_POINTERS = {"rows_ptr", "kept_ptr", "cols_ptr", "table_ptr"}
ACTIVATIONS = ({"HAS_BIAS": True, "ACTIVATION": 1}, {"HAS_BIAS": False, "ACTIVATION": 0},
               {"HAS_BIAS": True, "ACTIVATION": 2}, {"HAS_BIAS": False, "ACTIVATION": 3})
EPILOGUES = ({"HAS_BIAS": True, "HAS_SCALES": True}, {"HAS_BIAS": False, "HAS_SCALES": False},
             {"HAS_BIAS": True, "HAS_SCALES": False}, {"HAS_BIAS": False, "HAS_SCALES": True})
# name -> (kernel, its autotune name or None, operand weights per tile, epilogue constants: the
# first set compiled with every configuration, the others with one)
KERNELS = {
    "rows": (k.gather_rows_linear_kernel, "gather_rows_linear", 1, ACTIVATIONS),
    "swiglu": (k.gather_swiglu_kernel, "gather_swiglu", 2, ({},)),
    "cols": (k.gather_cols_linear_kernel, "gather_cols_linear", 1, EPILOGUES),
    # mixed-task batches: a grid axis over segments (fixed launches only)
    "segmented-rows": (k.segmented_rows_linear_kernel, None, 1, ACTIVATIONS),
    "segmented-swiglu": (k.segmented_swiglu_kernel, None, 2, ({},)),
    "segmented-cols": (k.segmented_cols_linear_kernel, None, 1, EPILOGUES),
}
M_BUCKETS = (16, 32, 64, 128, 4096)  # the autotuner's pruning differs at these


def compile_one(kernel, dtype, constants, num_warps, num_stages, target, aligned):
    """The shared memory (bytes) of `kernel` compiled for `target`; `aligned`: every pointer
    16-byte aligned and every integer argument a multiple of 16, as Triton specializes them."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = constants[name]
            continue
        if name.endswith("_ptr"):
            signature[name] = "*i64" if name in INDEX_POINTERS else "*" + dtype
        else:
            signature[name] = "i32"
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


def launches(tuned_name, weights, size, arch):
    """The launch configurations a GPU of `arch` may run: the fixed ones, then the autotuner's
    as its pruning fits them (each once)."""
    limit = k.SMEM_LIMITS[arch]
    out = [k.fixed_launch(m, weights, size, limit, arch) for m in (1, 64, 512)]  # (in order)
    if tuned_name is not None:
        configs = k.TUNING[tuned_name][1]
        prune = k._make_prune(weights, "x", limit, arch)["early_config_prune"]
        for bucket in M_BUCKETS:
            x = torch.empty(0, dtype=torch.float32 if size == 4 else torch.bfloat16)
            out += [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                    for c in prune(configs, {"M_BUCKET": bucket, "x": x})]
    unique = {tuple(sorted(launch.items())): launch for launch in out}
    return list(unique.values())


def check(label, name, dtype, constants, launch, arch, aligned):
    """None, or what is wrong with compiling this launch of the kernel `name`."""
    kernel, _, weights, _ = KERNELS[name]
    size = 4 if dtype == "fp32" else 2
    meta = dict(launch)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    constants = dict(constants, F32_DOT=dtype == "fp32", **meta)
    try:
        shared = compile_one(kernel, dtype, constants, warps, stages, GPUTarget("cuda", arch, 32),
                             aligned)
    except Exception as error:  # report every failure, then exit non-zero
        return f"{label}: {type(error).__name__}: {str(error)[:400]}"
    estimate = k.smem_bytes(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], stages, weights,
                            size, arch)
    if shared > k.SMEM_LIMITS[arch] + k._SMEM_MARGIN:  # the device's own, no margin
        return f"{label}: {shared} bytes of shared memory"
    if shared > estimate + k._SMEM_MARGIN:
        return f"{label}: {shared} bytes of shared memory, kernels.smem_bytes estimates {estimate}"
    return None


def jobs():
    """(label, kernel name, dtype, constants, launch, arch, aligned) of every compile."""
    out = []
    for arch in (90, 80):
        for dtype in ("fp32", "bf16", "fp16"):
            size = 4 if dtype == "fp32" else 2
            for name, (_, tuned_name, weights, epilogues) in KERNELS.items():
                fixed = launches(None, weights, size, arch)
                every = fixed if dtype == "fp16" else launches(tuned_name, weights, size, arch)
                todo = [(epilogues[0], launch, True) for launch in every]
                if dtype == "bf16":
                    todo += [(epilogues[0], launch, False) for launch in fixed]
                    todo += [(constants, fixed[1], True) for constants in epilogues[1:]]
                out += [(f"sm_{arch} {dtype} {name} {constants} {launch} "
                         f"{'aligned' if aligned else 'unaligned'}", name, dtype, constants,
                         launch, arch, aligned) for constants, launch, aligned in todo]
    return out


def main():
    start, todo = time.time(), jobs()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        failures = [f for f in pool.map(check, *zip(*todo)) if f is not None]
    for failure in failures:
        print("FAILED", failure)
    print(f"compiled {len(todo)} Triton kernels (triton {triton.__version__}) in "
          f"{time.time() - start:.0f} s; {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
