"""Gathered linear and gather FFN ops on every backend present, against float64 references."""
import os
import re
import subprocess
import sys

import pytest
import torch

import doe_kernels as dk
from conftest import backend_cases
from reference import (
    assert_close,
    cols_linear_ref,
    f64,
    ffn_ref,
    index_list,
    plain_torch,
    rows_linear_ref,
    swiglu_ffn_ref,
)

# (hidden, intermediate): odd sizes, both tiny and real (BERT-base) ones.
SHAPES = [(40, 1), (40, 37), (123, 37), (123, 300), (768, 37), (768, 3072)]
ROWS = [1, 3, 64, 257]
INDEX_KINDS = ["empty", "single", "full", "random"]


def _interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def _rows_for(device, backend, hidden, intermediate):
    """Row counts to run: all, except the largest products under the Triton interpreter (time)."""
    if not _interpreted(device, backend):
        return ROWS
    return [r for r in ROWS if r * hidden * intermediate <= 64 * 123 * 300]


def _weights(shape, dtype, device, bias=True):
    hidden, intermediate = shape
    make = lambda *s, fan: (torch.randn(*s) / fan**0.5).to(device, dtype)  # noqa: E731
    w_in = make(intermediate, hidden, fan=hidden)
    b_in = make(intermediate, fan=4) if bias else None
    w_out_t = make(intermediate, hidden, fan=max(1, intermediate * 0.35))
    b_out = make(hidden, fan=4) if bias else None
    return w_in, b_in, w_out_t, b_out


def _dense(op, *args, **kwargs):
    """PyTorch's own result in a low-precision dtype (sets the tolerance), None for float32."""
    return None if args[0].dtype == torch.float32 else plain_torch(op.__name__, *args, **kwargs)


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_gather_ffn(device, backend, dtype, shape, kind):
    w_in, b_in, w_out_t, b_out = _weights(shape, dtype, device)
    kept = index_list(kind, shape[1], device)
    for activation, rows in zip(["gelu", "gelu_tanh", "relu", "gelu"], _rows_for(device, backend, *shape)):
        x = torch.randn(rows, shape[0]).to(device, dtype)
        out = dk.gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, activation, backend=backend)
        dense = _dense(dk.gather_ffn, x, w_in, b_in, w_out_t, b_out, kept, activation)
        ref = ffn_ref(x, w_in, b_in, w_out_t, b_out, kept, activation)
        assert_close(out, ref, dense, f"gather_ffn {activation} rows={rows}")


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_gather_swiglu_ffn(device, backend, dtype, shape, kind):
    w_gate, _, w_down_t, _ = _weights(shape, dtype, device, bias=False)
    w_up = _weights(shape, dtype, device, bias=False)[0]
    kept = index_list(kind, shape[1], device)
    for rows in _rows_for(device, backend, *shape):
        x = torch.randn(2, rows, shape[0]).to(device, dtype)  # a leading batch dimension
        out = dk.gather_swiglu_ffn(x, w_gate, w_up, w_down_t, kept, backend=backend)
        dense = _dense(dk.gather_swiglu_ffn, x, w_gate, w_up, w_down_t, kept)
        ref = swiglu_ffn_ref(x, w_gate, w_up, w_down_t, kept)
        assert_close(out, ref, dense, f"gather_swiglu_ffn rows={rows}")


def _every_neuron_felt(shape, device, gen):
    """x (one row), w_in, b_in, w_gate, w_up, w_out_t, b_out (float32) under which each neuron
    adds at least about 0.7 to an output of at most about 20: x and the up projections positive,
    each up row scaled so that x . w is 1 to 2 (every neuron active), and one down entry per
    neuron, +-1 to 1.5 at output n mod hidden (an output sums at most ceil(intermediate / hidden)
    neurons)."""
    hidden, intermediate = shape
    x = 0.5 + torch.rand(1, hidden, generator=gen)

    def up():
        w = torch.rand(intermediate, hidden, generator=gen)
        return w * (1 + torch.rand(intermediate, 1, generator=gen)) / (w @ x.T)

    sign = torch.randint(0, 2, (intermediate,), generator=gen) * 2 - 1
    w_out_t = torch.zeros(intermediate, hidden)
    w_out_t[torch.arange(intermediate), torch.arange(intermediate) % hidden] = \
        sign * (1 + 0.5 * torch.rand(intermediate, generator=gen))
    b_in, b_out = (0.1 * torch.randn(n, generator=gen) for n in (intermediate, hidden))
    return [t.to(device) for t in (x, up(), b_in, up(), up(), w_out_t, b_out)]


@pytest.mark.parametrize("device,backend", [
    pytest.param(*p.values[:2], id=p.id, marks=p.marks) for p in backend_cases(with_dtype=True)
    if p.values[2] == torch.bfloat16])
@pytest.mark.parametrize("shape", [(123, 300), (768, 3072)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["random", "full"])
def test_one_bfloat16_row_counts_every_kept_neuron(device, backend, shape, kind):
    """gather_ffn and gather_swiglu_ffn on one bfloat16 row, where assert_close's floor (1% of
    the output's magnitude) may exceed what one neuron adds to the output (a kept neuron left
    out passed there): against float64 with twice PyTorch's own bfloat16 error allowed (at least
    2^-8 of the magnitude), on weights under which every kept neuron adds more than twice that to
    an output (checked), so that leaving out any one of them fails."""
    gen = torch.Generator().manual_seed(11)
    x, w_in, b_in, w_gate, w_up, w_out_t, b_out = (
        t.to(torch.bfloat16) for t in _every_neuron_felt(shape, device, gen))
    kept = index_list(kind, shape[1], device, generator=gen)
    hidden = {"gather_ffn": torch.nn.functional.gelu(f64(x) @ f64(w_in).T + f64(b_in)),
              "gather_swiglu_ffn": torch.nn.functional.silu(f64(x) @ f64(w_gate).T) *
              (f64(x) @ f64(w_up).T)}
    ffn_args, swiglu_args = (x, w_in, b_in, w_out_t, b_out, kept, "gelu"), \
        (x, w_gate, w_up, w_out_t, kept)
    checks = {
        "gather_ffn": (dk.gather_ffn(*ffn_args, backend=backend), ffn_ref(*ffn_args),
                       plain_torch("gather_ffn", *ffn_args)),
        "gather_swiglu_ffn": (dk.gather_swiglu_ffn(*swiglu_args, backend=backend),
                              swiglu_ffn_ref(*swiglu_args),
                              plain_torch("gather_swiglu_ffn", *swiglu_args)),
    }
    for name, (out, ref, dense) in checks.items():
        scale = ref.abs().max().item()
        allowed = max(2 * (dense.double() - ref).abs().max().item(), 2**-8 * scale)
        share = (hidden[name][0, kept].abs() * f64(w_out_t)[kept].abs().amax(1)).min().item()
        assert share > 2 * allowed, f"{name}: a neuron adds {share:.3g}, allowed {allowed:.3g}"
        err = (out.double() - ref).abs().max().item()
        assert err <= allowed, f"{name} {kind}: max error {err:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", INDEX_KINDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gathered_linears(device, backend, dtype, shape, kind, bias):
    weight, b, weight_t, b_out = _weights(shape, dtype, device, bias)
    index = index_list(kind, shape[1], device, dtype=torch.int32)  # int32 is accepted too
    for activation, rows in zip(["identity", "gelu", "relu", "gelu_tanh"], _rows_for(device, backend, *shape)):
        x = torch.randn(rows, shape[0]).to(device, dtype)
        out = dk.gather_rows_linear(x, weight, b, index, activation, backend=backend)
        dense = _dense(dk.gather_rows_linear, x, weight, b, index, activation)
        assert_close(out, rows_linear_ref(x, weight, b, index.long(), activation), dense,
                     f"gather_rows_linear {activation} rows={rows}")
        h = torch.randn(rows, index.numel()).to(device, dtype)
        out = dk.gather_cols_linear(h, weight_t, b_out, index, backend=backend)
        dense = _dense(dk.gather_cols_linear, h, weight_t, b_out, index)
        assert_close(out, cols_linear_ref(h, weight_t, b_out, index.long()), dense,
                     f"gather_cols_linear rows={rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("torch_threads", [1, 3], indirect=True)
def test_gather_cols_splits_few_rows_over_kept_rows(dtype, torch_threads):
    """At 1-8 rows of h the cpu backend splits the kept rows into one part per thread, each
    read whole into its own sums, and adds the parts up: every row count, with and without bias
    and scales, parts of uneven lengths, a ragged tail of columns."""
    if "cpu" not in dk.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    shape = (123, 3001)  # 123 outputs: a tail past the last full vector; 3001 neurons: 3 parts
    _, _, w_out_t, b_out = _weights(shape, dtype, "cpu")
    for kind, bias in (("random", b_out), ("full", None), ("single", b_out)):
        kept = index_list(kind, shape[1])
        scales = (1 + 0.5 * torch.randn(kept.numel())).to(dtype)
        for rows in range(1, 9):
            h = torch.randn(rows, kept.numel()).to(dtype)
            for sc in (None, scales):
                out = dk.gather_cols_linear(h, w_out_t, bias, kept, backend="cpu", scales=sc)
                dense = _dense(dk.gather_cols_linear, h, w_out_t, bias, kept, scales=sc)
                assert_close(out, cols_linear_ref(h, w_out_t, bias, kept, sc), dense,
                             f"gather_cols_linear {kind} rows={rows} threads={torch_threads}")


@pytest.mark.parametrize("cpu_regime", ["fused"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("outputs", [256, 512])
def test_gather_cols_packs_panels_of_aligned_rows(cpu_regime, dtype, outputs):
    """Where a weight_t row's bytes are a multiple of 1 KiB (256 or 512 float32 outputs, 512
    bfloat16), the fused gather_cols copies each column panel of the kept rows into a buffer,
    a chunk of kept rows at a time, before its row tiles read it: several tiles and chunks, bias
    and scales, against the reference."""
    _, _, w_out_t, b_out = _weights((outputs, 2500), dtype, "cpu")
    for kind in ("random", "full", "single"):
        kept = index_list(kind, 2500)  # random, full: several chunks of kept rows
        scales = (1 + 0.5 * torch.randn(kept.numel())).to(dtype)
        for rows in (9, 40, 100):
            h = torch.randn(rows, kept.numel()).to(dtype)
            for bias, sc in ((b_out, None), (None, scales)):
                out = dk.gather_cols_linear(h, w_out_t, bias, kept, backend="cpu", scales=sc)
                dense = _dense(dk.gather_cols_linear, h, w_out_t, bias, kept, scales=sc)
                assert_close(out, cols_linear_ref(h, w_out_t, bias, kept, sc), dense,
                             f"gather_cols_linear {kind} rows={rows} outputs={outputs}")


@pytest.mark.parametrize("cpu_regime", ["fused"], indirect=True)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fused_activations_over_the_float_range(cpu_regime, activation, rows):
    """The cpu kernels apply the activation to each tile they write (their own vectorised exp and
    erf): against float64 on every float32 magnitude the activation bends over, far past where its
    exp saturates, and on infinities and NaN (as the float64 formula gives them). One input feature
    of 1, so that each kept weight row is the activation's argument; 40 input rows over 24 kept
    rows take the split over input rows."""
    values = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor(
        [0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 87.5, -87.5, 89.0, -89.0, 300.0, -300.0, 3e38,
         -3e38, float("inf"), -float("inf"), float("nan")])])
    if rows == 40:
        values = values[torch.randperm(values.numel())[:24]]
    weight = values[:, None].contiguous()
    kept = torch.arange(values.numel())
    out = dk.gather_rows_linear(torch.ones(rows, 1), weight, None, kept, activation,
                                backend="cpu")
    ref = rows_linear_ref(torch.ones(rows, 1), weight, None, kept, activation)
    finite = torch.isfinite(ref)
    assert torch.equal(out[~finite].isnan(), ref[~finite].isnan())
    assert torch.equal(out[~finite].isinf(), ref[~finite].isinf())
    assert torch.equal(out[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()].float())
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=1e-6, rtol=2e-6)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_activations_of_special_values_on_every_backend(device, backend, activation):
    """Every backend's activation epilogue on infinities, NaN and tiny values gives what the
    float64 formula gives: a NaN stays NaN (ReLU of NaN too: Triton's maximum and a `v > 0 ? v :
    0` drop it); an infinity stays that infinity or becomes NaN (torch's own vectorised GELU of
    +inf is NaN); finite values as the formula's."""
    values = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.5, -3.5, 300.0, -300.0, 1e38, -1e38,
                           float("inf"), -float("inf"), float("nan")])
    weight = values[:, None].to(device)
    kept = torch.arange(values.numel(), device=device)
    x = torch.ones(3, 1, device=device)
    out = dk.gather_rows_linear(x, weight, None, kept, activation, backend=backend).cpu()
    ref = rows_linear_ref(x.cpu(), weight.cpu(), None, kept.cpu(), activation)
    finite, infinite = torch.isfinite(ref), ref.isinf()
    assert out[ref.isnan()].isnan().all(), (out, ref)
    assert (out[infinite].isnan() | (out[infinite].double() == ref[infinite])).all(), (out, ref)
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=1e-6, rtol=2e-6)
    ffn = dk.gather_ffn(x, weight, None, torch.ones_like(weight), None, kept, activation,
                        backend=backend).cpu()  # (a NaN activation makes the whole row NaN)
    assert torch.equal(ffn.isnan().all(), ref.isnan().any())


@pytest.mark.parametrize("cpu_regime", ["gather"], indirect=True)
def test_large_gathers_reuse_a_scratch_buffer(cpu_regime):
    """Copies of 16 MiB or more (the gather + GEMM regime) land in a buffer the thread reuses:
    successive calls on different weights, SwiGLU's two copies, and scales applied to the copy
    in place all match the reference."""
    shape = (1024, 4100)  # 4100 x 1024 float32 rows: 16.8 MB when all are kept
    x = torch.randn(3, shape[0])
    for seed in (0, 1):
        torch.manual_seed(seed)
        w_in, b_in, w_out_t, b_out = _weights(shape, torch.float32, "cpu")
        w_up = _weights(shape, torch.float32, "cpu")[0]
        kept = index_list("full", shape[1])  # every call copies 16.8 MB
        scales = 1 + 0.5 * torch.randn(kept.numel())
        h = torch.randn(3, kept.numel())
        assert_close(dk.gather_rows_linear(x, w_in, b_in, kept, "gelu", backend="cpu"),
                     rows_linear_ref(x, w_in, b_in, kept, "gelu"), None, f"rows seed={seed}")
        assert_close(dk.gather_cols_linear(h, w_out_t, b_out, kept, backend="cpu", scales=scales),
                     cols_linear_ref(h, w_out_t, b_out, kept, scales), None, f"cols seed={seed}")
        assert_close(dk.gather_swiglu_ffn(x, w_in, w_up, w_out_t, kept, backend="cpu"),
                     swiglu_ffn_ref(x, w_in, w_up, w_out_t, kept), None, f"swiglu seed={seed}")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_zero_rows(device, backend):
    w_in, b_in, w_out_t, b_out = _weights((40, 37), torch.float32, device)
    x = torch.randn(0, 40, device=device)
    kept = index_list("random", 37, device)
    assert dk.gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, backend=backend).shape == (0, 40)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_registered_ops_read_strided_index_lists(device, backend):
    """The registered ops (torch.ops.doe_kernels.*, which the public ops call after checking)
    read an index list that is a strided view as its values: the Triton kernels read the list
    with stride 1, so a view of every other entry gave another expert's neurons."""
    gen = torch.Generator().manual_seed(3)
    x, h = torch.randn(5, 24, generator=gen), torch.randn(5, 7, generator=gen)  # h: 7 kept
    w_in, w_gate = torch.randn(40, 24, generator=gen), torch.randn(40, 24, generator=gen)
    w_out_t, b_in = torch.randn(40, 16, generator=gen), torch.randn(40, generator=gen)
    b_out = torch.randn(16, generator=gen)
    x, h, w_in, w_gate, w_out_t, b_in, b_out = (
        t.to(device) for t in (x, h, w_in, w_gate, w_out_t, b_in, b_out))
    strided = torch.arange(0, 40, 3, device=device).flip(0)[::2]
    assert not strided.is_contiguous()
    ops = torch.ops.doe_kernels
    calls = {"rows": lambda kept: ops.gather_rows_linear(x, w_in, b_in, kept, "gelu", backend),
             "cols": lambda kept: ops.gather_cols_linear(h, w_out_t, b_out, kept, backend),
             "ffn": lambda kept: ops.gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, "relu",
                                                backend),
             "swiglu": lambda kept: ops.gather_swiglu_ffn(x, w_gate, w_in, w_out_t, kept,
                                                          backend)}
    for name, call in calls.items():
        torch.testing.assert_close(call(strided), call(strided.contiguous()), msg=name)


def test_input_major_is_a_contiguous_transpose():
    weight = torch.randn(7, 5)
    converted = dk.input_major(weight)
    assert converted.is_contiguous() and torch.equal(converted, weight.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 9, 64])
def test_torch_backend_computes_as_linear_layers_of_the_sliced_weights(dtype, rows):
    """The torch backend's column-gathered linear, and its FFN keeping every neuron, give what
    F.linear gives over the kept weights as a patched model lays them out (input-major), bit for
    bit: the bias added inside the GEMM with one rounding, as a Linear layer adds it (a product
    rounded to bfloat16 before the bias is added differs from it by a unit)."""
    F = torch.nn.functional
    torch.manual_seed(rows)
    w_in, b_in, w_out_t, b_out = _weights((123, 300), dtype, "cpu")
    cols = index_list("random", 300, "cpu")
    h = torch.randn(rows, cols.numel(), dtype=dtype)
    assert torch.equal(dk.gather_cols_linear(h, w_out_t, b_out, cols, backend="torch"),
                       F.linear(h, w_out_t[cols].T, b_out))
    x = torch.randn(rows, 123, dtype=dtype)
    expected = F.linear(F.gelu(F.linear(x, w_in, b_in)), w_out_t.T, b_out)
    assert torch.equal(dk.gather_ffn(x, w_in, b_in, w_out_t, b_out, torch.arange(300), "gelu",
                                     backend="torch"), expected)


def _vector_lanes() -> int:
    """The float32 lanes of the vectors the cpu kernels run in this process (16: AVX-512, 8: AVX2,
    4: the portable path), as DOE_KERNELS_CPU_ISA caps them: a one-row gather_rows_linear in the
    fused regime, whose lane i sums the products i, i + lanes, ... in order before the lanes are
    added up. Of 2^25 at k = 0, -2^25 at k = 16 and a 1 at k = 8 (row 0) or k = 4 (row 1), a 1
    that shares a lane with 2^25 is lost in its rounding (half its ulp is 2), one in a lane of its
    own is not: (1, 1) with 16 lanes, (0, 1) with 8, (0, 0) with 4."""
    from doe_kernels._ext import extension

    big = 2.0**25
    weight = torch.zeros(2, 32)
    weight[:, 0], weight[:, 16] = big, -big
    weight[0, 8] = weight[1, 4] = 1.0
    forced = extension().cpu_gather_above()
    extension().set_cpu_gather_above(10**12)  # the fused kernels, whatever the environment says
    try:
        out = dk.gather_rows_linear(torch.ones(1, 32), weight, None, torch.arange(2),
                                    backend="cpu")
    finally:
        extension().set_cpu_gather_above(forced)
    lanes = {(1.0, 1.0): 16, (0.0, 1.0): 8, (0.0, 0.0): 4}.get(tuple(out[0].tolist()))
    assert lanes is not None, f"no lane count gives {out.tolist()}"
    return lanes


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpu_kernels_on_narrower_instruction_sets(isa):
    """The C++ kernels' AVX2 and portable paths (the machine's widest path runs above), the
    decoding split and the packed panels of gather_cols included; the process running them
    reports the vectors of the instruction set asked for (at most this machine's widest)."""
    from doe_kernels._ext import extension

    if extension() is None:
        pytest.skip("the cpu backend is not built")
    lanes = min({"avx2": 8, "generic": 4}[isa], _vector_lanes())
    env = dict(os.environ, DOE_KERNELS_CPU_ISA=isa)
    args = [__file__, "-q", "-p", "no:cacheprovider", "-k",
            "(cpu-cpu and (random or single) and not 768x3072) or splits_few or packs_panels "
            "or activations_over"]
    # the lanes read in the process that ran the tests, after them (this module imported by
    # pytest first, so that its assertions are rewritten)
    code = (f"import sys, pytest; code = pytest.main({args!r}); "
            "from test_ffn_ops import _vector_lanes; "
            "print('vector lanes', _vector_lanes()); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=600, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"vector lanes {lanes}\n" in result.stdout, result.stdout[:3000]
    assert " passed" in result.stdout and not re.search(r"\d+ failed", result.stdout)


def _cpu_case(shape, dtype, kind: str, rows: int):
    """Weights of a BERT FFN plus a SwiGLU up projection (w_in, b_in, w_out_t, b_out, w_up), their
    copies, a kept list of `kind`, scales for it, x and h of `rows` rows."""
    w_in, b_in, w_out_t, b_out = _weights(shape, dtype, "cpu")
    weights = (w_in, b_in, w_out_t, b_out, _weights(shape, dtype, "cpu")[0])
    kept = index_list(kind, shape[1])
    scales = (1 + 0.5 * torch.randn(kept.numel())).to(dtype)
    x = torch.randn(rows, shape[0]).to(dtype)
    h = torch.randn(rows, kept.numel()).to(dtype)
    return weights, [w.clone() for w in weights], kept, scales, x, h


@pytest.mark.parametrize("cpu_regime", ["fused", "gather"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["single", "random", "full"])
@pytest.mark.parametrize("rows", [1, 40])
def test_both_cpu_regimes_match_the_reference(cpu_regime, dtype, kind, rows):
    """Each regime on every dtype at few and many rows, whichever the default rule picks here. A
    full list in the gather + GEMM regime multiplies the weight itself (nothing copied), and
    scales then go to a copy: the weights stay as they were."""
    (w_in, b_in, w_out_t, b_out, w_up), before, kept, scales, x, h = _cpu_case(
        (123, 300), dtype, kind, rows)
    checks = {
        "gather_rows_linear": (dk.gather_rows_linear(x, w_in, b_in, kept, "gelu", backend="cpu"),
                               rows_linear_ref(x, w_in, b_in, kept, "gelu"),
                               _dense(dk.gather_rows_linear, x, w_in, b_in, kept, "gelu")),
        "gather_cols_linear": (dk.gather_cols_linear(h, w_out_t, b_out, kept, backend="cpu",
                                                     scales=scales),
                               cols_linear_ref(h, w_out_t, b_out, kept, scales),
                               _dense(dk.gather_cols_linear, h, w_out_t, b_out, kept,
                                      scales=scales)),
        "gather_swiglu_ffn": (dk.gather_swiglu_ffn(x, w_in, w_up, w_out_t, kept, backend="cpu"),
                              swiglu_ffn_ref(x, w_in, w_up, w_out_t, kept),
                              _dense(dk.gather_swiglu_ffn, x, w_in, w_up, w_out_t, kept)),
    }
    for name, (out, ref, dense) in checks.items():
        assert_close(out, ref, dense, f"{name} ({cpu_regime}) rows={rows}")
    assert all(torch.equal(w, b) for w, b in zip((w_in, b_in, w_out_t, b_out, w_up), before))


@pytest.mark.parametrize("rows", [17, 45, 128, 129])
@pytest.mark.parametrize("kind", ["single", "random"])
def test_the_amx_path_matches_the_reference(rows, kind):
    """bfloat16 on a CPU with AMX, in the gather + GEMM regime: the kept rows gathered into the
    matrix unit's tiles (up to 128 rows; 129 takes the copy), with bias, activation, scales and
    SwiGLU, over lists whose length is no multiple of 32; the weights stay as they were."""
    from doe_kernels._ext import extension

    if extension() is None or not extension().cpu_amx_gather_available():
        pytest.skip("no AMX here (or DOE_KERNELS_CPU_AMX=0)")
    (w_in, b_in, w_out_t, b_out, w_up), before, kept, scales, x, h = _cpu_case(
        (96, 301), torch.bfloat16, kind, rows)
    calls = extension().cpu_amx_gather_calls()
    for activation in ("gelu", "relu"):
        assert_close(dk.gather_rows_linear(x, w_in, b_in, kept, activation, backend="cpu"),
                     rows_linear_ref(x, w_in, b_in, kept, activation),
                     _dense(dk.gather_rows_linear, x, w_in, b_in, kept, activation),
                     f"gather_rows_linear {activation} rows={rows}")
    for s in (None, scales):
        assert_close(dk.gather_cols_linear(h, w_out_t, b_out, kept, backend="cpu", scales=s),
                     cols_linear_ref(h, w_out_t, b_out, kept, s),
                     _dense(dk.gather_cols_linear, h, w_out_t, b_out, kept, scales=s),
                     f"gather_cols_linear rows={rows} scaled={s is not None}")
    assert_close(dk.gather_swiglu_ffn(x, w_in, w_up, w_out_t, kept, backend="cpu"),
                 swiglu_ffn_ref(x, w_in, w_up, w_out_t, kept),
                 _dense(dk.gather_swiglu_ffn, x, w_in, w_up, w_out_t, kept),
                 f"gather_swiglu_ffn rows={rows}")
    # rows x2, cols x2, SwiGLU's gate and up, then its down projection: on AMX up to 128 rows
    ran = extension().cpu_amx_gather_calls() - calls
    assert ran == (7 if rows <= 128 else 0), ran
    assert all(torch.equal(w, b) for w, b in zip((w_in, b_in, w_out_t, b_out, w_up), before))


def test_the_amx_path_can_be_turned_off():
    """DOE_KERNELS_CPU_AMX=0, or an instruction set capped below AVX-512, keeps the copy."""
    from doe_kernels._ext import extension

    if extension() is None or not extension().cpu_amx_gather_available():
        pytest.skip("no AMX here: nothing to turn off")
    code = "from doe_kernels._ext import extension; print(extension().cpu_amx_gather_available())"
    for env in ({"DOE_KERNELS_CPU_AMX": "0"}, {"DOE_KERNELS_CPU_ISA": "avx2"}):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=dict(os.environ, **env), timeout=120)
        assert result.stdout.strip() == "False", (env, result.stderr[-2000:])


def test_the_cpu_regime_override():
    """set_gather_above checks its argument and None restores the default rule; the environment
    variable sets the override at start-up."""
    from doe_kernels._ext import extension
    from doe_kernels.backends import cpu

    if extension() is None:
        pytest.skip("the cpu backend is not built")
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="non-negative int or None"):
            cpu.set_gather_above(bad)
    cpu.set_gather_above(7)
    assert extension().cpu_gather_above() == 7
    cpu.set_gather_above(None)
    assert extension().cpu_gather_above() == -1
    code = "from doe_kernels._ext import extension; print(extension().cpu_gather_above())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, DOE_KERNELS_CPU_GATHER_ABOVE="5"), timeout=120)
    assert result.stdout.strip() == "5", result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_autotuned_path(monkeypatch, dtype):
    """The autotuned Triton kernels (the GPU default) on real shapes, decode to prefill."""
    if "triton" not in dk.available_backends("cuda"):
        pytest.skip("triton is not available")
    monkeypatch.setenv("DOE_KERNELS_TRITON_AUTOTUNE", "1")
    for shape in [(768, 3072), (1024, 2816)]:
        w_in, b_in, w_out_t, b_out = _weights(shape, dtype, "cuda")
        w_up = _weights(shape, dtype, "cuda", bias=False)[0]
        kept = index_list("random", shape[1], "cuda")
        for rows in (1, 16, 64, 512):
            x = torch.randn(rows, shape[0]).to("cuda", dtype)
            out = dk.gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, "gelu", backend="triton")
            assert_close(out, ffn_ref(x, w_in, b_in, w_out_t, b_out, kept, "gelu"),
                         _dense(dk.gather_ffn, x, w_in, b_in, w_out_t, b_out, kept, "gelu"),
                         f"autotuned gather_ffn {shape} rows={rows}")
            out = dk.gather_swiglu_ffn(x, w_in, w_up, w_out_t, kept, backend="triton")
            assert_close(out, swiglu_ffn_ref(x, w_in, w_up, w_out_t, kept),
                         _dense(dk.gather_swiglu_ffn, x, w_in, w_up, w_out_t, kept),
                         f"autotuned gather_swiglu_ffn {shape} rows={rows}")


def test_eager_calls_skip_the_dispatcher_and_others_do_not(monkeypatch):
    """Plain eager calls run the implementation directly; a call that may be differentiated (or
    traced, or on a tensor subclass) goes through the registered op, which raises here."""
    from doe_kernels.ops import library

    def refuse(*args):
        raise AssertionError("the registered op ran")

    monkeypatch.setattr(library, "_gather_rows_linear_op", refuse)
    w, kept = torch.randn(6, 4), torch.tensor([1, 4])
    x = torch.randn(3, 4)
    expected = x @ w[kept].T
    torch.testing.assert_close(library.gather_rows_linear(x, w, None, kept, "identity", "auto"),
                               expected)
    with pytest.raises(AssertionError, match="registered op"):
        library.gather_rows_linear(x.requires_grad_(), w, None, kept, "identity", "auto")
    with torch.no_grad():  # no gradient asked for: direct again
        library.gather_rows_linear(x, w, None, kept, "identity", "auto")

    class Sub(torch.Tensor):
        pass

    with pytest.raises(AssertionError, match="registered op"), torch.no_grad():
        library.gather_rows_linear(x.detach().as_subclass(Sub), w, None, kept, "identity", "auto")


def test_the_default_keep_all_rule():
    """Without an override a layer keeping every row runs the cpu kernels at up to 8 rows
    (decoding) on every CPU and in both dtypes, in float32 at any row count on AMD CPUs with
    AVX-512 only, in bfloat16 at any row count on CPUs without AVX-512 only."""
    from doe_kernels._ext import extension
    from doe_kernels.backends import cpu

    if extension() is None:
        pytest.skip("the cpu backend is not built")
    if os.environ.get("DOE_KERNELS_CPU_GATHER_ABOVE"):
        pytest.skip("the environment overrides the rule")
    cpu.set_gather_above(None)
    assert cpu.runs_fused_dense(torch.float32, 1) and cpu.runs_fused_dense(torch.float32, 8)
    assert cpu.runs_fused_dense(torch.bfloat16, 1) and cpu.runs_fused_dense(torch.bfloat16, 8)
    assert not cpu.runs_fused_dense(torch.float16, 1)  # a dtype the backend does not take
    try:
        with open("/proc/cpuinfo") as info:
            cpuinfo = info.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's vendor from")
    # float32 on AMD CPUs whose kernels run AVX-512 (not capped by DOE_KERNELS_CPU_ISA) stays
    # fused at every row count; elsewhere ATen's GEMM takes more than 8 rows
    flags = set(next((line for line in cpuinfo.splitlines() if line.startswith("flags")),
                     "").split())
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and \
        os.environ.get("DOE_KERNELS_CPU_ISA") not in ("generic", "avx2")  # the C++ cap's values
    fused = "AuthenticAMD" in cpuinfo and avx512
    assert cpu.runs_fused_dense(torch.float32, 9) == fused
    assert cpu.runs_fused_dense(torch.float32, 4096) == fused
    # bfloat16 where ATen has no oneDNN GEMM for it (CPUs without AVX-512 BW, VL, DQ; its own
    # loops are slow) stays fused
    onednn_bf16 = {"avx512bw", "avx512vl", "avx512dq"} <= flags
    assert cpu.runs_fused_dense(torch.bfloat16, 9) == (not onednn_bf16)
    assert extension().cpu_uses_gather_gemm(False, 4096, 1 << 20) == onednn_bf16
