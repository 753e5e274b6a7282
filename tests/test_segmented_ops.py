"""Segmented gather FFNs (mixed-task batches) on every backend present, against float64 references:
each segment of rows equals the masked-dense FFN on its own kept neurons (and scales)."""
import types

import pytest
import torch
import torch.nn.functional as F

import doe_kernels as dk
from doe_kernels.ops import library
from conftest import backend_cases
from reference import assert_close, ffn_ref, plain_torch, swiglu_ffn_ref

HIDDEN, INTERMEDIATE = 40, 37  # odd sizes


def _random_layout(seed: int, device, intermediate=INTERMEDIATE, max_rows=9):
    """1-6 segments of 0-`max_rows` rows, each keeping an empty, full or random list, with
    scales."""
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 7, (), generator=gen))
    rows = torch.randint(0, max_rows + 1, (count,), generator=gen).tolist()
    lists = []
    for s in range(count):
        kind = ("empty", "full", "random", "random")[int(torch.randint(0, 4, (), generator=gen))]
        size = {"empty": 0, "full": intermediate}.get(
            kind, int(torch.randint(1, intermediate, (), generator=gen)))
        lists.append(torch.randperm(intermediate, generator=gen)[:size].sort().values)
    scales = [1 + 0.3 * torch.randn(len(k), generator=gen, dtype=torch.float64) for k in lists]
    return rows, lists, scales


def _weights(dtype, device, gen, hidden=HIDDEN, intermediate=INTERMEDIATE):
    make = lambda *s, fan: (torch.randn(*s, generator=gen) / fan**0.5).to(device, dtype)  # noqa
    return dict(w_in=make(intermediate, hidden, fan=hidden), b_in=make(intermediate, fan=4),
                w_up=make(intermediate, hidden, fan=hidden),
                w_out_t=make(intermediate, hidden, fan=intermediate * 0.35),
                b_out=make(hidden, fan=4))


def _per_segment(rows, lists, scales, x, reference):
    """The float64 reference, each segment on its own kept list."""
    outs, start = [], 0
    for count, kept, scale in zip(rows, lists, scales):
        outs.append(reference(x[start:start + count], kept, scale))
        start += count
    return torch.cat(outs)


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("strategy", ["segments", "union", "auto"])
def test_segmented_ffns_equal_each_segment_alone(device, backend, dtype, seed, scaled, strategy):
    rows, lists, scales = _random_layout(seed, device)
    w = _weights(dtype, device, torch.Generator().manual_seed(100 + seed))
    x = torch.randn(sum(rows), HIDDEN, generator=torch.Generator().manual_seed(seed)).to(
        device, dtype)
    segments, kept, kept_offsets, packed = dk.pack_segments(
        rows, lists, scales if scaled else None, device=device)
    packed = None if packed is None else packed.to(dtype)
    scales = [s.to(device, dtype) if scaled else None for s in scales]
    lists = [k.to(device) for k in lists]

    out = dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], segments,
                                  kept, kept_offsets, "gelu", backend=backend, scales=packed,
                                  strategy=strategy)
    ref = _per_segment(rows, lists, scales, x, lambda xs, k, s: ffn_ref(
        xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu", s))
    assert_close(out, ref, _dense_segments(rows, lists, scales, x, lambda xs, k, s: plain_torch(
        "gather_ffn", xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu",
        scales=s)), f"segmented_gather_ffn {rows}")

    out = dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], segments, kept,
                                         kept_offsets, backend=backend, scales=packed,
                                         strategy=strategy)
    ref = _per_segment(rows, lists, scales, x, lambda xs, k, s: swiglu_ffn_ref(
        xs, w["w_in"], w["w_up"], w["w_out_t"], k, s))
    assert_close(out, ref, _dense_segments(rows, lists, scales, x,
                                           lambda xs, k, s: plain_torch(
                                               "gather_swiglu_ffn", xs, w["w_in"], w["w_up"],
                                               w["w_out_t"], k, scales=s)),
                 f"segmented_gather_swiglu_ffn {rows}")


def _dense_segments(rows, lists, scales, x, op):
    """PyTorch's result in a low-precision dtype (sets the tolerance), None for float32."""
    if x.dtype == torch.float32:
        return None
    return _per_segment(rows, lists, scales, x, op)


def test_no_rows_and_a_single_segment():
    gen = torch.Generator().manual_seed(0)
    w = _weights(torch.float32, "cpu", gen)
    kept = torch.tensor([1, 5, 30])
    x = torch.randn(4, HIDDEN, generator=gen)
    segments, packed, offsets, _ = dk.pack_segments([4], [kept])
    alone = dk.gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], kept)
    assert torch.equal(dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"],
                                                      segments, packed, offsets), alone)
    segments, packed, offsets, _ = dk.pack_segments([0, 0], [kept, kept])
    out = dk.segmented_gather_ffn(x[:0], w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                  segments, packed, offsets)
    assert out.shape == (0, HIDDEN)


def test_union_with_a_segment_without_rows_keeping_other_neurons():
    gen = torch.Generator().manual_seed(3)
    w = _weights(torch.float32, "cpu", gen)
    lists = [torch.tensor([1, 2, 3]), torch.tensor([30, 35, 36]), torch.tensor([2, 3, 9])]
    x = torch.randn(2, HIDDEN, generator=gen)
    segments, kept, offsets, _ = dk.pack_segments([1, 0, 1], lists)
    out = dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], segments, kept,
                                         offsets, strategy="union")
    for row, kept_row in ((0, lists[0]), (1, lists[2])):
        alone = swiglu_ffn_ref(x[row:row + 1], w["w_in"], w["w_up"], w["w_out_t"], kept_row)
        assert_close(out[row:row + 1], alone, what=f"row {row}")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("grad", [False, True], ids=["fused", "recorded"])
def test_the_union_keeps_another_experts_overflow_out_of_a_row(device, backend, grad):
    """Through the union, every row computes every neuron some segment keeps, and those its own
    expert drops are masked out: an infinite activation there (0 * inf is NaN) must not reach the
    row, which alone never computes that neuron."""
    gen = torch.Generator().manual_seed(4)
    w = _weights(torch.float32, "cpu", gen)
    w["w_in"][5], w["b_in"][5] = 3e38, 3e38  # neuron 5 overflows to inf on every row
    w = {name: t.to(device) for name, t in w.items()}
    x = torch.randn(2, HIDDEN, generator=gen).abs().to(device).requires_grad_(grad)
    lists = [torch.tensor([1, 5]), torch.tensor([0, 2])]
    segments, kept, offsets, _ = dk.pack_segments([1, 1], lists, device=device)
    for name, run in (("ffn", lambda strategy: dk.segmented_gather_ffn(
            x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], segments, kept, offsets,
            activation="relu", backend=backend, strategy=strategy)),
                      ("swiglu", lambda strategy: dk.segmented_gather_swiglu_ffn(
            x, w["w_in"], w["w_up"], w["w_out_t"], segments, kept, offsets, backend=backend,
            strategy=strategy))):
        union, alone = run("union"), run("segments")
        assert torch.isfinite(union[1]).all() and torch.isfinite(alone[1]).all(), name
        torch.testing.assert_close(union[1], alone[1], msg=name)


def test_bad_layouts_are_refused():
    gen = torch.Generator().manual_seed(0)
    w = _weights(torch.float32, "cpu", gen)
    x = torch.randn(5, HIDDEN, generator=gen)
    kept = torch.tensor([0, 3, 7, 2, 4])

    def call(segments, kept_offsets, kept=kept, scales=None):
        return dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"],
                                              torch.tensor(segments), kept,
                                              torch.tensor(kept_offsets), scales=scales)

    call([0, 2, 5], [0, 3, 5])  # a good layout
    for segments, offsets, message in (
            ([0, 2, 4], [0, 3, 5], "segments must start at 0 and end at 5"),
            ([1, 2, 5], [0, 3, 5], "segments must start at 0"),
            ([0, 3, 2, 5], [0, 3, 3, 5], "segments must be non-decreasing"),
            ([0, 2, 5], [0, 3, 4], "kept_offsets must start at 0 and end at 5"),
            ([0, 5], [0, 3, 5], "segments has 1 segments but kept_offsets has 2"),
            ([0, 2, 5], [0, 4, 5], "kept list of segment 0 must be sorted and unique"),
    ):
        with pytest.raises(ValueError, match=message):
            call(segments, offsets)
    with pytest.raises(ValueError, match="out of range"):
        call([0, 2, 5], [0, 3, 5], kept=torch.tensor([0, 3, 7, 2, 40]))
    with pytest.raises(ValueError, match="scales"):
        call([0, 2, 5], [0, 3, 5], scales=torch.ones(4))
    with pytest.raises(ValueError, match="one kept list"):
        dk.pack_segments([1, 2], [kept])
    with pytest.raises(ValueError, match="strategy must be one of"):
        dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"],
                                       torch.tensor([0, 5]), kept[:3], torch.tensor([0, 3]),
                                       strategy="fused")


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True) + [
    pytest.param("cpu", "torch", dtype, id=f"cpu-torch-{dtype}")
    for dtype in (torch.float16, torch.float64)])  # the torch fallback's own dtypes
@pytest.mark.parametrize("strategy", ["segments", "union", "auto"])
def test_unchecked_calls_still_refuse_offsets_that_miss_rows(device, backend, dtype, strategy):
    """check_indices=False skips reading the lists, not the offsets every backend reads to lay
    out its work: offsets that leave rows out (or overrun) raise, on every backend and dtype
    (the torch fallback returned the rows no segment covers unwritten)."""
    gen = torch.Generator().manual_seed(3)
    w = _weights(dtype, device, gen)
    x = torch.randn(4, HIDDEN, generator=gen).to(device, dtype)
    kept = torch.tensor([0, 3, 7, 2, 4], device=device)
    for segments, offsets, message in (([0, 2], [0, 5], "segments must start at 0 and end at 4"),
                                       ([0, 3, 2, 4], [0, 3, 3, 5], "non-decreasing"),
                                       ([0, 4], [0, 4], "kept_offsets must start at 0 and end")):
        with pytest.raises(ValueError, match=message):
            dk.segmented_gather_swiglu_ffn(
                x, w["w_in"], w["w_up"], w["w_out_t"], torch.tensor(segments, device=device),
                kept, torch.tensor(offsets, device=device), backend=backend,
                check_indices=False, strategy=strategy)


def test_the_union_reads_an_unchecked_list_that_repeats_a_neuron_as_a_set():
    """Lists that repeat a neuron pass only unchecked calls; the union strategy reads each list
    as a set, also for a list as long as the union (its rows were left unmasked, so they got a
    neuron their list never names)."""
    gen = torch.Generator().manual_seed(4)
    w = _weights(torch.float32, "cpu", gen)
    x = torch.randn(2, HIDDEN, generator=gen)
    lists = [torch.tensor([1, 2, 3]), torch.tensor([1, 1, 2])]
    segments, kept, kept_offsets = (torch.tensor(v) for v in ([0, 1, 2], [1, 2, 3, 1, 1, 2],
                                                            [0, 3, 6]))
    for backend in dk.available_backends("cpu"):
        out = dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], segments,
                                             kept, kept_offsets, backend=backend,
                                             check_indices=False, strategy="union")
        for row, chosen in enumerate(lists):
            assert_close(out[row:row + 1], swiglu_ffn_ref(x[row:row + 1], w["w_in"], w["w_up"],
                                                          w["w_out_t"], chosen.unique()),
                         what=f"{backend} row {row}")


def test_auto_picks_the_union_for_one_row_per_segment_and_shared_rows():
    from doe_kernels.ops.library import _choose_strategy

    # 5 segments of one row each keeping 40 of 100 neurons, overlapping: union 70 < 200 read
    kept = torch.cat([torch.arange(15 * s, 15 * s + 40) for s in range(5)])
    bounds = [(s, s + 1, 40 * s, 40 * s + 40) for s in range(5)]
    chosen, union = _choose_strategy("auto", bounds, kept)
    assert chosen == "union" and union.tolist() == list(range(100))
    assert _choose_strategy("segments", bounds, kept) == ("segments", None)
    two_rows = [(2 * s, 2 * s + 2, 40 * s, 40 * s + 40) for s in range(5)]
    assert _choose_strategy("auto", two_rows, kept)[0] == "segments"
    assert _choose_strategy("union", two_rows, kept)[0] == "union"
    assert _choose_strategy("auto", bounds[:1], kept)[0] == "segments"  # nothing shared
    assert _choose_strategy("union", bounds[:1], kept)[0] == "union"
    assert _choose_strategy("union", [], kept) == ("segments", None)  # no rows at all
    # a union smaller than min_union (the CPU's: weights that stay in cache) is not worth it
    assert _choose_strategy("auto", bounds, kept, min_union=101)[0] == "segments"
    assert _choose_strategy("auto", bounds, kept, min_union=100)[0] == "union"
    assert _choose_strategy("union", bounds, kept, min_union=101)[0] == "union"


def _cpu_decision(rows, lists, strategy="auto", neurons=128, scales=None, up_matrices=1,
                  features=4):
    """The size of the union the cpu backend's C++ call takes for this layout over `neurons`
    neurons of an FFN from `features` features back to them (0: the segments)."""
    segments, kept, offsets, _ = dk.pack_segments(rows, lists)
    x = torch.zeros(sum(rows), features)
    union, row_mask = _cpu_backend().union_plan(x, segments, kept, offsets, scales, neurons,
                                                up_matrices, strategy)
    assert row_mask.shape == (sum(rows), union.numel())
    return union.numel()


@pytest.mark.parametrize("cpu_regime", ["fused"], indirect=True)
def test_the_cpus_cost_model_takes_the_union_where_it_reads_and_computes_less(cpu_regime):
    """In the fused regime: read per weight row read, 1 per input row x neuron computed."""
    overlapping = [torch.arange(13 * s, 13 * s + 35) for s in range(5)]  # union 87
    # five overlapping lists of 35 neurons at one row each, not at four
    assert _cpu_decision([1] * 5, overlapping) == 87
    assert _cpu_decision([4] * 5, overlapping) == 0
    # equal lists: the union at any row count, one GEMM for every row
    assert _cpu_decision([64] * 5, [torch.arange(35)] * 5) == 35
    # disjoint lists never, unless asked for
    disjoint = [torch.arange(35 * s, 35 * s + 35) for s in range(3)]
    assert _cpu_decision([1] * 3, disjoint) == 0
    assert _cpu_decision([4] * 3, disjoint, "union") == 105
    assert _cpu_decision([1] * 5, overlapping, "segments") == 0
    # no rows, or no neuron in any segment with rows: nothing to take
    assert _cpu_decision([0] * 5, overlapping, "union") == 0
    assert _cpu_decision([1, 0], [torch.arange(0), torch.arange(5)], "union") == 0


@pytest.mark.parametrize("cpu_regime", ["gather"], indirect=True)
def test_the_cpus_cost_model_weighs_the_gemm_regimes_copies(cpu_regime):
    """In the gather + GEMM regime each call copies its kept rows, unless they are every neuron
    in order: weakly pruned experts whose union holds every neuron take it at many rows."""
    gen = torch.Generator().manual_seed(0)
    weak = [torch.randperm(128, generator=gen)[:100].sort().values for _ in range(5)]
    assert torch.unique(torch.cat(weak)).numel() == 128
    assert _cpu_decision([32] * 5, weak) == 128
    # one neuron left out: the union copies its rows once, the segments five times
    assert _cpu_decision([32] * 5, [k[k != 7] for k in weak]) == 127
    # at very many rows the union's extra products outweigh the segments' copies
    assert _cpu_decision([4096] * 5, weak) == 0
    # a segment keeping every neuron copies nothing either: with another, one GEMM over both
    assert _cpu_decision([32, 32], [torch.arange(128), weak[0]]) == 128


def _model_cost(costs, gemm: bool, rows: int, neurons: int, copies: bool) -> float:
    """One projection's cost under the cpu backend's model (csrc/cpu, RegimeCosts)."""
    read, gemm_read, gemm_copy, gemm_product = costs
    if gemm:
        return neurons * (gemm_read + (gemm_copy if copies else 0) + rows * gemm_product)
    return neurons * (read + rows)


def _ffn_cost(costs, rows, neurons, whole_up, whole_down, fused, up_matrices, features):
    """One FFN call's cost: each projection in the regime its op takes (the extension's rule,
    cpu_uses_gather_gemm, over the bytes it would copy), weighed by its share of the weight
    matrices."""
    from doe_kernels._ext import extension

    def one(up, whole):
        copied = 0 if whole else (up_matrices if up else 1) * features * neurons * 4
        gemm = not fused and extension().cpu_uses_gather_gemm(True, rows, copied)
        return _model_cost(costs, gemm, rows, neurons, not whole)

    share = up_matrices / (up_matrices + 1)
    return share * one(True, whole_up) + (1 - share) * one(False, whole_down)


def _expected_union(rows, lists, scaled, up_matrices, features, neurons=128):
    """The union's size where the documented model takes it, else 0."""
    from doe_kernels._ext import extension

    costs = extension().cpu_segment_costs(True)
    every = torch.arange(neurons)
    live = [(r, k) for r, k in zip(rows, lists) if r]
    union = torch.unique(torch.cat([k for _, k in live] or [every[:0]])).numel()
    if not union:
        return 0
    separate = 0.0
    for r, k in live:
        whole_up = torch.equal(k, every)
        whole_down = whole_up and not scaled
        copied = [0 if whole_up else up_matrices * features * k.numel() * 4,
                  0 if whole_down else features * k.numel() * 4]
        gemm = any(extension().cpu_uses_gather_gemm(True, r, c) for c in copied)
        separate += _ffn_cost(costs, r, k.numel(), whole_up, whole_down, not gemm, up_matrices,
                              features)
    whole = union == neurons
    together = _ffn_cost(costs, sum(r for r, _ in live), union, whole, whole, False, up_matrices,
                         features)
    return union if together < separate else 0


@pytest.mark.parametrize("seed", range(4))
def test_the_cpus_cost_model_is_the_documented_formula(seed):
    """Over random layouts, scales or none, BERT and SwiGLU FFNs, forced regimes (gather + GEMM
    above 0, 2 or no rows) and this CPU's own rule, the C++ call takes the union exactly where
    the documented model says it costs less than the segments: each projection in the regime its
    op takes, copying unless its list is every neuron in order (and, down, unscaled)."""
    cpu = _cpu_backend()
    gen = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(0, n, (), generator=gen))  # noqa: E731
    try:
        for _ in range(40):
            above = [0, 2, 10**12, None][pick(4)]
            cpu.set_gather_above(above)
            count, up_matrices, features = 1 + pick(5), 1 + pick(2), [4, 512][pick(2)]
            rows = [pick(5) if above is not None else pick(40) for _ in range(count)]
            common = torch.randperm(128, generator=gen)[:pick(128)]
            lists = [torch.unique(torch.cat([common, torch.randperm(128, generator=gen)[
                :pick(128)]])) for _ in range(count)]
            scales = None
            if pick(3) == 0:
                scales = torch.rand(sum(k.numel() for k in lists), generator=gen)
            expected = _expected_union(rows, lists, scales is not None, up_matrices, features)
            assert _cpu_decision(rows, lists, scales=scales, up_matrices=up_matrices,
                                 features=features) == expected, (rows, above, up_matrices)
    finally:
        cpu.set_gather_above(None)


def test_an_op_call_takes_the_union_where_building_its_plan_pays(monkeypatch):
    from doe_kernels.ops import library
    from doe_kernels.ops.library import UNION_MIN_BYTES_CPU, _min_union

    _cpu_backend()
    kept = torch.arange(10)
    # with the C++ plan any union is worth it on the CPU
    assert _min_union(torch.zeros(1, 64), kept, None, 2) == 0
    # built with torch ops (about 0.2 ms) only for weights that leave the cache
    monkeypatch.setattr(library, "_plan_in_cpp", lambda *args: False)
    hidden = -(-UNION_MIN_BYTES_CPU // (100 * 4 * 2))  # the least: 100 neurons' 2 float32 rows
    assert _min_union(torch.zeros(1, hidden), kept, None, 2) == 100
    assert _min_union(torch.zeros(1, hidden - 1), kept, None, 2) == 101
    assert _min_union(torch.zeros(1, hidden - 1), kept, None, 3) < 100  # SwiGLU: 3 rows a neuron
    assert _min_union(torch.zeros(1, hidden, dtype=torch.bfloat16), kept, None, 2) > 100
    # on a GPU an op call takes the segments (the union's plan cost more than it saved on an H200)
    assert _min_union(torch.zeros(1, hidden, device="meta"), kept, None, 2) > 10**12
    monkeypatch.undo()
    # an op call: 5 one-row segments of a small SwiGLU take the union in the cpu backend's C++
    # call (the same result, bit for bit, as the union path of the library); with the torch plan
    # only when the union's weights count as large
    torch.manual_seed(0)
    x, w = torch.randn(5, 16), {k: torch.randn(48, 16) for k in ("gate", "up", "down_t")}
    segments, kept, offsets, _ = dk.pack_segments(
        [1] * 5, [torch.arange(6 * s, 6 * s + 20) for s in range(5)])
    union, row_mask = library.union_plan(x, segments, kept, offsets, neurons=48, up_matrices=2)
    via_union = library.union_gather_swiglu_ffn(x, w["gate"], w["up"], w["down_t"], union,
                                                row_mask, "cpu")
    out = dk.segmented_gather_swiglu_ffn(x, w["gate"], w["up"], w["down_t"], segments, kept,
                                         offsets, backend="cpu")
    assert torch.equal(out, via_union)
    unions = []
    union_ffn = library.union_gather_swiglu_ffn
    monkeypatch.setattr(library, "union_gather_swiglu_ffn",
                        lambda *args: unions.append(1) or union_ffn(*args))
    monkeypatch.setattr(library, "_plan_in_cpp", lambda *args: False)
    for threshold, used in ((UNION_MIN_BYTES_CPU, False), (0, True)):
        monkeypatch.setattr(library, "UNION_MIN_BYTES_CPU", threshold)
        unions.clear()
        out = dk.segmented_gather_swiglu_ffn(x, w["gate"], w["up"], w["down_t"], segments, kept,
                                             offsets, backend="cpu")
        assert bool(unions) == used
        ref = swiglu_ffn_ref(x[2:3], w["gate"], w["up"], w["down_t"], torch.arange(12, 32))
        assert_close(out[2:3], ref, what=f"union {used}")


@pytest.mark.triton_interp
@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="no Triton interpreter")
@pytest.mark.parametrize("per_launch", [None, 3])
def test_triton_runs_every_segment_in_one_launch_over_many_tiles(monkeypatch, per_launch):
    """The segmented kernels (a grid axis over segments), with 16-wide blocks so that segments
    span several tiles of rows and of kept neurons, and some tiles lie past a small segment.
    per_launch=3: the segments launch in chunks (of 3 and 1), as more than CUDA's 65535 blocks
    on a grid's second axis would."""
    from doe_kernels.backends import triton as triton_backend

    kernels = triton_backend._kernels()
    launches = []
    if per_launch:
        monkeypatch.setattr(triton_backend, "MAX_SEGMENTS_PER_LAUNCH", per_launch)
        for name in ("segmented_rows_linear_kernel", "segmented_swiglu_kernel",
                     "segmented_cols_linear_kernel"):
            monkeypatch.setattr(kernels, name, _CountedKernel(getattr(kernels, name), launches))
    monkeypatch.setattr(kernels, "interpreter_blocks",
                        lambda M, N, K: {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16,
                                         "GROUP_M": 2})
    calls = []
    fused = triton_backend.segmented_ffn
    monkeypatch.setattr(triton_backend, "segmented_ffn",
                        lambda *args: calls.append(len(args[4])) or fused(*args))
    gen = torch.Generator().manual_seed(7)
    w = _weights(torch.float32, "cpu", gen)
    rows = [35, 3, 0, 20, 17]
    lists = [torch.arange(INTERMEDIATE), torch.tensor([4]), torch.tensor([0, 1]),
             torch.empty(0, dtype=torch.int64), torch.randperm(INTERMEDIATE, generator=gen)[:20]
             .sort().values]
    scales = [1 + 0.3 * torch.randn(len(k), generator=gen) for k in lists]
    x = torch.randn(sum(rows), HIDDEN, generator=gen)
    segments, kept, offsets, packed = dk.pack_segments(rows, lists, scales)
    out = dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], segments,
                                  kept, offsets, "gelu", backend="triton", scales=packed,
                                  strategy="segments")
    assert_close(out, _per_segment(rows, lists, scales, x, lambda xs, k, s: ffn_ref(
        xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu", s)), what="gelu FFN")
    out = dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], segments, kept,
                                         offsets, backend="triton", strategy="segments")
    assert_close(out, _per_segment(rows, lists, [None] * 5, x, lambda xs, k, s: swiglu_ffn_ref(
        xs, w["w_in"], w["w_up"], w["w_out_t"], k)), what="SwiGLU FFN")
    assert calls == [4, 4]  # one call each, over the four segments holding rows
    if per_launch:
        assert launches == [3, 1] * 4  # (up, down) x (gelu, SwiGLU), each in two chunks


@pytest.mark.triton_interp
@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="no Triton interpreter")
def test_segmented_kernels_step_aside_while_a_cuda_graph_captures(monkeypatch):
    """Inside a CUDA graph's capture a segmented op runs one single-expert call per segment (the
    segmented kernels copy their tables from the host: the Triton one raised there, the cuda
    one's hook hid itself on the current device only). The capture is simulated: the Triton
    interpreter runs on the CPU."""
    from doe_kernels.backends import triton as triton_backend

    calls = []
    fused = triton_backend.segmented_ffn
    monkeypatch.setattr(triton_backend, "segmented_ffn",
                        lambda *args: calls.append(1) or fused(*args))
    gen = torch.Generator().manual_seed(9)
    w = _weights(torch.float32, "cpu", gen)
    rows, lists = [3, 0, 2], [torch.tensor([1, 4, 9]), torch.tensor([2]), torch.arange(7)]
    x = torch.randn(sum(rows), HIDDEN, generator=gen)
    segments, kept, offsets, _ = dk.pack_segments(rows, lists)
    want = _per_segment(rows, lists, [None] * 3, x, lambda xs, k, s: ffn_ref(
        xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu"))
    for capturing, fused_calls in ((True, []), (False, [1])):
        monkeypatch.setattr(library, "capturing", lambda device, capturing=capturing: capturing)
        calls.clear()
        out = dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                      segments, kept, offsets, "gelu", backend="triton",
                                      strategy="segments")
        assert_close(out, want, what=f"capturing={capturing}")
        assert calls == fused_calls


class _CountedKernel:
    """A Triton kernel whose launches append their grid's segment count to `launches`."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid[1])
        return self.kernel[grid]


_in_order = library._in_order


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_full_list_in_any_order_keeps_its_scales_aligned(monkeypatch, backend):
    """A kept list holding every neuron runs the dense FFN (the torch backend; the cpu backend
    runs its kernels at a few rows); unchecked and out of order, each scale still multiplies
    its own neuron."""
    if backend == "cpu":
        _cpu_backend()
    in_order = []
    monkeypatch.setattr(library, "_in_order", lambda *args: in_order.append(1) or
                        _in_order(*args))
    gen = torch.Generator().manual_seed(5)
    w = _weights(torch.float32, "cpu", gen)
    x = torch.randn(3, HIDDEN, generator=gen)
    order = torch.randperm(INTERMEDIATE, generator=gen)
    scales = 1 + 0.3 * torch.randn(INTERMEDIATE, generator=gen)
    for op, ref in (
            (lambda k, s: dk.gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k,
                                        "gelu", backend, check_indices=False, scales=s),
             lambda k, s: ffn_ref(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu",
                                  s)),
            (lambda k, s: dk.gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], k,
                                               backend, check_indices=False, scales=s),
             lambda k, s: swiglu_ffn_ref(x, w["w_in"], w["w_up"], w["w_out_t"], k, s))):
        assert_close(op(order, scales), ref(order.sort().values, scales[order.argsort()]))
    assert len(in_order) == (2 if backend == "torch" else 0)  # the dense path ran (or not)


def _cpu_backend():
    from doe_kernels._ext import extension
    from doe_kernels.backends import cpu

    if extension() is None:
        pytest.skip("the cpu backend is not built")
    return cpu


@pytest.fixture
def gather_above(request):
    """The cpu backend's gather + GEMM regime forced above request.param rows (None: the default
    rule), restored afterwards."""
    cpu = _cpu_backend()
    cpu.set_gather_above(request.param)
    yield request.param
    cpu.set_gather_above(None)


@pytest.mark.parametrize("gather_above", [10**12, 20, None], ids=["fused", "mixed", "default"],
                         indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("hidden", [150, 256])
def test_cpu_runs_every_segment_in_one_call_over_many_tiles(monkeypatch, gather_above, dtype,
                                                           scaled, torch_threads, hidden):
    """Segments spanning several tiles of rows, kept neurons and output columns (odd sizes:
    ragged tiles and vector tails; 256 float32 outputs: the down projection's packed panels),
    next to one-row and empty-list segments, with segments without rows holding lists in the
    middle and at the end; `gather_above` sends the segments of more rows than that to the
    single-expert ops (mixed: the two larger ones)."""
    cpu = _cpu_backend()
    intermediate = 203
    calls = []
    fused = cpu.segmented_ffn_with_union
    monkeypatch.setattr(cpu, "segmented_ffn_with_union",
                        lambda *args: calls.append(args[8]) or fused(*args))
    gen = torch.Generator().manual_seed(11)
    w = _weights(dtype, "cpu", gen, hidden, intermediate)
    rows = [150, 3, 0, 9 if hidden == 256 else 1, 49, 5, 0]  # the empty list: 1 or 9 rows
    lists = [torch.arange(intermediate), torch.tensor([4]), torch.tensor([0, 1]),
             torch.empty(0, dtype=torch.int64)] + [
        torch.randperm(intermediate, generator=gen)[:n].sort().values for n in (130, 65, 7)]
    scales = [(1 + 0.3 * torch.randn(len(k), generator=gen)).to(dtype) if scaled else None
              for k in lists]
    x = torch.randn(sum(rows), hidden, generator=gen).to(dtype)
    segments, kept, offsets, packed = dk.pack_segments(rows, lists, scales if scaled else None)
    out_ffn = dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                      segments, kept, offsets, "gelu_tanh", backend="cpu",
                                      scales=packed, strategy="segments")
    out_swiglu = dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"],
                                                segments, kept, offsets, backend="cpu",
                                                scales=packed, strategy="segments")
    assert calls == ["segments", "segments"]  # one C++ call each
    assert_close(out_ffn, _per_segment(rows, lists, scales, x, lambda xs, k, s: ffn_ref(
        xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu_tanh", s)),
        _dense_segments(rows, lists, scales, x, lambda xs, k, s: plain_torch(
            "gather_ffn", xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu_tanh",
            scales=s)),
        f"segmented_gather_ffn ({gather_above})")
    assert_close(out_swiglu, _per_segment(rows, lists, scales, x, lambda xs, k, s: swiglu_ffn_ref(
        xs, w["w_in"], w["w_up"], w["w_out_t"], k, s)),
        _dense_segments(rows, lists, scales, x, lambda xs, k, s: plain_torch(
            "gather_swiglu_ffn", xs, w["w_in"], w["w_up"], w["w_out_t"], k, scales=s)),
        f"segmented_gather_swiglu_ffn ({gather_above})")


@pytest.mark.parametrize("gather_above", [10**12], ids=["fused"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("torch_threads", [1, 3], indirect=True)
def test_cpu_decoding_segments_split_their_down_projection(gather_above, dtype, torch_threads):
    """Segments of at most 8 rows sum their down projection over parts of their kept rows, up to
    four per thread, each part's sums added to the segment's rows afterwards: 64 outputs (a
    part holds at least 256 kept rows), lists of up to 1100 neurons, a segment of 9 rows (tiled)
    and an empty list among them, with scales."""
    gen = torch.Generator().manual_seed(5)
    hidden, intermediate = 64, 1100
    w = _weights(dtype, "cpu", gen, hidden, intermediate)
    rows = [1, 2, 8, 9, 0, 3, 4]
    lists = [torch.arange(intermediate)] + [
        torch.randperm(intermediate, generator=gen)[:n].sort().values for n in (700, 600, 300,
                                                                                 50, 5)] + [
        torch.empty(0, dtype=torch.int64)]
    scales = [(1 + 0.3 * torch.randn(len(k), generator=gen)).to(dtype) for k in lists]
    x = torch.randn(sum(rows), hidden, generator=gen).to(dtype)
    segments, kept, offsets, packed = dk.pack_segments(rows, lists, scales)
    out = dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], segments,
                                  kept, offsets, "gelu", backend="cpu", scales=packed,
                                  strategy="segments")
    assert_close(out, _per_segment(rows, lists, scales, x, lambda xs, k, s: ffn_ref(
        xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu", s)),
        _dense_segments(rows, lists, scales, x, lambda xs, k, s: plain_torch(
            "gather_ffn", xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu",
            scales=s)), f"split down projections ({torch_threads} threads)")


def test_cpu_entry_points_check_the_layout():
    """The C++ entry points read the layout themselves: a bad one raises ValueError, whatever
    the Python layer checked before."""
    ext = _cpu_backend().extension()
    gen = torch.Generator().manual_seed(2)
    w = _weights(torch.float32, "cpu", gen)
    x = torch.randn(5, HIDDEN, generator=gen)
    kept = torch.tensor([0, 3, 7, 2, 4])

    def both(segments, kept_offsets, kept=kept, scales=None, strategy=0):
        segments, kept_offsets = torch.tensor(segments), torch.tensor(kept_offsets)
        return (ext.segmented_ffn_cpu(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                      segments, kept, kept_offsets, scales, 1, strategy),
                ext.segmented_swiglu_ffn_cpu(x, w["w_in"], w["w_up"], w["w_out_t"], segments,
                                             kept, kept_offsets, scales, strategy))

    for out in both([0, 2, 5, 5], [0, 3, 3, 5]):  # a good layout, a segment without rows last
        assert out.shape == (5, HIDDEN)
    for segments, offsets, message in (
            ([0, 2, 4], [0, 3, 5], "segments must start at 0 and end at 5"),
            ([0, 3, 2, 5], [0, 3, 3, 5], "segments must be non-decreasing"),
            ([0, 2, 5], [0, 3, 6], "kept_offsets must start at 0 and end at 5"),
            ([0, 2, 5], [0, 6, 5], "kept_offsets must be non-decreasing"),
            ([0, 5], [0, 3, 5], "segments has 1 segments but kept_offsets has 2"),
    ):
        for strategy in range(3):  # checked before any strategy runs
            with pytest.raises(ValueError, match=message):
                both(segments, offsets, strategy=strategy)
    with pytest.raises(ValueError, match="holds index 40 at position 4, out of range"):
        both([0, 2, 5], [0, 3, 5], kept=torch.tensor([0, 3, 7, 2, 40]))
    with pytest.raises(RuntimeError, match="scales has 4 entries but kept has 5"):
        both([0, 2, 5], [0, 3, 5], scales=torch.ones(4))
    with pytest.raises(ValueError, match="unknown segment strategy code 3"):
        both([0, 2, 5], [0, 3, 5], strategy=3)
    from doe_kernels.ops.library import SEGMENT_STRATEGIES

    assert ext.SEGMENT_STRATEGIES == SEGMENT_STRATEGIES


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scaled", [False, True])
def test_cpu_union_plan_equals_the_torch_plan(seed, dtype, scaled):
    """The cpu backend's one-call union plan is the torch plan (_choose_strategy's union and
    _union_row_mask), bitwise, over random layouts: empty and full lists, segments without rows
    keeping other neurons."""
    from doe_kernels.ops.library import _choose_strategy, _segment_bounds, _union_row_mask

    cpu = _cpu_backend()
    rows, lists, scales = _random_layout(seed, "cpu", max_rows=3)
    segments, kept, offsets, packed = dk.pack_segments(rows, lists, scales if scaled else None)
    packed = None if packed is None else packed.to(dtype)
    x = torch.zeros(sum(rows), HIDDEN, dtype=dtype)
    union, row_mask = cpu.union_plan(x, segments, kept, offsets, packed, INTERMEDIATE, 1,
                                     "union")
    chosen, expected = _choose_strategy("union", _segment_bounds(segments, offsets, x, kept), kept)
    if chosen == "segments":  # no rows, or no kept neuron in a segment with rows
        assert union.numel() == 0 and row_mask.shape == (sum(rows), 0)
        return
    assert torch.equal(union, expected)
    expected_mask = _union_row_mask(x, expected, segments, kept, offsets, packed)
    assert row_mask.dtype == dtype and torch.equal(row_mask, expected_mask)


def test_union_plan_takes_the_cpu_call_for_what_it_serves(monkeypatch):
    """library.union_plan builds the plan in the C++ call for CPU float32 and bfloat16 inputs, with
    the torch ops otherwise (float16, scales of another dtype), the same plan either way."""
    from doe_kernels.ops import library

    cpu = _cpu_backend()
    calls = []
    plan = cpu.union_plan
    monkeypatch.setattr(cpu, "union_plan", lambda *a, **k: calls.append(1) or plan(*a, **k))
    lists = [torch.arange(6 * s, 6 * s + 20) for s in range(5)]
    scales = [torch.rand(20) for _ in lists]
    segments, kept, offsets, packed = dk.pack_segments([1] * 5, lists, scales)
    for dtype, scale_dtype, in_cpp in ((torch.float32, torch.float32, True),
                                       (torch.bfloat16, torch.bfloat16, True),
                                       (torch.float16, torch.float16, False),
                                       (torch.float32, torch.float64, False)):
        calls.clear()
        x = torch.zeros(5, 8, dtype=dtype)
        union, row_mask = library.union_plan(x, segments, kept, offsets, packed.to(scale_dtype),
                                             neurons=48)
        assert bool(calls) == in_cpp, dtype
        assert torch.equal(union, torch.arange(44))
        assert torch.equal(row_mask[2, 12:32].float(), packed[40:60].to(dtype).float())
        assert not row_mask[2, :12].any() and not row_mask[2, 32:].any()
    # without the FFN's width torch builds it
    calls.clear()
    assert torch.equal(library.union_plan(x, segments, kept, offsets)[0], torch.arange(44))
    assert not calls
    # one segment: nothing shared, no plan, whichever builds it
    assert library.union_plan(x[:1], *dk.pack_segments([1], lists[:1])[:3], neurons=48) is None
    # an extension built before the C++ plan: torch builds it
    monkeypatch.setattr(cpu, "has_union_plan", lambda: False)
    calls.clear()
    x = torch.zeros(5, 8)
    union, row_mask = library.union_plan(x, segments, kept, offsets, packed, neurons=48)
    assert not calls and torch.equal(union, torch.arange(44))


def test_cpu_union_plan_checks_its_input():
    from doe_kernels.ops.library import SEGMENT_STRATEGIES

    ext = _cpu_backend().extension()
    SEGMENTS, UNION = SEGMENT_STRATEGIES.index("segments"), SEGMENT_STRATEGIES.index("union")
    x = torch.zeros(5, 8)
    kept, offsets, segments = torch.tensor([0, 3, 7, 2, 4]), torch.tensor([0, 3, 5]), torch.tensor(
        [0, 2, 5])
    union, row_mask = ext.union_plan_cpu(x, segments, kept, offsets, None, 8, 1, UNION)
    assert union.tolist() == [0, 2, 3, 4, 7] and row_mask.shape == (5, 5)
    union, no_mask = ext.union_plan_cpu(x, segments, kept, offsets, None, 8, 1, SEGMENTS)
    assert union.numel() == 0 and no_mask.shape == (5, 0)
    for bad in (-1, 8, 2**40):  # below 0, past the FFN's width, far past it
        with pytest.raises(ValueError, match=f"holds index {bad} at position 4, out of range"):
            ext.union_plan_cpu(x, segments, torch.tensor([0, 3, 7, 2, bad]), offsets, None, 8, 1,
                               UNION)
    with pytest.raises(ValueError, match="segments must start at 0 and end at 5"):
        ext.union_plan_cpu(x, torch.tensor([0, 2, 4]), kept, offsets, None, 8, 1, UNION)
    with pytest.raises(RuntimeError, match="scales has 4 entries but kept has 5"):
        ext.union_plan_cpu(x, segments, kept, offsets, torch.ones(4), 8, 1, UNION)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32 or bfloat16 CPU tensor"):
        ext.union_plan_cpu(x.half(), segments, kept, offsets, None, 8, 1, UNION)
    with pytest.raises(ValueError, match="neurons must be >= 0"):
        ext.union_plan_cpu(x, segments, kept, offsets, None, -1, 1, UNION)
    with pytest.raises(ValueError, match="up_matrices must be 1 .* or 2"):
        ext.union_plan_cpu(x, segments, kept, offsets, None, 8, 3, UNION)


def _cuda_backend():
    """The cuda backend, which on a GPU machine must have its segmented kernels."""
    from doe_kernels.backends import cuda

    if "cuda" not in dk.available_backends("cuda"):
        pytest.skip("the cuda backend is not built")
    assert hasattr(cuda, "segmented_ffn"), "the extension was built without the segmented kernels"
    return cuda


def _tile_layout(name: str, intermediate: int, gen):
    """Segments spanning several tiles, next to one-entry and empty lists, with segments without
    rows holding lists in the middle and at the end. "decode": at most 3 rows a segment (the down
    projections split the kept lists over several blocks, past the end of the short ones);
    "chunks": segments of more than 16 rows (several row chunks)."""
    rows = {"decode": [1, 3, 0, 1, 2, 1, 0], "chunks": [37, 3, 0, 1, 17, 5, 0]}[name]
    lists = [torch.arange(intermediate), torch.tensor([4]), torch.tensor([0, 1]),
             torch.empty(0, dtype=torch.int64)] + [
        torch.randperm(intermediate, generator=gen)[:n].sort().values for n in (130, 65, 7)]
    scales = [1 + 0.3 * torch.randn(len(k), generator=gen, dtype=torch.float64) for k in lists]
    return rows, lists, scales


def _both_ffns(x, w, segments, kept, offsets, scales, backend):
    """(segmented BERT FFN, segmented SwiGLU FFN) on `backend`, each segment on its own list
    (strategy "segments")."""
    return (dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], segments,
                                    kept, offsets, "gelu", backend=backend, scales=scales,
                                    strategy="segments"),
            dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], segments, kept,
                                           offsets, backend=backend, scales=scales,
                                           strategy="segments"))


def _assert_both_close(outs, rows, lists, scales, x, w, what):
    """`outs` of _both_ffns against each segment's float64 reference, PyTorch's own error in
    x's dtype setting the tolerance (reference.plain_torch)."""
    refs = (lambda xs, k, s: ffn_ref(xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k,
                                     "gelu", s),
            lambda xs, k, s: swiglu_ffn_ref(xs, w["w_in"], w["w_up"], w["w_out_t"], k, s))
    plain = (lambda xs, k, s: plain_torch("gather_ffn", xs, w["w_in"], w["b_in"], w["w_out_t"],
                                          w["b_out"], k, "gelu", scales=s),
             lambda xs, k, s: plain_torch("gather_swiglu_ffn", xs, w["w_in"], w["w_up"],
                                          w["w_out_t"], k, scales=s))
    for out, ref, same_dtype, name in zip(outs, refs, plain, ("FFN", "SwiGLU FFN")):
        assert_close(out, _per_segment(rows, lists, scales, x, ref),
                     _dense_segments(rows, lists, scales, x, same_dtype), f"{name} {what}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["decode", "chunks"] + [f"random{seed}" for seed in range(6)])
@pytest.mark.parametrize("hidden", [40, 150], ids=["vector-loads", "scalar-loads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scaled", [False, True])
def test_cuda_runs_every_segment_in_one_call(monkeypatch, layout, hidden, dtype, scaled):
    """The cuda backend's segmented kernels against float64 references, plain torch's error in
    the same dtype setting the tolerance: odd sizes (203 neurons; 40 features, read with
    16-byte loads, or 150, read element by element), the tile layouts and random ones (1-6
    segments of 0-20 rows, empty, full or random lists)."""
    cuda = _cuda_backend()
    calls = []
    fused = cuda._segmented_ffn
    monkeypatch.setattr(cuda, "_segmented_ffn",
                        lambda *args: calls.append(len(args[4])) or fused(*args))
    intermediate = 203
    gen = torch.Generator().manual_seed(21)
    w = _weights(dtype, "cuda", gen, hidden, intermediate)
    if layout.startswith("random"):
        rows, lists, scales = _random_layout(int(layout.removeprefix("random")), "cuda",
                                             intermediate, max_rows=20)
    else:
        rows, lists, scales = _tile_layout(layout, intermediate, gen)
    scales = [s.to("cuda", dtype) if scaled else None for s in scales]
    x = torch.randn(sum(rows), hidden, generator=gen).to("cuda", dtype)
    segments, kept, offsets, packed = dk.pack_segments(rows, lists, scales if scaled else None,
                                                       device="cuda")
    lists = [k.to("cuda") for k in lists]
    outs = _both_ffns(x, w, segments, kept, offsets, packed, "cuda")
    _assert_both_close(outs, rows, lists, scales, x, w, f"{layout} {rows}")
    with_rows = sum(1 for count in rows if count)
    assert calls == ([with_rows] * 2 if with_rows else [])  # one call each, every segment


def test_cuda_backend_offers_segmented_kernels_only_with_an_extension_that_has_them(
        monkeypatch):
    """An extension built before the segmented CUDA kernels (or none) leaves the cuda backend
    without `segmented_ffn`, so the library runs one single-expert call per segment."""
    from doe_kernels.backends import cuda

    for ext, offered in ((None, False), (types.SimpleNamespace(gather_swiglu_cuda=None), False),
                         (types.SimpleNamespace(segmented_ffn_cuda=None), True)):
        monkeypatch.setattr(cuda, "extension", lambda ext=ext: ext)
        assert hasattr(cuda, "segmented_ffn") == offered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_without_segmented_kernels_runs_one_call_per_segment(monkeypatch):
    """What an extension built before the segmented kernels does: the single-expert kernels,
    one segment after another."""
    cuda = _cuda_backend()
    ext = cuda.extension()
    older = types.SimpleNamespace(**{name: getattr(ext, name) for name in dir(ext)
                                     if not name.startswith(("_", "segmented_"))})
    monkeypatch.setattr(cuda, "extension", lambda: older)
    assert not hasattr(cuda, "segmented_ffn")
    gen = torch.Generator().manual_seed(8)
    w = _weights(torch.float32, "cuda", gen)
    rows, lists, scales = _tile_layout("decode", INTERMEDIATE, gen)
    lists, scales = [k.to("cuda") for k in lists], [s.to("cuda", torch.float32) for s in scales]
    x = torch.randn(sum(rows), HIDDEN, generator=gen).to("cuda")
    segments, kept, offsets, packed = dk.pack_segments(rows, lists, scales, device="cuda")
    outs = _both_ffns(x, w, segments, kept, offsets, packed, "cuda")
    _assert_both_close(outs, rows, lists, scales, x, w, "per segment")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("strategy", ["segments", "union"])
def test_offsets_on_the_host_give_the_same_without_waiting_for_the_gpu(backend, strategy):
    """`segments` and `kept_offsets` on the host, everything else on the GPU: the outputs of
    offsets on the GPU; with the segments the call never waits for the GPU (torch's sync debug
    mode raises at a copy back or a blocking copy to it; the union's plan reads the lists)."""
    if backend not in dk.available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available")
    gen = torch.Generator().manual_seed(5)
    w = _weights(torch.float32, "cuda", gen)
    rows, lists, _ = _tile_layout("decode", INTERMEDIATE, gen)
    x = torch.randn(sum(rows), HIDDEN, generator=gen).to("cuda")
    segments, kept, offsets, _ = dk.pack_segments(rows, [k.to("cuda") for k in lists],
                                                  device="cuda")

    def both(segments, offsets):
        return (dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                        segments, kept, offsets, "gelu", backend=backend,
                                        check_indices=False, strategy=strategy),
                dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], segments,
                                               kept, offsets, backend=backend,
                                               check_indices=False, strategy=strategy))

    on_gpu = both(segments, offsets)
    torch.cuda.synchronize()
    if strategy == "segments":
        torch.cuda.set_sync_debug_mode("error")
    try:
        on_host = both(segments.cpu(), offsets.cpu())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(on_host, on_gpu):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("scaled", [False, True])
def test_opcheck_segmented_ops(device, backend, scaled):
    gen = torch.Generator().manual_seed(4)
    w = _weights(torch.float32, device, gen)
    lists = [torch.tensor([1, 5, 30]), torch.empty(0, dtype=torch.int64), torch.arange(3, 20)]
    segments, kept, offsets, packed = dk.pack_segments(
        [3, 2, 4], lists, [torch.rand(len(k), generator=gen) for k in lists] if scaled else None,
        device=device)
    x = torch.randn(9, HIDDEN, generator=gen).to(device)
    ops = torch.ops.doe_kernels
    torch.library.opcheck(ops.segmented_gather_ffn.default, (
        x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], segments, kept, offsets, "gelu",
        backend, packed, "segments"))
    torch.library.opcheck(ops.segmented_gather_swiglu_ffn.default, (
        x, w["w_in"], w["w_up"], w["w_out_t"], segments, kept, offsets, backend, packed,
        "segments"))


def _gradients(out_fn, inputs: dict, grad_out):
    """{name: gradient of sum(out_fn(**inputs) * grad_out)} (zeros where an input took none)."""
    grads = torch.autograd.grad(out_fn(**inputs), list(inputs.values()), grad_out,
                                allow_unused=True)
    return {name: torch.zeros_like(value) if g is None else g
            for (name, value), g in zip(inputs.items(), grads)}


def _masked_ffn(op, x, kept, scales, w):
    """The segment's FFN as dense PyTorch ops in x's dtype, its pruned neurons masked out (the
    reference's formula without the float64 casts)."""
    mask = x.new_zeros(w["w_in"].shape[0]).index_put((kept,), scales)
    if op == "ffn":
        hidden = F.gelu(x @ w["w_in"].T + w["b_in"]) * mask
        return hidden @ w["w_out_t"] + w["b_out"]
    return F.silu(x @ w["w_in"].T) * (x @ w["w_up"].T) * mask @ w["w_out_t"]


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("op", ["ffn", "swiglu_ffn"])
def test_segmented_ffns_backpropagate_as_each_segment_alone(device, backend, dtype, seed, op):
    """Under autograd the segmented FFNs (every segment through the differentiable single-expert
    ops, whatever the strategy) and their union path (library.union_gather_*: the union's
    gathers, masked per row) give x, the weights, the biases and the scales the gradients of
    the float64 reference run per segment."""
    rows, lists, scales = _random_layout(seed, device)
    gen = torch.Generator().manual_seed(200 + seed)
    w = _weights(dtype, device, gen)
    segments, kept, kept_offsets, packed = dk.pack_segments(rows, lists, scales, device=device)
    x = torch.randn(sum(rows), HIDDEN, generator=gen).to(device, dtype)
    grad_out = torch.randn(sum(rows), HIDDEN, generator=gen).to(device, dtype)
    names = ("w_in", "b_in", "w_out_t", "b_out") if op == "ffn" else ("w_in", "w_up", "w_out_t")
    inputs = dict(x=x, **{n: w[n] for n in names}, scales=packed.to(device, dtype))
    inputs = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    lists = [k.to(device) for k in lists]

    def per_segment(run):
        def call(x, scales, **w):
            parts = torch.split(scales, [k.numel() for k in lists])
            return _per_segment(rows, lists, parts, x, lambda xs, k, s: run(xs, k, s, w))
        return call

    def reference(xs, k, s, w):
        if op == "ffn":
            return ffn_ref(xs, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"], k, "gelu", s)
        return swiglu_ffn_ref(xs, w["w_in"], w["w_up"], w["w_out_t"], k, s)

    def segmented(x, scales, strategy, **w):
        if op == "ffn":
            return dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                           segments, kept, kept_offsets, "gelu", backend=backend,
                                           scales=scales, strategy=strategy)
        return dk.segmented_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], segments,
                                              kept, kept_offsets, backend=backend,
                                              scales=scales, strategy=strategy)

    def union_path(x, scales, **w):  # the row mask holds the scales: no gradient reaches them
        plan = library.union_plan(x, segments, kept, kept_offsets, scales.detach(), "union")
        if plan is None:  # no segment with rows keeps a neuron
            return segmented(x, scales, "segments", **w)
        if op == "ffn":
            return library.union_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                            *plan, "gelu", backend)
        return library.union_gather_swiglu_ffn(x, w["w_in"], w["w_up"], w["w_out_t"], *plan,
                                               backend)

    doubled = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    want = _gradients(per_segment(reference), doubled, grad_out.double())
    dense = (None if dtype == torch.float32 else  # PyTorch's own rounding in the dtype
             _gradients(per_segment(lambda xs, k, s, w: _masked_ffn(op, xs, k, s, w)), inputs,
                        grad_out))
    for what, run in (("segments", lambda **a: segmented(**a, strategy="segments")),
                      ("auto", lambda **a: segmented(**a, strategy="auto")),
                      ("union path", union_path)):
        got = _gradients(run, inputs, grad_out)
        for name in inputs:
            if what == "union path" and name == "scales":
                continue
            assert got[name].dtype == inputs[name].dtype
            assert_close(got[name], want[name], None if dense is None else dense[name],
                         f"{op} {what} {rows}: d/d{name}")


def test_pack_segments_refuses_what_it_would_misread():
    """Float indices or row counts were truncated, nested lists flattened, and scales checked
    only in total (a segment's scales could land on another's neurons)."""
    assert [t.tolist() for t in dk.pack_segments([1, 2], [[0, 3], []], [[1.0, 2.0], []])] == \
        [[0, 1, 3], [0, 3], [0, 2, 2], [1.0, 2.0]]
    for args, match in ((([1], [[1.7, 3.2]]), r"kept_lists\[0\] must hold integer"),
                        (([1.9], [[1]]), r"row_counts\[0\] must be a non-negative whole"),
                        (([1], [[[1, 2]]]), r"kept_lists\[0\] must be 1-D"),
                        (([1, 1], [[1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5]]),
                         r"scales\[0\] must hold one value per kept index of segment 0 \(2\)")):
        with pytest.raises(ValueError, match=match):
            dk.pack_segments(*args)


@pytest.mark.parametrize("args,match", [
    (([2, 1], [[3, 0], [1]]), r"kept_lists\[0\] must be sorted and unique: unsorted index 0"),
    (([2, 1], [[0], [3, 3]]), r"kept_lists\[1\] must be sorted and unique: duplicate index 3"),
    (([2, 1], [[-1, 3], [1]]), r"kept_lists\[0\] holds index -1: indices must be >= 0"),
    (([2, 1], [torch.tensor([4, 2]), [1]]), r"kept_lists\[0\] must be sorted and unique"),
    (([2, 1], [3, [1]]), r"kept_lists\[0\] must be 1-D, got shape \(\)"),
    (([2, 1], ["03", [1]]), r"kept_lists\[0\] must be a 1-D list of integer indices, got str"),
    (([2, 1], [None, [1]]), r"kept_lists\[0\] must be a 1-D list of integer indices"),
    (([2, 1], [[0], [[0], [1, 2]]]), r"kept_lists\[1\] must be a 1-D list of integer indices"),
    (([None, 1], [[0], [1]]), r"row_counts\[0\] must be a non-negative whole number, got None"),
    (([1, float("nan")], [[0], [1]]), r"row_counts\[1\] must be a non-negative whole number"),
    (([float("inf"), 1], [[0], [1]]), r"row_counts\[0\] must be a non-negative whole number"),
    (([-1, 4], [[0], [1]]), r"row_counts\[0\] must be a non-negative whole number, got -1"),
    (([True, 1], [[0], [1]]), r"row_counts\[0\] must be a non-negative whole number"),
    (([2, 1], [[0, 3], [1]], [[1, 2], [3]]),
     r"scales\[0\] must hold floating-point scales, got dtype torch.int64"),
    (([2, 1], [[0, 3], [1]], [[1.0, 1.0], [float("nan")]]),
     r"scales\[1\] must be finite, got nan at position 0"),
    (([2, 1], [[0, 3], [1]], [torch.tensor([1.0, float("inf")]), [1.0]]),
     r"scales\[0\] must be finite, got inf at position 1"),
    (([2, 1], [torch.tensor([0, 3], device="meta"), [1]]),
     r"kept_lists\[0\] is on the meta device"),
])
def test_pack_segments_refuses_what_its_docstring_rules_out(args, match):
    """Unsorted, repeated or negative indices were packed as given (a scalar as a list of one),
    integer scales packed as int64 and NaN ones kept; None / NaN / inf row counts gave int()'s
    errors, element types torch's: each is refused naming the list, vector or count."""
    with pytest.raises(ValueError, match=match):
        dk.pack_segments(*args)


def test_pack_segments_takes_whole_numbers_and_index_tensors():
    """Whole float and numpy row counts, integer tensors of any width, an empty float list
    ([] is float32 to torch) and float16 scales are packed."""
    np = pytest.importorskip("numpy")
    segments, kept, offsets, scales = dk.pack_segments(
        [2.0, np.int64(1), torch.tensor(0)], [torch.tensor([1, 4], dtype=torch.uint8),
                                            np.array([0]), []],
        [torch.tensor([0.5, 2.0], dtype=torch.float16), [1.0], []])
    assert segments.tolist() == [0, 2, 3, 3] and kept.tolist() == [1, 4, 0]
    assert kept.dtype == torch.int64 and offsets.tolist() == [0, 2, 3, 3]
    assert scales.tolist() == [0.5, 2.0, 1.0] and scales.is_floating_point()


def test_pack_segments_of_no_segment_with_scales():
    """No segment, with (no) scale vectors: empty packed tensors (torch.cat of nothing raised)."""
    segments, kept, offsets, scales = dk.pack_segments([], [], scales=[])
    assert segments.tolist() == [0] and kept.numel() == 0 and offsets.tolist() == [0]
    assert scales is not None and scales.numel() == 0


def test_no_rows_under_autocast_come_in_autocasts_dtype():
    """A segmented op of no rows under torch.autocast gives autocast's dtype, as one with rows
    does (it gave the input's)."""
    w = {k: torch.randn(*s) for k, s in (("w_in", (6, 4)), ("b_in", (6,)), ("w_out_t", (6, 4)),
                                         ("b_out", (4,)))}
    segments, kept, offsets, _ = dk.pack_segments([0], [[1, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for rows in (0, 2):
            x = torch.randn(rows, 4)
            layout = (segments, kept, offsets) if rows == 0 else dk.pack_segments(
                [rows], [[1, 3]])[:3]
            out = dk.segmented_gather_ffn(x, w["w_in"], w["b_in"], w["w_out_t"], w["b_out"],
                                          *layout)
            assert out.dtype == torch.bfloat16 and out.shape == (rows, 4)
