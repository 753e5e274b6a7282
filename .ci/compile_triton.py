"""Compile check of the Triton kernels for real GPUs (sm_90, sm_80) on a machine without one.

Every kernel, in float32, float16 and bfloat16, with each fixed launch configuration
(kernels.fixed_launch) and each autotune configuration, is compiled to PTX and machine code with the
installed Triton's own ptxas. Catches errors the interpreter cannot (tl.dot shape rules, shared
memory, types). Run from the repository root: python .ci/compile_triton.py [--all-configs]
"""
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.getcwd())

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import doe_kernels.backends.triton.kernels as k  # noqa: E402

INDEX_POINTERS = {"rows_ptr", "kept_ptr", "cols_ptr", "table_ptr"}
KERNELS = {
    "rows": (k.gather_rows_linear_kernel, k.MATMUL_CONFIGS, {"HAS_BIAS": True, "ACTIVATION": 1}),
    "swiglu": (k.gather_swiglu_kernel, k.SWIGLU_CONFIGS, {}),
    "cols": (k.gather_cols_linear_kernel, k.MATMUL_CONFIGS,
             {"HAS_BIAS": True, "HAS_SCALES": False}),
    "cols-scaled": (k.gather_cols_linear_kernel, k.MATMUL_CONFIGS,
                    {"HAS_BIAS": True, "HAS_SCALES": True}),
    # mixed-task batches: a grid axis over segments (fixed launches only)
    "segmented-rows": (k.segmented_rows_linear_kernel, [], {"HAS_BIAS": True, "ACTIVATION": 1}),
    "segmented-swiglu": (k.segmented_swiglu_kernel, [], {}),
    "segmented-cols": (k.segmented_cols_linear_kernel, [],
                       {"HAS_BIAS": True, "HAS_SCALES": True}),
}


def compile_one(kernel, dtype, constants, num_warps, num_stages, target):
    signature, constexprs = {}, {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = constants[name]
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in INDEX_POINTERS else "*" + dtype
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


def main():
    all_configs = "--all-configs" in sys.argv
    failures, count, start = [], 0, time.time()
    for arch in (90, 80):
        target = GPUTarget("cuda", arch, 32)
        for dtype in ("fp32", "fp16", "bf16"):
            for name, (kernel, configs, extra) in KERNELS.items():
                weights, size = (2 if "swiglu" in name else 1), (4 if dtype == "fp32" else 2)
                limit = k.SMEM_LIMITS[arch]
                launches = [k.fixed_launch(m, weights, size, limit) for m in (1, 64, 512)]
                if all_configs and arch == 90:
                    launches += [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                                 for c in configs]
                for launch in launches:
                    meta = dict(launch)
                    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
                    constants = dict(extra, F32_DOT=dtype == "fp32", **meta)
                    label = f"sm_{arch} {dtype} {name} {meta} warps={warps} stages={stages}"
                    try:
                        shared = compile_one(kernel, dtype, constants, warps, stages, target)
                        count += 1
                        if shared > limit + k._SMEM_MARGIN:  # the device's own, no margin
                            failures.append(f"{label}: {shared} bytes of shared memory")
                    except Exception as error:  # report every failure, then exit non-zero
                        failures.append(f"{label}: {type(error).__name__}: {str(error)[:400]}")
    for failure in failures:
        print("FAILED", failure)
    print(f"compiled {count} Triton kernels (triton {triton.__version__}) in "
          f"{time.time() - start:.0f} s; {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
