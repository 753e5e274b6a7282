"""An index list whose values are out of range never makes a kernel read out of bounds.

The patched modules call the ops with check_indices=False (they validated their mask once, at patch
time), so an index tensor changed in place afterwards reaches the kernels unchecked. A list whose
ends are in range but whose middle entry is not (e.g. [0, 10**9, 63]) used to pass the C++ kernels'
range check, which read only the ends, and crash the process. Every case here has its ends in range
and a bad middle entry (just past the end, far past it, negative), and runs in a child process, so
that a crash fails its test instead of taking the test session down. What each backend does:
  * cpu (C++ kernels): ValueError naming the index, its position and the dimension's size;
  * torch: IndexError from index_select;
  * triton: the loads through the bad entry are masked: it reads nothing (its output is 0, or it
    adds nothing), so the result equals the op with that entry pointing at an all-zero neuron;
  * cuda (GPU): a device-side assertion, reported at the next synchronisation (the kernels cannot
    raise without a host sync); a read out of bounds would be an illegal-address error instead.
A non-empty list over a dimension of size 0 is refused on every backend before any kernel runs.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import doe_kernels as dk
from conftest import backend_cases
from reference import ffn_ref, swiglu_ffn_ref

SIZE, HIDDEN = 64, 32  # SIZE: the indexed dimension (neurons, or the input features of cols)
BAD_ENTRIES = [SIZE, 10**9, -1]
OPS = ["gather_rows_linear", "gather_cols_linear", "gather_ffn", "gather_swiglu_ffn"]
# (dtype, rows): the fused CPU kernels (float32 up to 64 rows everywhere; bfloat16 up to 16 rows)
# and the bfloat16 gather + GEMM path (more rows); on a GPU, one and several chunks of 16 rows.
# (test_ffn_ops forces each CPU regime for every dtype.)
REGIMES = [("float32", 1), ("float32", 40), ("bfloat16", 40)]
CASES = {f"{op}-{bad}-{dtype}-{rows}": (op, bad, dtype, rows)
         for op in OPS for bad in BAD_ENTRIES for dtype, rows in REGIMES}
# The cuda backend's assertion leaves the CUDA context unusable, so each of its cases needs a
# process of its own: a subset.
CUDA_BACKEND_CASES = [name for name, (_, bad, dtype, rows) in CASES.items()
                      if bad in (10**9, -1) and (dtype, rows) != ("float32", 40)]


def _call(op, kept, dtype, rows, device, backend, check_indices=False, zero_neuron=None):
    """Run `op` on fixed random inputs over the dimension of SIZE; `zero_neuron` zeroes that
    neuron's weight rows and biases (an index that reads nothing)."""
    generator = torch.Generator().manual_seed(0)

    def make(*shape, per_neuron=False):
        t = torch.randn(*shape, generator=generator)
        if per_neuron and zero_neuron is not None:
            t[zero_neuron] = 0
        return t.to(device, getattr(torch, dtype))

    def neuron_rows():  # a weight with one row per neuron (nn.Linear layout or neuron-major)
        return make(SIZE, HIDDEN, per_neuron=True)

    kept = kept.to(device)
    x = make(rows, HIDDEN)
    options = dict(backend=backend, check_indices=check_indices)
    if op == "gather_rows_linear":
        return dk.gather_rows_linear(x, neuron_rows(), make(SIZE, per_neuron=True), kept, "gelu",
                                     **options)
    if op == "gather_cols_linear":
        return dk.gather_cols_linear(make(rows, kept.numel()), neuron_rows(), make(HIDDEN), kept,
                                     **options)
    if op == "gather_ffn":
        return dk.gather_ffn(x, neuron_rows(), make(SIZE, per_neuron=True), neuron_rows(),
                             make(HIDDEN), kept, "gelu", **options)
    return dk.gather_swiglu_ffn(x, neuron_rows(), neuron_rows(), neuron_rows(), kept, **options)


def _kept(bad):
    return torch.tensor([0, bad, SIZE - 1])


def _run_case(device, backend, name):
    """The outcome of one case, as a JSON-able dict (run in the child process)."""
    op, bad, dtype, rows = CASES[name]
    try:
        out = _call(op, _kept(bad), dtype, rows, device, backend)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 (the outcome is what the test checks)
        return {"raised": type(error).__name__, "message": str(error)}
    expected = _call(op, _kept(1), dtype, rows, device, "torch", zero_neuron=1)
    scale = max(1.0, float(expected.float().abs().max()))
    return {"returned": True, "error": float((out.float() - expected.float()).abs().max()) / scale}


def _child_main(device, backend, names):
    for name in names:
        print(json.dumps({"started": name}), flush=True)
        print(json.dumps({"case": name, **_run_case(device, backend, name)}), flush=True)


@functools.lru_cache(maxsize=None)
def _outcomes(device, backend, names):
    """Run the cases `names` in a child process; after a crash, the rest in a new one."""
    env = dict(os.environ)
    if device == "cpu" and backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    outcomes, remaining = {}, list(names)
    while remaining:
        child = subprocess.run(
            [sys.executable, __file__, device, backend, json.dumps(remaining)],
            capture_output=True, text=True, env=env, timeout=900,
        )
        started = None
        for line in child.stdout.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "started" in record:
                started = record["started"]
            else:
                outcomes[record.pop("case")] = record
        if started is None or started in outcomes:  # every case ran (or none started: give up)
            break
        outcomes[started] = {"crashed": child.returncode, "stderr": child.stderr[-2000:]}
        remaining = remaining[remaining.index(started) + 1:]
    return outcomes


def _outcome(device, backend, name):
    names = (name,) if backend == "cuda" else tuple(CASES)
    outcome = _outcomes(device, backend, names)
    assert name in outcome, f"{name} did not run (the child process stopped before it)"
    return outcome[name]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("device,backend", backend_cases())
def test_out_of_range_entry_in_the_middle_reads_nothing(device, backend, name):
    op, bad, dtype, rows = CASES[name]
    if device == "cuda" and backend == "torch":
        pytest.skip("PyTorch's own index_select kernel (a device-side assertion)")
    if backend == "cuda" and name not in CUDA_BACKEND_CASES:
        pytest.skip("the cuda backend runs a subset (a process per case)")
    outcome = _outcome(device, backend, name)
    assert "crashed" not in outcome, (
        f"the process died (exit code {outcome.get('crashed')}) running {name}:\n"
        f"{outcome.get('stderr')}")
    if backend == "cpu":
        assert outcome.get("raised") == "ValueError", outcome
        assert (f"holds index {bad} at position 1, out of range for a dimension of size {SIZE}"
                in outcome["message"]), outcome
    elif backend == "torch":
        assert outcome.get("raised") == "IndexError", outcome
    elif backend == "cuda":
        assert "device-side assert triggered" in outcome.get("message", ""), outcome
    else:  # triton: masked loads, the bad entry reads nothing
        assert outcome.get("returned"), outcome
        assert outcome["error"] < (1e-4 if dtype == "float32" else 3e-2), outcome


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [10**9, -1])
def test_checked_path_names_a_bad_entry_in_the_middle(op, bad):
    with pytest.raises(ValueError, match=f"holds index {bad}, out of range"):
        _call(op, _kept(bad), "float32", 3, "cpu", "auto", check_indices=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", backend_cases())
def test_unsorted_repeated_indices_match_the_reference(device, backend, op):
    """The kernels do not rely on sorted, unique lists (outputs are written by position): an
    unchecked unsorted list with repeats gives index_select's result."""
    kept = torch.tensor([5, 2, 5, SIZE - 1, 0])
    out = _call(op, kept, "float32", 3, device, backend)
    expected = _call(op, kept, "float32", 3, device, "torch")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", OPS + ["segmented_gather_ffn"])
@pytest.mark.parametrize("device,backend", backend_cases())
def test_unchecked_list_over_a_dimension_of_size_zero_is_refused(device, backend, op):
    """Over a weight with no neurons no index is in range: refused without reading the values
    (a kernel would read row 0, which does not exist)."""
    kept = torch.tensor([0], device=device)
    x = torch.randn(2, HIDDEN, device=device)
    empty = torch.empty(0, HIDDEN, device=device)
    options = dict(backend=backend, check_indices=False)
    calls = {
        "gather_rows_linear": lambda: dk.gather_rows_linear(x, empty, None, kept, **options),
        "gather_cols_linear": lambda: dk.gather_cols_linear(x[:, :1], empty, None, kept,
                                                            **options),
        "gather_ffn": lambda: dk.gather_ffn(x, empty, None, empty, None, kept, "gelu",
                                            **options),
        "gather_swiglu_ffn": lambda: dk.gather_swiglu_ffn(x, empty, empty, empty, kept,
                                                          **options),
        "segmented_gather_ffn": lambda: dk.segmented_gather_ffn(
            x, empty, None, empty, None, torch.tensor([0, 2], device=device), kept,
            torch.tensor([0, 1], device=device), "gelu", **options),
    }
    with pytest.raises(ValueError, match="holds 1 indices but the dimension it indexes has size 0"):
        calls[op]()



@pytest.mark.parametrize("op", ["gather_ffn", "gather_swiglu_ffn"])
@pytest.mark.parametrize("device,backend", backend_cases())
def test_an_unchecked_full_list_with_scales_runs_whatever_its_values(device, backend, op):
    """An unchecked FFN list as long as the layer runs the dense FFN, whatever its values, with
    `scales` too (they were scattered through the list: an out-of-range value raised, or on a
    GPU would fail a device-side assertion); where the cpu backend's kernel runs instead of the
    dense FFN, it checks the values (ValueError naming the index)."""
    kept = torch.arange(SIZE, device=device)
    kept[3] = SIZE + 5
    x = torch.randn(4, HIDDEN, device=device)
    w, w_t = torch.randn(SIZE, HIDDEN, device=device), torch.randn(SIZE, HIDDEN, device=device)
    options = dict(backend=backend, check_indices=False, scales=torch.rand(SIZE, device=device))
    try:
        out = (dk.gather_ffn(x, w, None, w_t, None, kept, "gelu", **options) if op == "gather_ffn"
               else dk.gather_swiglu_ffn(x, w, w, w_t, kept, **options))
    except ValueError as error:
        assert backend == "cpu" and f"holds index {SIZE + 5} at position 3" in str(error)
        return
    # what it runs: the value clamped to the last neuron, which gets position 3's scale or its
    # own (two writes to one place, in no set order), and neuron 3 none (scale 0)
    every = torch.arange(SIZE, device=device)
    for last in (options["scales"][3], options["scales"][SIZE - 1]):
        scales = options["scales"].clone()
        scales[3], scales[SIZE - 1] = 0, last
        want = (ffn_ref(x, w, None, w_t, None, every, "gelu", scales) if op == "gather_ffn"
                else swiglu_ffn_ref(x, w, w, w_t, every, scales))
        if torch.allclose(out.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()):
            return
    raise AssertionError(f"{op} on {backend}: neither scale at the clamped neuron gives its output")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_the_registered_ops_take_int32_lists(device, backend):
    """torch.ops.doe_kernels.* take int32 index lists, as their schema does, on every backend (the
    public functions convert them; the cpu backend's kernels read int64 only)."""
    ops = torch.ops.doe_kernels
    x = torch.randn(9, HIDDEN, device=device)
    w, w_t = torch.randn(SIZE, HIDDEN, device=device), torch.randn(SIZE, HIDDEN, device=device)
    for kept in (torch.tensor([1, 3, 40], device=device), torch.arange(SIZE, device=device)):
        small = kept.to(torch.int32)
        calls = [
            lambda k: ops.gather_rows_linear(x, w, None, k, "gelu", backend),
            lambda k: ops.gather_cols_linear(torch.ones(9, k.numel(), device=device), w_t, None,
                                             k, backend),
            lambda k: ops.gather_ffn(x, w, None, w_t, None, k, "gelu", backend),
            lambda k: ops.gather_swiglu_ffn(x, w, w, w_t, k, backend),
        ]
        for call in calls:
            torch.testing.assert_close(call(small), call(kept))


@pytest.mark.parametrize("strategy", ["auto", "segments", "union"])
@pytest.mark.parametrize("device,backend", backend_cases())
def test_the_registered_segmented_ops_take_int32_offsets_and_lists(device, backend, strategy):
    """The segmented ops' segments, kept lists and offsets as int32 (their schema takes them),
    whatever the strategy: the cpu backend's C++ calls and its union gathers read int64 only."""
    ops = torch.ops.doe_kernels
    x = torch.randn(7, HIDDEN, device=device)
    w, w_t = torch.randn(SIZE, HIDDEN, device=device), torch.randn(SIZE, HIDDEN, device=device)
    segments = torch.tensor([0, 2, 2, 7], device=device)
    kept = torch.tensor([1, 3, 40, 0, 1, 2, 3, 4, 5], device=device)
    kept_offsets = torch.tensor([0, 3, 3, 9], device=device)
    calls = [
        lambda s, k, o: ops.segmented_gather_ffn(x, w, None, w_t, None, s, k, o, "gelu", backend,
                                                 None, strategy),
        lambda s, k, o: ops.segmented_gather_swiglu_ffn(x, w, w, w_t, s, k, o, backend, None,
                                                        strategy),
    ]
    tensors = (segments, kept, kept_offsets)
    for which in ((0, 1, 2), (0, 2), (1,)):  # (kept in int64 alone takes the C++ plan)
        small = [t.to(torch.int32) if i in which else t for i, t in enumerate(tensors)]
        for call in calls:
            torch.testing.assert_close(call(*small), call(*tensors))

if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
