"""Triton kernels for the gathered (index-list) FFN projections.

Three tiled ``tl.dot`` kernels that read the kept neurons straight out of the full weights through an
index list instead of copying a sliced weight:

* ``gather_rows_linear_kernel``: out[m, n] = act(x[m, :] . weight[rows[n], :] + bias[rows[n]])
* ``gather_swiglu_kernel``:      out[m, n] = silu(x[m] . w_gate[kept[n]]) * (x[m] . w_up[kept[n]])
* ``gather_cols_linear_kernel``: out[m, n] = sum_j h[m, j] * s[j] * weight_t[cols[j], n] + bias[n]
  (s: the scales with HAS_SCALES, each h tile multiplied by its K step's scales in float32; else 1)

All accumulate in float32 and fuse their epilogue (bias, activation, SwiGLU product) before the single
store in the output dtype. Only plain pointer arithmetic, ``tl.load``/``tl.store`` and ``tl.dot`` are
used so the kernels work with Triton 3.x (>= 3.0) on GPU and under the interpreter.

Index values are not trusted (an index list may have changed since it was checked, and checking it
on the host would synchronise): every load through an index is masked by the index's range
(N_TOTAL / K_TOTAL, the weight's rows) as well as by the tile's tail, one compare per loaded index.
An index outside that range reads nothing: its output is 0 (rows, swiglu) or it adds nothing (cols).

Launch configuration: under ``TRITON_INTERPRET=1`` the caller runs the plain ``@triton.jit`` kernels
with large blocks (fast in numpy); on a GPU it runs them autotuned (``tuned``: one autotuner per
kind of GPU), keyed on (bucketed M, bucketed kept count, the fixed dimension), or with
DOE_KERNELS_TRITON_AUTOTUNE=0 with one fixed configuration per M regime.
"""
import os
import threading

import torch
import triton
import triton.language as tl
import triton.testing

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"



def m_bucket(m: int) -> int:
    """Autotune key for M: decode sizes exact-ish, prefill sizes by power of two (capped)."""
    if m <= 16:
        return 16
    return min(triton.next_power_of_2(m), 4096)


def kept_bucket(n: int) -> int:
    """Autotune key for the number of kept neurons: a power of two, so that experts of slightly
    different sizes (and layers of one global mask) share their tuning."""
    return triton.next_power_of_2(max(n, 1))


def autotune_enabled() -> bool:
    """DOE_KERNELS_TRITON_AUTOTUNE=0 runs one fixed configuration per M regime (used by the GPU
    test suite, whose many shapes would otherwise spend minutes autotuning)."""
    return not INTERPRET and os.environ.get("DOE_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def fixed_launch(M: int, weights: int = 1, element_size: int = 2,
                 limit: int | None = None, arch: int = 90) -> dict:
    """The fixed configuration used when autotuning is off, by M regime, with fewer pipeline
    stages (then a smaller BLOCK_K) where its operand buffers would not fit in `limit` bytes of
    shared memory on a GPU of compute capability `arch` (by default an H100's; `smem_limit` and
    `device_arch` give a device's): float32 SwiGLU at 16 rows or fewer on an A100, most float32
    tiles on GPUs of about 100 KiB."""
    bm, bn, bk, warps, stages = ((16, 64, 128, 4, 4) if M <= 16 else
                                 (64, 64, 64, 4, 4) if M <= 128 else (128, 64, 64, 4, 3))
    bk, stages = fitted(bm, bn, bk, stages, weights, element_size, limit or SMEM_LIMITS[90],
                        arch)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps,
            "num_stages": stages}


def fitted(bm: int, bn: int, bk: int, stages: int, weights: int, element_size: int,
           limit: int, arch: int = 90) -> tuple[int, int]:
    """(BLOCK_K, num_stages) of a tile, with fewer stages (down to 2), then a smaller BLOCK_K
    (down to 32), where its operand buffers would pass `limit` bytes of shared memory."""
    def smem(bk, stages):
        return smem_bytes(bm, bn, bk, stages, weights, element_size, arch)

    while stages > 2 and smem(bk, stages) > limit:
        stages -= 1
    while bk > 32 and smem(bk, stages) > limit:
        bk //= 2
    return bk, stages


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    # overflow-free form: exp of a non-positive argument only
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _dot(a, b, acc, F32_DOT: tl.constexpr):
    """acc += a @ b. F32_DOT: operands in float32 with exact (non-TF32) products ("ieee").

    Set for float32 inputs, and for every dtype under the interpreter, whose bfloat16 tl.dot is
    broken (numpy has no bfloat16). float16/bfloat16 on a GPU use the native tensor-core dot.
    """
    if F32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _apply_activation(acc, ACTIVATION: tl.constexpr):
    # ACTIVATION: a code of doe_kernels.activations.ACTIVATION_CODES (0: identity)
    if ACTIVATION == 1:  # exact GELU: 0.5 x (1 + erf(x / sqrt(2)))
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 2:  # tanh GELU; tanh(y) = 2 sigmoid(2y) - 1 (no tanh in core tl.math)
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (1.0 + (2.0 * _sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == 3:  # ReLU; NaN stays NaN (tl.maximum would give 0, as torch does not)
        acc = tl.where(acc < 0.0, 0.0, acc)
    return acc


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped 1-D launch order: GROUP_M M-tiles sweep the N-tiles together (better L2 reuse)."""
    return _tile_ids_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _tile_ids_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """_tile_ids for program `pid` (< the tiles of M x N)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def gather_rows_linear_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, out_ptr,
    M, N, K, N_TOTAL,
    stride_xm, stride_wn, stride_om,
    M_BUCKET, KEPT_BUCKET,  # autotune keys only
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _rows_linear_tile(x_ptr, w_ptr, b_ptr, rows_ptr, out_ptr, M, N, K, N_TOTAL, stride_xm,
                      stride_wn, stride_om, pid_m, pid_n, HAS_BIAS, ACTIVATION, F32_DOT,
                      BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _rows_linear_tile(
    x_ptr, w_ptr, b_ptr, rows_ptr, out_ptr, M, N, K, N_TOTAL, stride_xm, stride_wn, stride_om,
    pid_m, pid_n, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # gathered weight rows for this N tile, loaded once (int64 indices -> int64 offsets)
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0)
    mask_w = mask_n & (rows >= 0) & (rows < N_TOTAL)  # out-of-range rows read nothing
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_w[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(a, tl.trans(w), acc, F32_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=mask_w, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    acc = _apply_activation(acc, ACTIVATION)

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def gather_swiglu_kernel(
    x_ptr, wg_ptr, wu_ptr, kept_ptr, out_ptr,
    M, N, K, N_TOTAL,
    stride_xm, stride_wgn, stride_wun, stride_om,
    M_BUCKET, KEPT_BUCKET,  # autotune keys only
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _swiglu_tile(x_ptr, wg_ptr, wu_ptr, kept_ptr, out_ptr, M, N, K, N_TOTAL, stride_xm,
                 stride_wgn, stride_wun, stride_om, pid_m, pid_n, F32_DOT, BLOCK_M, BLOCK_N,
                 BLOCK_K)


@triton.jit
def _swiglu_tile(
    x_ptr, wg_ptr, wu_ptr, kept_ptr, out_ptr, M, N, K, N_TOTAL, stride_xm, stride_wgn, stride_wun,
    stride_om, pid_m, pid_n, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    kept = tl.load(kept_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    mask_w = mask_n & (kept >= 0) & (kept < N_TOTAL)  # out-of-range rows read nothing
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    wg_ptrs = wg_ptr + kept[:, None] * stride_wgn + offs_k[None, :]
    wu_ptrs = wu_ptr + kept[:, None] * stride_wun + offs_k[None, :]

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_w[:, None] & mask_k[None, :]
        wg = tl.load(wg_ptrs, mask=wmask, other=0.0)
        wu = tl.load(wu_ptrs, mask=wmask, other=0.0)
        acc_g = _dot(a, tl.trans(wg), acc_g, F32_DOT)
        acc_u = _dot(a, tl.trans(wu), acc_u, F32_DOT)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K

    out = acc_g * _sigmoid(acc_g) * acc_u
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def gather_cols_linear_kernel(
    h_ptr, wt_ptr, b_ptr, cols_ptr, scales_ptr, out_ptr,
    M, N, J, K_TOTAL,
    stride_hm, stride_wk, stride_om,
    M_BUCKET, KEPT_BUCKET,  # autotune keys only
    HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _cols_linear_tile(h_ptr, wt_ptr, b_ptr, cols_ptr, scales_ptr, out_ptr, M, N, J, K_TOTAL,
                      stride_hm, stride_wk, stride_om, pid_m, pid_n, HAS_BIAS, HAS_SCALES,
                      F32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _cols_linear_tile(
    h_ptr, wt_ptr, b_ptr, cols_ptr, scales_ptr, out_ptr, M, N, J, K_TOTAL, stride_hm, stride_wk,
    stride_om, pid_m, pid_n, HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr,
    F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_j[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_K):
        mask_j = (j0 + offs_j) < J
        # kept input rows of weight_t for this K step (each a contiguous row of N)
        cols = tl.load(cols_ptr + j0 + offs_j, mask=mask_j, other=0).to(tl.int64)
        mask_w = mask_j & (cols >= 0) & (cols < K_TOTAL)  # out-of-range rows read nothing
        a = tl.load(h_ptrs, mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        if HAS_SCALES:  # one factor per kept column, applied in float32
            s = tl.load(scales_ptr + j0 + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            if F32_DOT:
                a = a.to(tl.float32) * s[None, :]
            else:  # the native dot takes the input dtype: round the scaled tile once
                a = (a.to(tl.float32) * s[None, :]).to(h_ptr.dtype.element_ty)
        w = tl.load(wt_ptr + cols[:, None] * stride_wk + offs_n[None, :],
                    mask=mask_w[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, w, acc, F32_DOT)
        h_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------
# segmented kernels (mixed-task batches): grid axis 1 runs over segments
# --------------------------------------------------------------------------------------------------
@triton.jit
def _segment(table_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
             TILE_OUT: tl.constexpr):
    """This program's segment and tile: (first row, rows, first kept entry, kept count, offset of
    its hidden block, pid_m, pid_n, whether the tile lies in the segment). The segment table
    holds those five int64 numbers per segment. The tiles cover rows x kept, or with TILE_OUT
    rows x N (the down projection's output)."""
    seg = tl.program_id(1)
    row0 = tl.load(table_ptr + seg * 5)
    rows = tl.load(table_ptr + seg * 5 + 1)
    kept0 = tl.load(table_ptr + seg * 5 + 2)
    kept = tl.load(table_ptr + seg * 5 + 3)
    hidden0 = tl.load(table_ptr + seg * 5 + 4)
    width = kept
    if TILE_OUT:
        width = N + 0 * kept  # (int64, as kept)
    inside = tl.program_id(0) < tl.cdiv(rows, BLOCK_M) * tl.cdiv(width, BLOCK_N)
    # a program past the segment's tiles maps as program 0 (and stores nothing): no division by
    # zero in the tile order, also for a segment keeping nothing
    pid = tl.where(inside, tl.program_id(0), 0)
    pid_m, pid_n = _tile_ids_of(pid, rows, tl.maximum(width, 1), BLOCK_M, BLOCK_N, GROUP_M)
    return row0, rows, kept0, kept, hidden0, pid_m, pid_n, inside


@triton.jit
def segmented_rows_linear_kernel(
    x_ptr, w_ptr, b_ptr, kept_ptr, hidden_ptr, table_ptr,
    K, N_TOTAL, stride_xm, stride_wn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Each segment's act(x[rows] @ w[kept].T + b[kept]) into its block of `hidden` (rows x kept,
    row-major, at its offset)."""
    row0, rows, kept0, kept, hidden0, pid_m, pid_n, inside = _segment(
        table_ptr, 0, BLOCK_M, BLOCK_N, GROUP_M, False)
    if inside & (kept > 0):
        _rows_linear_tile(x_ptr + row0 * stride_xm, w_ptr, b_ptr, kept_ptr + kept0,
                          hidden_ptr + hidden0, rows, kept, K, N_TOTAL, stride_xm, stride_wn,
                          kept, pid_m, pid_n, HAS_BIAS, ACTIVATION, F32_DOT, BLOCK_M, BLOCK_N,
                          BLOCK_K)


@triton.jit
def segmented_swiglu_kernel(
    x_ptr, wg_ptr, wu_ptr, kept_ptr, hidden_ptr, table_ptr,
    K, N_TOTAL, stride_xm, stride_wgn, stride_wun,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Each segment's silu(x @ w_gate[kept].T) * (x @ w_up[kept].T) into its block of `hidden`."""
    row0, rows, kept0, kept, hidden0, pid_m, pid_n, inside = _segment(
        table_ptr, 0, BLOCK_M, BLOCK_N, GROUP_M, False)
    if inside & (kept > 0):
        _swiglu_tile(x_ptr + row0 * stride_xm, wg_ptr, wu_ptr, kept_ptr + kept0,
                     hidden_ptr + hidden0, rows, kept, K, N_TOTAL, stride_xm, stride_wgn,
                     stride_wun, kept, pid_m, pid_n, F32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def segmented_cols_linear_kernel(
    hidden_ptr, wt_ptr, b_ptr, kept_ptr, scales_ptr, out_ptr, table_ptr,
    N, K_TOTAL, stride_wk, stride_om,
    HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Each segment's hidden block @ w_t[kept] (scaled) + b into its rows of `out` (a segment
    keeping nothing gets the bias)."""
    row0, rows, kept0, kept, hidden0, pid_m, pid_n, inside = _segment(
        table_ptr, N, BLOCK_M, BLOCK_N, GROUP_M, True)
    if inside:
        _cols_linear_tile(hidden_ptr + hidden0, wt_ptr, b_ptr, kept_ptr + kept0,
                          scales_ptr + kept0, out_ptr + row0 * stride_om, rows, N, kept,
                          K_TOTAL, kept, stride_wk, stride_om, pid_m, pid_n, HAS_BIAS,
                          HAS_SCALES, F32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)


# --------------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# One accumulator (rows_linear, cols_linear).
MATMUL_CONFIGS = [
    # decode / small M
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 128, 128, 4, 4),
    _cfg(16, 256, 64, 4, 4),
    _cfg(32, 64, 128, 4, 4),
    # medium M
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    # prefill / large M
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
]

# Two accumulators (swiglu): keep the register footprint of large tiles in check.
SWIGLU_CONFIGS = [
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 128, 64, 4, 4),
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 3),
    _cfg(128, 64, 64, 4, 3),
    _cfg(128, 128, 64, 8, 3),
]


# Shared memory a block may use, less a margin, by compute capability (sm_90: H100/H200 227 KiB;
# sm_80: A100 163 KiB); `smem_limit` reads a device's own (sm_86/sm_89 cards: 99 KiB).
_SMEM_MARGIN = 7 * 1024
SMEM_LIMITS = {90: 227 * 1024 - _SMEM_MARGIN, 80: 163 * 1024 - _SMEM_MARGIN}
_DEVICE_LIMITS: dict = {}
_DEVICE_ARCHS: dict = {}


def smem_limit(device) -> int:
    """Shared memory a block may use on `device` (a torch.device), less a margin: the
    opt-in maximum per block the driver reports (read once per device), an H100's elsewhere."""
    if INTERPRET or device.type != "cuda":
        return SMEM_LIMITS[90]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_LIMITS:
        properties = triton.runtime.driver.active.utils.get_device_properties(index)
        _DEVICE_LIMITS[index] = properties["max_shared_mem"] - _SMEM_MARGIN
    return _DEVICE_LIMITS[index]


def device_arch(device) -> int:
    """`device`'s compute capability as major * 10 + minor (read once per device); an H100's,
    90, under the interpreter or off a GPU."""
    if INTERPRET or device.type != "cuda":
        return 90
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_ARCHS:
        major, minor = torch.cuda.get_device_capability(index)
        _DEVICE_ARCHS[index] = major * 10 + minor
    return _DEVICE_ARCHS[index]


def smem_bytes(bm: int, bn: int, bk: int, stages: int, weights: int, element_size: int,
               arch: int = 90) -> int:
    """Shared memory a config uses: the larger of its pipelined operand buffers and its output
    tile. Operand buffers, each a BLOCK_M x BLOCK_K tile of x and a BLOCK_N x BLOCK_K tile of
    each weight: num_stages - 1 of them (what Triton's pipeliner allocates: ptxas gave 221,184
    bytes for the float32 SwiGLU tile 16 x 64 x 128 at 4 stages on sm_90), or num_stages where
    the dot runs as sm_90's wgmma (float16 and bfloat16 tiles of at least 64 rows: 65,536 bytes
    for the bfloat16 64 x 64 x 64 tile at 4 stages; newer architectures are counted so too).
    In float32 the epilogue may pass the output tile through shared memory (131,328 bytes for
    the column-gathered 128 x 256 tile on sm_80; float16 and bfloat16 tiles measured none).
    .ci/compile_triton.py checks this against the compiler, within _SMEM_MARGIN."""
    wgmma = arch >= 90 and element_size == 2 and bm >= 64
    buffers = stages if wgmma else max(stages - 1, 1)
    tile = bm * bn * 4 if element_size == 4 else 0
    return max(buffers * (bm * bk + weights * bn * bk) * element_size, tile)


def _make_prune(n_weights, x_arg, limit: int | None = None, arch: int | None = None):
    """Early config pruning (runs before benchmarking, so it also saves autotune time).

    * drop configs whose BLOCK_M is far above the problem's M (the bucket): pure waste;
    * for prefill, drop the decode-only BLOCK_M=16 tiles;
    * fit the others to the device's shared memory (`limit` on compute capability `arch`, by
      default `smem_limit` and `device_arch` of the input's device) as `fixed_launch` does,
      with fewer stages or a smaller BLOCK_K, and drop those that still do not fit (a float32
      128 x 256 output tile on a GPU of about 100 KiB): float32 tiles would otherwise fail to
      launch (OutOfResources) on GPUs with less than an H100's.
    """
    def prune(configs, named_args, **kwargs):
        mb = named_args["M_BUCKET"]
        x = named_args[x_arg]
        budget = limit or smem_limit(x.device)
        capability = arch or device_arch(x.device)
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, mb)]
        if mb > 64:
            kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 32] or kept
        out, smallest = {}, None
        for c in kept or configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            bk, stages = fitted(bm, bn, c.kwargs["BLOCK_K"], c.num_stages, n_weights,
                                x.element_size(), budget, capability)
            fit = triton.Config(dict(c.kwargs, BLOCK_K=bk), num_warps=c.num_warps,
                                num_stages=stages)
            smem = smem_bytes(bm, bn, bk, stages, n_weights, x.element_size(), capability)
            if smem <= budget:  # (a float32 output tile may not fit, whatever the stages)
                out.setdefault((tuple(sorted(fit.kwargs.items())), c.num_warps, stages), fit)
            if smallest is None or smem < smallest[0]:
                smallest = (smem, fit)
        return list(out.values()) or [smallest[1]]

    return {"early_config_prune": prune}


def _tuning_bench(kernel_call, quantiles):
    """Times one configuration while autotuning: 25 ms of calls after 5 ms of warm-up, a quarter
    of Triton's default. Each new key times every configuration the pruning keeps, on the call
    that meets it (a model's first call at a new row count or expert size); these kernels run
    for microseconds to a few milliseconds, so 25 ms still gives many calls to take a median of."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# The autotuned kernels (GPU): kernel, configs, key, weights per tile, the input's argument
TUNING = {
    "gather_rows_linear": (gather_rows_linear_kernel, MATMUL_CONFIGS,
                           ["M_BUCKET", "KEPT_BUCKET", "K"], 1, "x_ptr"),
    "gather_swiglu": (gather_swiglu_kernel, SWIGLU_CONFIGS, ["M_BUCKET", "KEPT_BUCKET", "K"], 2,
                      "x_ptr"),
    "gather_cols_linear": (gather_cols_linear_kernel, MATMUL_CONFIGS,
                           ["M_BUCKET", "N", "KEPT_BUCKET"], 1, "h_ptr"),
}
_TUNED: dict = {}  # (name, shared memory limit, compute capability) -> its autotuner
_TUNED_ON: dict = {}  # (name, device index) -> the autotuner of that device's kind


def tuned(name: str, device):
    """The autotuned kernel `name` for GPUs of `device`'s kind (its shared memory and compute
    capability), made on first use: Triton's autotuner caches each key's best config without
    the device, and the configs a device can launch depend on it (a config tuned on an H100
    would fail on a 99 KiB card in the same process). One lookup a launch once a device has
    met it."""
    tuner = _TUNED_ON.get((name, device.index))
    if tuner is not None:
        return tuner
    kind = (smem_limit(device), device_arch(device))
    tuner = _TUNED.get((name, *kind))
    if tuner is None:
        kernel, configs, key, weights, x_arg = TUNING[name]
        made = triton.autotune(configs=configs, key=key, do_bench=_tuning_bench,
                               prune_configs_by=_make_prune(weights, x_arg, *kind))(kernel)
        made.doe_lock = threading.Lock()  # (its run keeps the launch's arguments on itself)
        tuner = _TUNED.setdefault((name, *kind), made)
    if device.index is not None:  # (None: whichever GPU is current)
        _TUNED_ON[(name, device.index)] = tuner
    return tuner


def has_tuned(tuner, args: tuple, kwargs: dict) -> bool:
    """Whether `tuner` (a triton.autotune kernel) has its best config for a launch with `args`
    and `kwargs` (its key computed as Triton 3.x computes it: the key arguments' values, then
    the dtype of every tensor argument in order), so that the launch will not benchmark."""
    if len(tuner.configs) <= 1:
        return True
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {name: value for name, value in named.items() if name in tuner.arg_names}
    key = [named[name] for name in tuner.keys if name in named]
    key += [str(value.dtype) for value in named.values() if hasattr(value, "dtype")]
    return tuple(key) in tuner.cache


def interpreter_blocks(M: int, N: int, K: int):
    """Fixed large blocks for the interpreter (numpy is fast on big blocks, slow per program)."""
    def clamp(v):
        return max(16, min(128, triton.next_power_of_2(v)))
    return {"BLOCK_M": clamp(M), "BLOCK_N": clamp(N), "BLOCK_K": clamp(K), "GROUP_M": 8}


@triton.jit
def interpreter_probe_kernel(out_ptr, n):
    """out[i] = i for i < n, through a loop with a runtime bound, as the gather kernels' K loops.
    Run once on the CPU to learn whether this Triton's interpreter can run them."""
    for i in range(0, n, 1):
        tl.store(out_ptr + i, i)
