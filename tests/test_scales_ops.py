"""Per-column `scales` (Kwon et al. 2022's mask tuning) in gather_cols_linear and the gather FFNs.

On every backend present and every dtype it claims, against float64 references on fresh random
inputs: the column-gathered op scales each kept input column, the FFNs each kept neuron's activation
before the down projection (the masked-dense reference with the mask holding the scales).
scales=None gives bit for bit the call without the argument, and scales of ones the unscaled
result. Bad scales are refused with an error naming them.
"""
import pytest
import torch

import doe_kernels as dk
from conftest import backend_cases
from doe_kernels._ext import extension
from reference import (
    FLOOR,
    assert_close,
    cols_linear_ref,
    ffn_ref,
    index_list,
    plain_torch,
    swiglu_ffn_ref,
)

# (hidden, intermediate): odd sizes around the kernels' blocks (Triton's interpreter K steps of up
# to 128, the CPU's 64-column panels), tiny to BERT-base.
SHAPES = [(40, 1), (123, 37), (65, 129), (123, 300), (768, 37), (768, 3072)]
# 1 and 16 rows: the decode kernels (the CPU's bfloat16 fused path); 17 and more: its bfloat16 gather
# + GEMM (and, on a GPU, the cuda backend's second chunk of 16 rows). test_ffn_ops forces each CPU
# regime for every dtype.
ROWS = [1, 16, 17, 64]
INDEX_KINDS = ["empty", "single", "full", "random"]
OPS = ["gather_cols_linear", "gather_ffn", "gather_swiglu_ffn"]


def _rows_for(device, backend, hidden, intermediate):
    """Row counts to run: all, except the largest products under the Triton interpreter (time)."""
    if not (device == "cpu" and backend == "triton"):
        return ROWS
    return [r for r in ROWS if r * hidden * intermediate <= 64 * 123 * 300]


def _make(*shape, fan=1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape) / fan**0.5).to(device, dtype)


def _scales(n, dtype, device):
    """Fitted-scale-like factors: around 1, some small, a few negative."""
    return (1 + 0.5 * torch.randn(n)).to(device, dtype)


def _weights(shape, dtype, device):
    hidden, intermediate = shape
    make = dict(dtype=dtype, device=device)
    return dict(
        w_in=_make(intermediate, hidden, fan=hidden, **make),
        w_up=_make(intermediate, hidden, fan=hidden, **make),
        b_in=_make(intermediate, fan=4, **make),
        w_out_t=_make(intermediate, hidden, fan=max(1, intermediate * 0.35), **make),
        b_out=_make(hidden, fan=4, **make),
    )


def _call(op, w, x, kept, backend, **options):
    """One op: `x` is h (..., len(kept)) for gather_cols_linear, else (..., hidden)."""
    if op == "gather_cols_linear":
        return dk.gather_cols_linear(x, w["w_out_t"], w["b_out"], kept, backend=backend, **options)
    if op == "gather_ffn":
        return dk.gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], kept, "gelu",
                             backend=backend, **options)
    return dk.gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], kept, backend=backend,
                                **options)


def _plain(op, w, x, kept, scales):
    """PyTorch's own result in the inputs' dtype (reference.plain_torch), as `_call` calls `op`."""
    kept = kept.long()
    if op == "gather_cols_linear":
        return plain_torch(op, x, w["w_out_t"], w["b_out"], kept, scales=scales)
    if op == "gather_ffn":
        return plain_torch(op, x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], kept, "gelu",
                           scales=scales)
    return plain_torch(op, x, w["w_in"], w["w_up"], w["w_out_t"], kept, scales=scales)


def _reference(op, w, x, kept, scales):
    kept = kept.long()
    if op == "gather_cols_linear":
        return cols_linear_ref(x, w["w_out_t"], w["b_out"], kept, scales)
    if op == "gather_ffn":
        return ffn_ref(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], kept, "gelu", scales)
    return swiglu_ffn_ref(x, w["w_in"], w["w_up"], w["w_out_t"], kept, scales)


def _input(op, leading, shape, kept, dtype, device):
    features = kept.numel() if op == "gather_cols_linear" else shape[0]
    return torch.randn(*leading, features).to(device, dtype)


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", INDEX_KINDS)
@pytest.mark.parametrize("op", OPS)
def test_scaled_ops_match_the_float64_reference(device, backend, dtype, shape, kind, op):
    w = _weights(shape, dtype, device)
    index_dtype = torch.int32 if kind == "random" else torch.int64  # int32 is accepted too
    kept = index_list(kind, shape[1], device, dtype=index_dtype)
    scales = _scales(kept.numel(), dtype, device)
    # 2-D, and 3-D with a leading batch dimension (the last row count), fresh inputs each.
    row_counts = _rows_for(device, backend, *shape)
    for leading in [(rows,) for rows in row_counts[:-1]] + [(2, row_counts[-1])]:
        x = _input(op, leading, shape, kept, dtype, device)
        out = _call(op, w, x, kept, backend, scales=scales)
        dense = None if dtype == torch.float32 else _plain(op, w, x, kept, scales)
        assert_close(out, _reference(op, w, x, kept, scales), dense, f"{op} scaled x{leading}")


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("op", OPS)
def test_one_dimensional_input(device, backend, dtype, op):
    """A single token without a row dimension: (features,) -> (out_features,)."""
    shape = (123, 300)
    w = _weights(shape, dtype, device)
    kept = index_list("random", shape[1], device)
    scales = _scales(kept.numel(), dtype, device)
    x = _input(op, (), shape, kept, dtype, device)
    out = _call(op, w, x, kept, backend, scales=scales)
    dense = None if dtype == torch.float32 else _plain(op, w, x, kept, scales)
    assert out.shape == (shape[0],)
    assert_close(out, _reference(op, w, x, kept, scales), dense, f"{op} scaled 1-D x")


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows", [3, 40])
def test_no_scales_and_unit_scales(device, backend, dtype, op, rows):
    """scales=None is the call without the argument, bit for bit; scales of ones give that result
    too (bit for bit on the CPU, where x * 1 is exact and the kernels deterministic)."""
    shape = (123, 300)
    w = _weights(shape, dtype, device)
    kept = index_list("random", shape[1], device)
    x = _input(op, (rows,), shape, kept, dtype, device)
    unscaled = _call(op, w, x, kept, backend)
    assert torch.equal(_call(op, w, x, kept, backend, scales=None), unscaled)
    ones = _call(op, w, x, kept, backend, scales=torch.ones(kept.numel(), dtype=dtype,
                                                             device=device))
    if device == "cpu":
        assert torch.equal(ones, unscaled)
    else:
        assert_close(ones, unscaled.double(), None, f"{op} with scales of ones")


def test_torch_backend_without_scales_is_the_plain_formula():
    """The reference backend without scales: index_select, one matmul, the bias; nothing else."""
    w = _weights((123, 300), torch.float32, "cpu")
    kept = index_list("random", 300)
    h = torch.randn(5, kept.numel())
    expected = h @ w["w_out_t"].index_select(0, kept) + w["b_out"]
    assert torch.equal(_call("gather_cols_linear", w, h, kept, "torch"), expected)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("op", OPS)
def test_empty_index_list_and_empty_input(device, backend, op):
    """No kept column: the bias (or zeros), whatever the (empty) scales; no row: an empty result."""
    shape = (40, 37)
    w = _weights(shape, torch.float32, device)
    none_kept = index_list("empty", shape[1], device)
    empty_scales = torch.empty(0, device=device)
    x = _input(op, (3,), shape, none_kept, torch.float32, device)
    out = _call(op, w, x, none_kept, backend, scales=empty_scales)
    expected = torch.zeros(3, shape[0], device=device)
    if op != "gather_swiglu_ffn":
        expected = expected + w["b_out"]
    assert torch.equal(out, expected)
    kept = index_list("random", shape[1], device)
    x = _input(op, (0,), shape, kept, torch.float32, device)
    out = _call(op, w, x, kept, backend, scales=_scales(kept.numel(), torch.float32, device))
    assert out.shape == (0, shape[0])


@pytest.mark.parametrize("device,backend", backend_cases())
def test_full_index_list_equals_the_dense_layer_with_scaled_inputs(device, backend):
    """Every neuron kept: the dense FFN whose hidden activations are multiplied by the scales."""
    shape = (123, 300)
    w = _weights(shape, torch.float32, device)
    kept = index_list("full", shape[1], device)
    scales = _scales(shape[1], torch.float32, device)
    x = torch.randn(7, shape[0], device=device)
    hidden = torch.nn.functional.gelu(x @ w["w_in"].T + w["b_in"])
    dense = (hidden * scales) @ w["w_out_t"] + w["b_out"]
    out = _call("gather_ffn", w, x, kept, backend, scales=scales)
    torch.testing.assert_close(out, dense, rtol=0, atol=FLOOR[torch.float32] * 10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("scales,error,match", [
    (torch.ones(4), ValueError, "scales has size 4 in dimension 0 but the number of kept"),
    (torch.ones(2), ValueError, "scales has size 2 in dimension 0 but the number of kept"),
    (torch.ones(3, dtype=torch.float64), TypeError,
     "scales has dtype torch.float64 but x(_kept)? has torch.float32"),
    (torch.ones(3, dtype=torch.bfloat16), TypeError, "scales has dtype torch.bfloat16"),
    (torch.ones(3, device="meta"), ValueError, "scales is on meta but x(_kept)? is on cpu"),
    (torch.ones(1, 3), ValueError, r"scales must be 1-D, got shape \(1, 3\)"),
    (torch.ones(3, 1), ValueError, r"scales must be 1-D, got shape \(3, 1\)"),
    (torch.ones(()), ValueError, r"scales must be 1-D, got shape \(\)"),
    (torch.ones(3, dtype=torch.int64), TypeError, "scales must be a floating-point tensor"),
    ([1.0, 1.0, 1.0], TypeError, "scales must be a torch.Tensor, got list"),
])
def test_bad_scales_are_refused(op, scales, error, match):
    shape = (40, 37)
    w = _weights(shape, torch.float32, "cpu")
    kept = torch.tensor([1, 5, 9])
    x = _input(op, (2,), shape, kept, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        _call(op, w, x, kept, "auto", scales=scales)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_scales_on_another_device_type_are_refused():
    w = _weights((40, 37), torch.float32, "cuda")
    kept = torch.tensor([1, 5, 9], device="cuda")
    with pytest.raises(ValueError, match="scales is on cpu but x_kept is on cuda"):
        _call("gather_cols_linear", w, torch.randn(2, 3, device="cuda"), kept, "auto",
              scales=torch.ones(3))


@pytest.mark.parametrize("bad,match", [
    (torch.ones(4), "scales has 4 entries but cols has 3"),
    (torch.ones(3, dtype=torch.float64), "scales dtype Double differs from the input's Float"),
    (torch.ones(3, 2)[:, 0], "scales must be contiguous"),
    (torch.ones(1, 3), "scales must be 1-D"),
])
def test_the_cpu_kernel_checks_scales_itself(bad, match):
    """The C++ entry point does not trust its caller either (TORCH_CHECK, RuntimeError)."""
    if extension() is None:
        pytest.skip("the cpu backend is not built")
    h, weight_t, cols = torch.randn(2, 3), torch.randn(37, 40), torch.tensor([1, 5, 9])
    with pytest.raises(RuntimeError, match=match):
        extension().gather_cols_linear_cpu(h, weight_t, None, cols, bad)


def test_scaled_ffn_compiles_with_torch_compile():
    w = _weights((40, 37), torch.float32, "cpu")
    kept = index_list("random", 37)
    scales = _scales(kept.numel(), torch.float32, "cpu")

    def ffn(x):
        return dk.gather_ffn(x, w["w_in"], None, w["w_out_t"], None, kept, "gelu",
                             check_indices=False, scales=scales)

    x = torch.randn(3, 40)
    torch.testing.assert_close(torch.compile(ffn, fullgraph=True)(x), ffn(x))


def test_scales_and_check_indices_are_keyword_only():
    """A scales tensor passed where check_indices stands (as the README's earlier signature
    suggested) is refused instead of read as the flag, the output left unscaled."""
    h, wt = torch.randn(2, 1), torch.randn(4, 3)
    with pytest.raises(TypeError):
        dk.gather_cols_linear(h, wt, None, torch.tensor([3]), "auto", torch.tensor([0.5]))
    scaled = dk.gather_cols_linear(h, wt, None, torch.tensor([3]), "auto",
                                   scales=torch.tensor([0.5]))
    torch.testing.assert_close(scaled, 0.5 * h @ wt[3:4])
