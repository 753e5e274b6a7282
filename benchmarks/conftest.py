"""Benchmark harness: options, the per-run result collector, and the end-of-run report.

`pytest benchmarks/` runs the quick sweep (a few minutes on 2 CPU cores); `--full` (or
DOE_BENCH_FULL=1) runs the whole sweep; `--smoke` runs one tiny case of each benchmark (CI);
`--bench-dtype bfloat16` sweeps another dtype (its files get the dtype in their names).
Each benchmark records its median time; at the end the run's results are written under
benchmarks/results/ (JSON and CSV with device, versions, date and commit), the speed-up curves are
drawn as PNG files and a summary table is printed. Benchmarks never assert on time.
"""
import os
import time

import pytest
import torch

from report import Recorder, summary_lines, write_results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}

def pytest_addoption(parser):
    group = parser.getgroup("doe-kernels benchmarks")
    group.addoption("--full", action="store_true", help="run the full sweep")
    group.addoption("--smoke", action="store_true", help="one tiny case per benchmark (CI)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if present)")
    group.addoption("--bench-dtype", default=None, choices=tuple(DTYPES),
                    help="dtype of weights and activations (default: float32 on the CPU, "
                         "bfloat16 on the GPU)")
    group.addoption("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"),
                    help="where result files and plots go")


def pytest_configure(config):
    option = config.option
    # Quicker defaults than pytest-benchmark's, unless given on the command line.
    # pytest-benchmark keeps --benchmark-max-time as a string ("1.0" when not given).
    if getattr(option, "benchmark_max_time", None) in (1.0, "1.0"):
        option.benchmark_max_time = "0.25"
    if getattr(option, "benchmark_min_rounds", None) == 5:
        option.benchmark_min_rounds = 3
    config.doe_recorder = Recorder()
    if bench_device(config).type == "cpu" and bench_dtype(config) == torch.float16:
        raise pytest.UsageError("--bench-dtype float16 is for the GPU (the CPU kernels take "
                                "float32 and bfloat16)")


def sweep_mode(config) -> str:
    if config.getoption("--smoke"):
        return "smoke"
    if config.getoption("--full") or os.environ.get("DOE_BENCH_FULL") == "1":
        return "full"
    return "quick"


def bench_device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_dtype(config) -> torch.dtype:
    return DTYPES[config.getoption("--bench-dtype") or DEFAULT_DTYPE[bench_device(config).type]]


def run_bounded(benchmark, fn, config, setup=None, max_rounds: int = 1000) -> None:
    """`benchmark.pedantic(fn)` with a bounded number of rounds, estimated from a few probe calls.

    pytest-benchmark's own calibration fixes the round count from one fast measurement, so on a
    loaded machine a microsecond op can run for minutes; here rounds = max_time / (median probe
    time), at least --benchmark-min-rounds and at most `max_rounds`. `setup` (optional) runs
    before every call, untimed. The probe calls double as warm-up.
    """
    option = config.option
    max_time = float(getattr(option, "benchmark_max_time", 0.25))
    min_rounds = int(getattr(option, "benchmark_min_rounds", 3))
    times = []
    while len(times) < 3 and sum(times) < max_time / 2:
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    probe = sorted(times)[len(times) // 2]
    rounds = int(min(max_rounds, max(min_rounds, max_time / max(probe, 1e-7))))
    benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1)


@pytest.fixture
def recorder(request):
    return request.config.doe_recorder


def pytest_sessionfinish(session, exitstatus):
    recorder = session.config.doe_recorder
    if not recorder.rows:
        return
    config = session.config
    dtype = str(bench_dtype(config)).removeprefix("torch.")
    suffix = "" if dtype == DEFAULT_DTYPE[bench_device(config).type] else "_" + dtype
    config.doe_written = write_results(recorder, config.getoption("--results-dir"),
                                       sweep_mode(config) + suffix)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    recorder = config.doe_recorder
    if not recorder.rows:
        return
    terminalreporter.section("doe-kernels speed-up summary")
    for line in summary_lines(recorder):
        terminalreporter.write_line(line)
    for path in getattr(config, "doe_written", []):
        terminalreporter.write_line(f"wrote {path}")
