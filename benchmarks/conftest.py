"""Benchmark harness: options, the per-run result collector, and the end-of-run report.

`pytest benchmarks/` runs the quick sweep (a few minutes on a laptop-class CPU); `--full` (or
DOE_BENCH_FULL=1) runs the whole sweep; `--smoke` runs one tiny case of each benchmark (CI);
`--bench-dtype bfloat16` sweeps another dtype (its files get the dtype in their names).
`--shapes`, `--rates` and `--rows` replace the op benchmarks' grid (`--rates` the model
benchmark's too); `--time-budget S` skips what is left once S seconds have passed (the results of
what ran are still written); `--results-suffix NAME` adds NAME to the result files' names.

Each benchmark records its median time. On the CPU that is pytest-benchmark's median of a bounded
number of rounds (`measure`), each call with the CPU's caches emptied first (`--cpu-cache cold`,
the default: in a model, a layer's weights are not in the cache its previous call left them in;
`warm` times repeated calls on cached weights). On a GPU it is the median of CUDA-event timings
(`_cuda_median`), with the L2 cache flushed before every call (for the same reason), at least
--benchmark-min-rounds of them, and pytest-benchmark runs the call once more only to mark the
benchmark used. Every candidate is
checked against its reference (pre-sliced weights, or the experts one by one) before it is timed
(`check_close`). At the end the run's results are written (JSON and CSV with device,
versions, date and commit), the speed-up curves are drawn as PNG files, a summary table is printed
and the last line names the folder. The folder is `--results-dir`, by default
benchmarks/results/local/, which git ignores: a run leaves the checkout clean, and a reference run
is committed by choice, with `--results-dir benchmarks/results`. Benchmarks never assert on time.
"""
import os
import shlex
import statistics
import time

import pytest
import torch

from report import (DEFAULT_RESULTS_DIR, Recorder, run_start, summary_lines, where_lines,
                    write_results)
from shapes import FULL, QUICK, SHAPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
# Relative (Frobenius) difference allowed between an op benchmark's candidate and its reference
# (pre-sliced weights, or the experts run one after another): rounding in another order.
OP_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def check_close(got, want, tolerance: float, what: str) -> None:
    """A benchmark checks a candidate once before timing it (a fast wrong kernel is no result):
    `got` (a tensor or a list of them, concatenated) against `want` within `tolerance`, relative
    (Frobenius)."""
    got, want = (torch.cat(t) if isinstance(t, (list, tuple)) else t for t in (got, want))
    got, want = got.float(), want.float()
    error = float((got - want).norm() / want.norm().clamp_min(1e-12))
    assert error < tolerance, f"{what}: relative difference {error:.2e}"

def pytest_addoption(parser):
    group = parser.getgroup("doe-kernels benchmarks")
    group.addoption("--full", action="store_true", help="run the full sweep")
    group.addoption("--smoke", action="store_true", help="one tiny case per benchmark (CI)")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                    help="cpu or cuda (default: cuda if present)")
    group.addoption("--bench-dtype", default=None, choices=tuple(DTYPES),
                    help="dtype of weights and activations (default: float32 on the CPU, "
                         "bfloat16 on the GPU)")
    group.addoption("--results-dir", default=DEFAULT_RESULTS_DIR,
                    help="where result files and plots go (default: benchmarks/results/local, "
                         "ignored by git; benchmarks/results holds the committed reference runs)")
    group.addoption("--results-suffix", default="",
                    help="added to the result files' names (runs of one device and mode apart)")
    group.addoption("--shapes", type=_names, default=None,
                    help="op benchmarks: comma-separated shape names (see shapes.py)")
    group.addoption("--rates", type=_numbers(float), default=None,
                    help="op and model benchmarks: comma-separated pruning rates, e.g. 0.35,0.65")
    group.addoption("--rows", type=_numbers(int), default=None,
                    help="op benchmarks: comma-separated row counts, e.g. 1,8,512")
    group.addoption("--time-budget", type=float, default=None,
                    help="seconds after the session's start past which benchmarks are skipped")
    group.addoption("--cpu-cache", choices=("cold", "warm"), default="cold",
                    help="CPU: empty the caches before every timed call (cold, the default: as "
                         "a model's layers meet their weights) or not (warm: repeated calls on "
                         "cached weights)")


def _names(text: str) -> tuple:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _numbers(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(part) for part in _names(text))
    parse.__name__ = kind.__name__ + " list"  # argparse names the type in its error message
    return parse


def _given(config, flag: str) -> bool:
    """Whether `flag` is given (as `flag VALUE` or `flag=VALUE`): on the command line, in
    PYTEST_ADDOPTS or in the ini file's addopts."""
    args = list(config.invocation_params.args) + shlex.split(
        os.environ.get("PYTEST_ADDOPTS", ""))
    try:
        args += list(config.getini("addopts"))
    except (ValueError, AttributeError):  # (no such ini option)
        pass
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def pytest_configure(config):
    if config.getoption("numprocesses", None) or hasattr(config, "workerinput"):
        # each worker would time against the others and write the same results files
        raise pytest.UsageError("the benchmarks run in one process: drop -n (pytest-xdist)")
    option = config.option
    # Quicker defaults than pytest-benchmark's, unless given on the command line (where its
    # own default values count as given).
    if not _given(config, "--benchmark-max-time"):
        option.benchmark_max_time = "0.25"
    if not _given(config, "--benchmark-min-rounds"):
        option.benchmark_min_rounds = 3
    config.doe_recorder = Recorder()
    config.doe_recorder.run_info = run_start(
        cpu_cache=config.getoption("--cpu-cache") if bench_device(config).type == "cpu" else None)
    config.doe_start = time.monotonic()
    unknown = set(config.getoption("--shapes") or ()) - set(SHAPES)
    if unknown:
        raise pytest.UsageError(f"--shapes: unknown {sorted(unknown)}; known: {sorted(SHAPES)}")
    if any(not 0 <= r < 1 for r in config.getoption("--rates") or ()):
        raise pytest.UsageError("--rates: pruning rates are in [0, 1)")
    if any(r < 1 for r in config.getoption("--rows") or ()):
        raise pytest.UsageError("--rows: row counts are at least 1")
    if bench_device(config).type == "cpu" and bench_dtype(config) == torch.float16:
        raise pytest.UsageError("--bench-dtype float16 is for the GPU (the CPU kernels take "
                                "float32 and bfloat16)")


def sweep_mode(config) -> str:
    if config.getoption("--smoke"):
        return "smoke"
    if config.getoption("--full") or os.environ.get("DOE_BENCH_FULL") == "1":
        return "full"
    return "quick"


def grid(config, smoke_shape: str, quick: dict | None = None) -> dict:
    """The op benchmarks' grid (shapes, prune_rates, rows): the mode's, with the options' overrides.
    The smoke run keeps its one tiny case, on `smoke_shape`; `quick` replaces some of the quick
    sweep's entries for one benchmark."""
    mode = sweep_mode(config)
    if mode == "smoke":
        return dict(shapes=(smoke_shape,), prune_rates=(0.65,), rows=(8,))
    out = dict(QUICK, **(quick or {})) if mode == "quick" else dict(FULL)
    for key, option in (("shapes", "--shapes"), ("prune_rates", "--rates"), ("rows", "--rows")):
        out[key] = config.getoption(option) or out[key]
    return out


def bench_device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_dtype(config) -> torch.dtype:
    return DTYPES[config.getoption("--bench-dtype") or DEFAULT_DTYPE[bench_device(config).type]]


def measure(benchmark, fn, config, setup=None, max_rounds: int = 1000) -> float:
    """Median seconds of `fn()`; `setup` (optional) runs before every call.

    CPU: `benchmark.pedantic(fn)` with a bounded number of rounds, estimated from a few probe
    calls (which double as warm-up). pytest-benchmark's own calibration fixes the round count from
    one fast measurement, so on a loaded machine a microsecond op can run for minutes; here
    rounds = max_time / (median probe time), at least --benchmark-min-rounds and at most
    `max_rounds` (COLD_ROUNDS with --cpu-cache cold); `setup`, and the cold cache's eviction
    before it, are untimed. With --benchmark-disable the same rounds are timed here.
    GPU: CUDA-event timings (`_cuda_median`: L2 flushed and `setup` run before each call,
    untimed). pytest-benchmark then runs the call once, only to mark the fixture used.
    """
    if bench_device(config).type == "cuda":
        seconds = _cuda_median(fn, config, setup, max_rounds)
        benchmark.extra_info["cuda_event_median_s"] = seconds
        benchmark.pedantic(fn, setup=setup, rounds=1, iterations=1)
        return seconds

    setup = _cpu_setup(config, setup)

    def timed_call() -> float:
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    rounds = _cpu_rounds(timed_call, config, max_rounds)
    if getattr(benchmark, "disabled", False):
        return _median([timed_call() for _ in range(rounds)])
    benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1)
    return benchmark.stats.stats.median


COLD_ROUNDS = 60  # rounds at most with --cpu-cache cold (each eviction reads 2x the L3 cache)


def _cpu_setup(config, setup=None):
    """`setup` preceded by emptying the CPU's caches (`evict_cpu_caches`) with --cpu-cache cold
    (None when there is nothing to run)."""
    if config.getoption("--cpu-cache") != "cold":
        return setup
    if setup is None:
        return evict_cpu_caches

    def evict_then_setup():
        evict_cpu_caches()
        return setup()  # (pytest-benchmark reads what it returns as the call's arguments)
    return evict_then_setup


_EVICTION: list = []  # the buffer evict_cpu_caches reads, made once


def evict_cpu_caches() -> None:
    """Read a buffer twice the size of the CPU's last-level cache (64 MiB where unknown), so that
    nothing a timed call reads stays cached from the previous one (read, not written: the lines
    left behind are clean, and the timed call pays no write-backs)."""
    if not _EVICTION:
        _EVICTION.append(torch.ones(2 * _last_level_cache_bytes() // 4))
    _EVICTION[0].sum()


def _last_level_cache_bytes() -> int:
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        sizes.append(int(text.rstrip("KMGkmg")) * scale)
    return max(sizes, default=32 * 2**20)


def measure_pair(benchmark, fn, other, config, max_rounds: int = 1000) -> tuple[float, float]:
    """Median seconds of `fn()` and of `other()`, timed alternately, so that a drift in the
    machine's speed falls on both alike: for ratios close to 1, such as the cost of an optional
    argument. CPU: `measure`'s round count (from `fn`'s probe calls); each round times both calls,
    in turns first. GPU: `measure`'s CUDA-event medians, three turns each, the median of the turns.
    pytest-benchmark then runs `other` once, only to mark the fixture used; both medians go to its
    extra_info."""
    if bench_device(config).type == "cuda":
        turns = [(_cuda_median(fn, config), _cuda_median(other, config)) for _ in range(3)]
        seconds = _median([t[0] for t in turns]), _median([t[1] for t in turns])
    else:
        setup = _cpu_setup(config)

        def timed(call) -> float:
            if setup is not None:
                setup()
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

        rounds = _cpu_rounds(lambda: timed(fn), config, max_rounds)
        times = ([], [])
        for i in range(rounds):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                times[which].append(timed((fn, other)[which]))
        seconds = _median(times[0]), _median(times[1])
    benchmark.extra_info["median_s"], benchmark.extra_info["other_median_s"] = seconds
    benchmark.pedantic(other, rounds=1, iterations=1)
    return seconds


def _cuda_median(call, config, setup=None, max_rounds: int = 1000) -> float:
    """Median seconds of `call()` by CUDA events, the L2 cache flushed and `setup` (optional) run
    before each call, untimed: after three warm-up calls, as many calls as fit in about 400 x
    --benchmark-max-time milliseconds (20 to 100, from three calls' estimate), at least
    --benchmark-min-rounds and at most `max_rounds` (triton's do_bench, used before, timed a
    single call of the slowest models and ran `setup` inside the timed call)."""
    max_time = float(getattr(config.option, "benchmark_max_time", 0.25))
    min_rounds = int(getattr(config.option, "benchmark_min_rounds", 3))
    budget = max(20, min(100, 400 * max_time)) / 1e3
    for _ in range(3):
        call() if setup is None else (setup(), call())
    estimate = _median(_cuda_times(call, setup, 3))
    rounds = int(min(max_rounds, max(min_rounds, budget / max(estimate, 1e-7))))
    return _median(_cuda_times(call, setup, rounds))


_L2_FLUSH: list = []  # the buffer _cuda_times writes to flush the L2 cache, made once


def _cuda_times(call, setup, count: int) -> list:
    """Seconds of `count` calls by CUDA events, each after `setup` and an L2 flush (a 256 MB
    write, as triton's do_bench does), neither timed."""
    if not _L2_FLUSH:
        _L2_FLUSH.append(torch.empty(2**28 // 4, dtype=torch.int32, device="cuda"))
    events = []
    for _ in range(count):
        if setup is not None:
            setup()
        _L2_FLUSH[0].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _cpu_rounds(timed_call, config, max_rounds: int) -> int:
    """max_time / (median of a few probe calls, which double as warm-up), at least
    --benchmark-min-rounds and at most `max_rounds`."""
    option = config.option
    if config.getoption("--cpu-cache") == "cold":
        max_rounds = min(max_rounds, COLD_ROUNDS)
    max_time = float(getattr(option, "benchmark_max_time", 0.25))
    min_rounds = int(getattr(option, "benchmark_min_rounds", 3))
    times = []
    while len(times) < 3 and sum(times) < max_time / 2:
        times.append(timed_call())
    return int(min(max_rounds, max(min_rounds, max_time / max(_median(times), 1e-7))))


def _median(values) -> float:
    """The median as pytest-benchmark takes it (the mean of the two middle values of an even
    count), so that every figure of a file is one kind of median."""
    return statistics.median(values)


def copy_bandwidth(device: str) -> float:
    """Bytes per second a device-to-device copy of 1 GiB moves (read plus written): the memory
    bandwidth bound the decode-size benchmarks are compared with."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median") / 1e3
    return 2 * src.numel() / seconds


@pytest.fixture
def recorder(request):
    config = request.config
    device = bench_device(config)
    if device.type == "cuda" and config.doe_recorder.copy_bandwidth is None:
        config.doe_recorder.copy_bandwidth = copy_bandwidth(str(device))
    return config.doe_recorder


@pytest.fixture(autouse=True)
def _time_budget(request):
    budget = request.config.getoption("--time-budget")
    if budget is not None and time.monotonic() - request.config.doe_start > budget:
        pytest.skip(f"--time-budget of {budget:g} s spent")


def pytest_sessionfinish(session, exitstatus):
    recorder = session.config.doe_recorder
    if recorder.empty():
        return
    config = session.config
    dtype = str(bench_dtype(config)).removeprefix("torch.")
    suffix = "" if dtype == DEFAULT_DTYPE[bench_device(config).type] else "_" + dtype
    extra = config.getoption("--results-suffix")
    config.doe_written = write_results(recorder, config.getoption("--results-dir"),
                                       sweep_mode(config) + suffix + (f"_{extra}" if extra else ""))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table: the run's last words
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    recorder = config.doe_recorder
    if recorder.empty():
        return
    terminalreporter.section("doe-kernels speed-up summary")
    for line in summary_lines(recorder) + where_lines(getattr(config, "doe_written", []),
                                                      config.getoption("--results-dir")):
        terminalreporter.write_line(line)
