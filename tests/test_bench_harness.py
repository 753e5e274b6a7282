"""The benchmark harness (benchmarks/): the grid options, the time budget and the result files that
benchmarks/run_gpu.sh relies on, where a run's files go by default (a folder git ignores), and the
read-rate columns of the report."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.append(BENCHMARKS)  # after tests/: benchmarks/ has a conftest module too
from report import (  # noqa: E402
    DEFAULT_RESULTS_DIR,
    Recorder,
    summary_lines,
    where_lines,
    write_results,
)


def _run_benchmarks(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(BENCHMARKS, "test_ffn_bench.py"), "-q",
         "-p", "no:cacheprovider", "--results-dir", str(tmp_path), "--benchmark-max-time", "0.01",
         "--bench-device", "cpu", *args],
        capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)


def _bench_conftest():
    """benchmarks/conftest.py, under another name: "conftest" is tests/conftest.py here."""
    spec = importlib.util.spec_from_file_location("bench_conftest",
                                                  os.path.join(BENCHMARKS, "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_options_and_results_suffix(tmp_path):
    run = _run_benchmarks(tmp_path, "--shapes", "all-MiniLM-L6-v2", "--rates", "0.5,0.75",
                          "--rows", "3", "--results-suffix", "mine", "-k", "not gather-cpu")
    assert run.returncode == 0, run.stdout[-3000:]
    results = json.load(open(tmp_path / "cpu_quick_mine.json"))
    grid = {(r["shape"], r["prune_rate"], r["rows"]) for r in results["results"]}
    assert grid == {("all-MiniLM-L6-v2", 0.5, 3), ("all-MiniLM-L6-v2", 0.75, 3)}
    ratios = results["ratios"]
    assert {r["variant"] for r in ratios} == {"gather-torch"}
    for r in ratios:  # kept neurons x hidden x 2 matrices x 4 bytes (float32)
        kept = round(1536 * (1 - r["prune_rate"]))
        assert r["weight_bytes"] == kept * 384 * 2 * 4
        assert r["of_copy_bandwidth"] is None  # no copy bandwidth measured on the CPU


def test_time_budget_skips_what_is_left(tmp_path):
    run = _run_benchmarks(tmp_path, "--shapes", "all-MiniLM-L6-v2", "--rates", "0.5",
                          "--rows", "3", "--time-budget", "0", "-rs")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "--time-budget of 0 s spent" in run.stdout and " passed" not in run.stdout
    assert not list(tmp_path.glob("*.json"))  # nothing measured, nothing written


@pytest.mark.parametrize("option", [("--shapes", "bert-small"), ("--rates", "1.0"),
                                    ("--rows", "0"), ("--rows", "two")])
def test_bad_grid_options_are_refused(tmp_path, option):
    run = _run_benchmarks(tmp_path, *option)
    assert run.returncode != 0
    assert option[0] in run.stdout + run.stderr


def test_read_rate_against_the_copy_bandwidth():
    recorder = Recorder()
    common = dict(bench="ffn", shape="s", dtype="bfloat16", device="cuda", prune_rate=0.5, rows=1)
    recorder.add(variant="dense", median_s=4e-6, weight_bytes=8_000_000, **common)
    recorder.add(variant="sliced", median_s=2.5e-6, weight_bytes=4_000_000, **common)
    recorder.add(variant="gather-cuda", median_s=2e-6, weight_bytes=4_000_000, **common)
    assert "% copy bw" not in summary_lines(recorder)[0]  # no bandwidth measured
    recorder.copy_bandwidth = 2.5e12
    (ratio,) = recorder.ratios()
    assert ratio["weight_GBps"] == pytest.approx(2000)
    assert ratio["of_copy_bandwidth"] == pytest.approx(0.8)
    assert ratio["speedup_vs_dense"] == pytest.approx(2)
    assert ratio["time_vs_sliced"] == pytest.approx(0.8)
    lines = summary_lines(recorder)
    assert "% copy bw" in lines[0] and lines[2].split()[-1] == "80"
    assert lines[-1] == "copy bandwidth (read + written): 2500 GB/s"


def test_gpu_timing_path_times_each_call_alone_and_enough_of_them(monkeypatch):
    """The CUDA branch of `measure` (no GPU needed: CUDA events on a simulated clock): `setup`
    and the L2 flush run before each timed call and are not timed, a call too slow for the time
    budget is still timed --benchmark-min-rounds times (triton's do_bench timed one), the median
    is in seconds, and pytest-benchmark runs the call once."""
    bench_conftest = _bench_conftest()
    clock, timed = [0.0], []

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = clock[0]

        def elapsed_time(self, end):  # milliseconds
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench_conftest, "_L2_FLUSH", [torch.empty(4)])

    class Config:
        option = type("Option", (), {"benchmark_max_time": "0.25", "benchmark_min_rounds": 4})()

        def getoption(self, name):
            return {"--bench-device": "cuda"}[name]

    class Benchmark:
        extra_info, pedantic_calls = {}, []

        def pedantic(self, fn, setup, rounds, iterations):
            self.pedantic_calls.append((rounds, iterations))
            setup()
            fn()

    def call():  # 0.3 s a call: three times the 0.1 s budget
        clock[0] += 0.3
        timed.append("call")

    def setup():  # 1 s, untimed
        clock[0] += 1.0
        timed.append("setup")

    benchmark = Benchmark()
    seconds = bench_conftest.measure(benchmark, call, Config(), setup=setup)
    assert seconds == pytest.approx(0.3)
    # three warm-up calls, three estimating ones, then --benchmark-min-rounds (4), then
    # pytest-benchmark's one; each after its setup
    assert timed == ["setup", "call"] * (3 + 3 + 4 + 1)
    assert benchmark.pedantic_calls == [(1, 1)]
    assert benchmark.extra_info["cuda_event_median_s"] == pytest.approx(0.3)


def test_overheads_are_reported_apart_from_the_ratios(tmp_path):
    """An optional argument's cost (the FFN benchmark's `scales`): its ratio, a summary section
    of its own and the JSON's `overheads`, never a row of the speed-up ratios."""
    recorder = Recorder()
    assert recorder.empty()
    recorder.add_overhead(bench="ffn", shape="bert-base", dtype="float32", device="cpu",
                          variant="gather-cpu", option="scales", prune_rate=0.35, rows=8,
                          without_s=2e-3, with_s=2.02e-3)
    assert not recorder.empty() and recorder.ratios() == []
    assert recorder.overheads[0]["ratio"] == pytest.approx(1.01)
    lines = summary_lines(recorder)
    assert lines[0] == "" and lines[1].startswith("overheads: median time with the option")
    assert lines[3].split() == ["ffn", "bert-base", "float32", "gather-cpu", "scales", "35", "8",
                                "1.010", "2.000", "2.020"]
    written = write_results(recorder, str(tmp_path), "quick")
    results = json.load(open(written[0]))
    assert results["overheads"] == recorder.overheads and results["ratios"] == []


def test_benchmarks_refuse_xdist(tmp_path):
    """Under pytest-xdist each worker timed against the others and wrote the same files (the
    last one's half of the results won)."""
    result = _run_benchmarks(tmp_path, "--smoke", "-n", "2")
    assert result.returncode == 4 and "drop -n (pytest-xdist)" in result.stderr
    assert not os.listdir(tmp_path)


def test_the_csv_names_the_machine_and_each_rows_device(tmp_path):
    """The metadata's `device` (the machine) and each ratio row's (cpu, cuda) were one CSV
    column: the machine was lost."""
    import csv

    recorder = Recorder()
    for variant, rate, seconds in (("dense", 0.0, 2e-3), ("sliced", 0.5, 1e-3),
                                   ("gather-cpu", 0.5, 1.1e-3)):
        recorder.add(bench="ffn", shape="s", dtype="float32", device="cpu", variant=variant,
                     prune_rate=rate, rows=8, median_s=seconds)
    written = write_results(recorder, str(tmp_path), "quick")
    meta = json.load(open(written[0]))["meta"]
    rows = list(csv.DictReader(open(written[1])))
    assert rows and all(r["machine"] == meta["device"] and r["device"] == "cpu" for r in rows)


def test_results_record_the_commit_at_the_start_and_what_changes_the_code_run(
        tmp_path, monkeypatch):
    """A long run is labelled with the commit it started on (the checkout may move meanwhile),
    and its files record the environment that changes which kernels run, transformers' version,
    the CPU cache condition and the machine's load at the start and end."""
    import csv

    import report

    monkeypatch.setenv("DOE_KERNELS_CPU_ISA", "avx2")
    monkeypatch.setattr(report, "_git_commit", lambda: "abc1234")
    recorder = Recorder()
    recorder.run_info = report.run_start(cpu_cache="cold")
    monkeypatch.setattr(report, "_git_commit", lambda: "later99")
    for variant, rate, seconds in (("dense", 0.0, 2e-3), ("gather-cpu", 0.5, 1e-3)):
        recorder.add(bench="ffn", shape="s", dtype="float32", device="cpu", variant=variant,
                     prune_rate=rate, rows=8, median_s=seconds)
    written = write_results(recorder, str(tmp_path), "quick")
    meta = json.load(open(written[0]))["meta"]
    assert meta["commit"] == "abc1234" and meta["cpu_cache"] == "cold"
    assert meta["knobs"]["DOE_KERNELS_CPU_ISA"] == "avx2" and "transformers" in meta
    assert {"load_start", "load_end"} <= set(meta)
    row = next(csv.DictReader(open(written[1])))
    assert json.loads(row["knobs"])["DOE_KERNELS_CPU_ISA"] == "avx2"


class _Config:
    """pytest's config, as far as the timing helpers read it."""

    def __init__(self, device, cpu_cache="warm"):
        self.option = type("Option", (), {"benchmark_max_time": "0.25",
                                          "benchmark_min_rounds": 3})()
        self.device, self.cpu_cache = device, cpu_cache

    def getoption(self, name):
        return {"--bench-device": self.device, "--cpu-cache": self.cpu_cache}[name]


class _Benchmark:
    """pytest-benchmark's fixture, as far as the timing helpers use it."""

    disabled = False

    def __init__(self):
        self.extra_info, self.pedantic_calls = {}, []

    def pedantic(self, fn, rounds, iterations):
        self.pedantic_calls.append((rounds, iterations))
        fn()


def test_paired_timing_alternates_the_two_calls():
    """`measure_pair` on the CPU: after `fn`'s probe calls, every round times both calls, first
    one then the other in turns; pytest-benchmark sees `other` once."""
    order, benchmark = [], _Benchmark()
    fn_s, other_s = _bench_conftest().measure_pair(
        benchmark, lambda: order.append("fn"), lambda: order.append("other"), _Config("cpu"),
        max_rounds=4)
    probes = order.index("other") - 1  # the first round starts with fn
    assert order[:probes] == ["fn"] * probes
    assert order[probes:-1] == ["fn", "other", "other", "fn"] * 2
    assert order[-1] == "other" and benchmark.pedantic_calls == [(1, 1)]
    assert benchmark.extra_info == {"median_s": fn_s, "other_median_s": other_s}


def test_cold_cpu_timing_empties_the_caches_before_every_timed_call(monkeypatch):
    """--cpu-cache cold (the default): every timed call, probes included, follows an eviction
    (outside the timing), at most COLD_ROUNDS rounds; `measure`'s own setup still runs, after
    it, and what it returns reaches pytest-benchmark as before."""
    conftest = _bench_conftest()
    order = []
    monkeypatch.setattr(conftest, "evict_cpu_caches", lambda: order.append("evict"))
    conftest.measure_pair(_Benchmark(), lambda: order.append("fn"),
                          lambda: order.append("other"), _Config("cpu", "cold"))
    timed = order[:-1]  # (pytest-benchmark's own last call of `other` is not timed)
    assert timed[0::2] == ["evict"] * (len(timed) // 2) and "evict" not in timed[1::2]
    assert timed.count("other") <= conftest.COLD_ROUNDS < 1000
    order.clear()

    class Recording(_Benchmark):
        def pedantic(self, fn, rounds, iterations, setup):
            self.rounds = rounds
            for _ in range(rounds):
                assert setup() == "args"
                fn()
            self.stats = type("Stats", (), {"stats": type("S", (), {"median": 1.0})})()

    benchmark = Recording()
    conftest.measure(benchmark, lambda: order.append("fn"), _Config("cpu", "cold"),
                     setup=lambda: order.append("setup") or "args")
    assert order == ["evict", "setup", "fn"] * (len(order) // 3)
    assert benchmark.rounds <= conftest.COLD_ROUNDS


def test_eviction_reads_twice_the_last_level_cache(monkeypatch):
    conftest = _bench_conftest()
    monkeypatch.setattr(conftest, "_EVICTION", [])
    monkeypatch.setattr(conftest, "_last_level_cache_bytes", lambda: 2**20)
    with torch.inference_mode():  # (made inside the mode, read outside it too)
        conftest.evict_cpu_caches()
    conftest.evict_cpu_caches()
    assert conftest._EVICTION[0].numel() * 4 == 2 * 2**20


def test_paired_gpu_timing_takes_the_median_of_three_turns(monkeypatch):
    times = iter([1e-3, 1.1e-3, 3e-3, 1.2e-3, 2e-3, 1.3e-3])  # seconds: fn, other, fn, ...
    bench_conftest = _bench_conftest()

    def fake_cuda_median(fn, config, setup=None, max_rounds=1000):
        fn()
        return next(times)

    monkeypatch.setattr(bench_conftest, "_cuda_median", fake_cuda_median)
    order, benchmark = [], _Benchmark()
    seconds = bench_conftest.measure_pair(
        benchmark, lambda: order.append("fn"), lambda: order.append("other"), _Config("cuda"))
    assert seconds == (pytest.approx(2e-3), pytest.approx(1.2e-3))
    assert order == ["fn", "other"] * 3 + ["other"] and benchmark.pedantic_calls == [(1, 1)]


def test_default_results_dir_is_ignored_by_git():
    """`pytest benchmarks/` writes under benchmarks/results/local/, which git ignores, so a run
    leaves the checkout clean; the committed reference files' names in benchmarks/results/ (what
    `--results-dir benchmarks/results` and run_gpu.sh's archive write) stay committable, and smoke
    files are ignored wherever they are."""
    options = {}

    class Parser:  # pytest's parser, as far as pytest_addoption uses it
        def getgroup(self, name):
            return self

        def addoption(self, name, **kwargs):
            options[name] = kwargs

    _bench_conftest().pytest_addoption(Parser())
    assert options["--results-dir"]["default"] == DEFAULT_RESULTS_DIR
    root = os.path.dirname(os.path.abspath(BENCHMARKS))
    local = os.path.relpath(DEFAULT_RESULTS_DIR, root)
    assert local == os.path.join("benchmarks", "results", "local")

    try:
        inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root,
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        inside = ""
    if inside != "true":
        pytest.skip("not in a git checkout")

    def ignored(path: str) -> bool:
        run = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=root,
                             timeout=30)
        assert run.returncode in (0, 1), f"git check-ignore failed on {path}"
        return run.returncode == 0

    for name in ("cpu_quick.json", "cpu_full_bfloat16.csv", "plots/cpu_quick/ffn_bert-base.png",
                 "gpu_logs/tests.log"):
        assert ignored(os.path.join(local, name)), name
    for name in ("cpu_quick.json", "cpu_full.csv", "plots/cpu_full/ffn_bert-base.png",
                 "gpu-nvidia-h200_full_ffn.json", "plots/gpu-nvidia-h200_full_ffn/ffn.png",
                 "cpu_avx512/cpu_full.json"):
        assert not ignored(os.path.join("benchmarks", "results", name)), name
    for name in ("cpu_smoke.json", "plots/cpu_smoke/ffn.png", "moe_cpu/cpu_smoke.csv"):
        assert ignored(os.path.join("benchmarks", "results", name)), name


def test_the_report_ends_with_where_the_files_went(tmp_path, monkeypatch):
    """The data files one per line, the plots in one line, then the folder (relative to the
    working directory when under it); the default folder's line says it is ignored."""
    monkeypatch.chdir(tmp_path)
    plots = os.path.join("r", "plots", "cpu_quick")
    written = [str(tmp_path / "r" / "cpu_quick.json"), str(tmp_path / "r" / "cpu_quick.csv")]
    written += [str(tmp_path / plots / f"{i}.png") for i in range(3)]
    assert where_lines(written, str(tmp_path / "r")) == [
        "wrote " + os.path.join("r", "cpu_quick.json"),
        "wrote " + os.path.join("r", "cpu_quick.csv"), f"wrote 3 plots under {plots}",
        "results in r"]
    last = where_lines([], DEFAULT_RESULTS_DIR)[-1]
    assert last.startswith(f"results in {DEFAULT_RESULTS_DIR} (ignored by git;")


def test_results_files_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    """The results files' `commit` is marked "+dirty" when tracked code differs from the commit,
    not when only earlier results under benchmarks/results do (a run's own outputs)."""
    import shutil

    import report

    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(report.__file__, root / "benchmarks" / "report.py")
    (root / "benchmarks" / "results" / "cpu_quick.json").write_text("{}")
    (root / "code.py").write_text("x = 1\n")
    git = lambda *args: subprocess.run(  # noqa: E731
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
        capture_output=True, timeout=30)
    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    spec = importlib.util.spec_from_file_location("copied_report",
                                                  root / "benchmarks" / "report.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    monkeypatch.delenv("DOE_BENCH_COMMIT", raising=False)
    clean = copied._git_commit()
    assert clean and "+dirty" not in clean and clean != "unknown"
    (root / "benchmarks" / "results" / "cpu_quick.json").write_text('{"results": []}')
    assert copied._git_commit() == clean
    (root / "code.py").write_text("x = 2\n")
    assert copied._git_commit() == clean + "+dirty"


def test_options_given_on_the_command_line_are_kept_even_at_their_defaults(monkeypatch):
    """The harness lowers pytest-benchmark's max time and min rounds only when they are not
    given (on the command line or in PYTEST_ADDOPTS): `--benchmark-max-time 1.0`
    (pytest-benchmark's default value) stays."""
    from types import SimpleNamespace

    given = _bench_conftest()._given

    def config(*args):
        return SimpleNamespace(invocation_params=SimpleNamespace(args=args))

    assert given(config("benchmarks/", "--benchmark-max-time", "1.0"), "--benchmark-max-time")
    assert given(config("--benchmark-min-rounds=5"), "--benchmark-min-rounds")
    assert not given(config("benchmarks/", "--benchmark-max-time-x"), "--benchmark-max-time")
    assert not given(config("-k", "ffn"), "--benchmark-min-rounds")
    monkeypatch.setenv("PYTEST_ADDOPTS", "-q --benchmark-min-rounds 10")
    assert given(config("-k", "ffn"), "--benchmark-min-rounds")
