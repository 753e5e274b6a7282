"""Benchmark results: collecting medians, ratios against the baselines, files, plots, summary.

Baselines, measured in the same run: `dense` (the op on the full weights) and `sliced` (the dense op
on weights sliced once ahead of time: the speed of physical structured pruning). Every other
variant is a candidate (`gather-<backend>`), reported as speed-up over dense and as time relative
to sliced. Where a benchmark records the weight bytes a call reads (the op benchmarks) and the run
measured the device's copy bandwidth (GPU runs), each candidate also gets the rate it read its
weights at and that rate as a fraction of the copy bandwidth: the memory-bandwidth bound that
decode-size calls (a few rows) are measured against.

Overheads are apart from the ratios: the cost of an optional argument (the FFNs' `scales`), as the
time of a call with it over the time of the same call without it, both timed alternately in one
benchmark.
"""
import csv
import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

BASELINES = ("dense", "sliced")
# Where a run's files go unless --results-dir says otherwise: a folder git ignores (.gitignore), so
# running the benchmarks leaves the checkout clean; the committed reference runs are in
# benchmarks/results/, written there only when asked (--results-dir benchmarks/results).
DEFAULT_RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "local")


@dataclass
class Result:
    bench: str  # e.g. "ffn"
    shape: str
    dtype: str
    device: str
    variant: str  # "dense", "sliced" or "gather-<backend>"
    prune_rate: float
    rows: int
    median_s: float
    weight_bytes: int | None = None  # weight bytes one call reads (None: not recorded)


class Recorder:
    def __init__(self):
        self.rows: list[Result] = []
        self.memory: list[dict] = []  # per variant: bytes held beyond the dense model, peak bytes
        self.overheads: list[dict] = []  # per call: an optional argument's cost (add_overhead)
        self.copy_bandwidth: float | None = None  # bytes/s of a device-to-device copy (GPU runs)
        # what the run's start decides (the commit measured, the load then, the CPU cache
        # condition): metadata's fields, read before any benchmark runs
        self.run_info: dict = {}

    def add(self, **fields):
        self.rows.append(Result(**fields))

    def add_memory(self, **fields):
        self.memory.append(fields)

    def add_overhead(self, *, without_s: float, with_s: float, **fields):
        """`fields`: bench, shape, dtype, device, variant (the call), option (the argument added),
        prune_rate, rows; the medians without and with the option, and their ratio."""
        self.overheads.append(dict(fields, without_s=without_s, with_s=with_s,
                                   ratio=with_s / without_s))

    def empty(self) -> bool:
        return not (self.rows or self.overheads)

    def ratios(self):
        """One dict per candidate measurement, with its baselines' times and the ratios."""
        times, weight_bytes = defaultdict(dict), {}
        for r in self.rows:
            key = (r.bench, r.shape, r.dtype, r.device, r.prune_rate, r.rows)
            times[key][r.variant] = r.median_s
            weight_bytes[key + (r.variant,)] = r.weight_bytes
        out = []
        for key, variants in times.items():
            bench, shape, dtype, device, prune_rate, rows = key
            for variant, seconds in variants.items():
                if variant in BASELINES:
                    continue
                dense, sliced = variants.get("dense"), variants.get("sliced")
                read = weight_bytes[key + (variant,)]
                rate = read / seconds if read is not None else None
                out.append(dict(
                    bench=bench, shape=shape, dtype=dtype, device=device, variant=variant,
                    prune_rate=prune_rate, rows=rows, median_s=seconds, dense_s=dense,
                    sliced_s=sliced,
                    speedup_vs_dense=dense / seconds if dense else None,
                    time_vs_sliced=seconds / sliced if sliced else None,
                    sliced_speedup_vs_dense=dense / sliced if dense and sliced else None,
                    weight_bytes=read, weight_GBps=rate / 1e9 if rate is not None else None,
                    of_copy_bandwidth=(rate / self.copy_bandwidth
                                       if rate is not None and self.copy_bandwidth else None),
                ))
        return out


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = _cpuinfo("model name") or platform.processor() or "cpu"
    return f"{model}, {torch.get_num_threads()} threads"


def _cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith(field)), "")
    except OSError:
        return ""


# CPU instruction sets decide which kernel paths run. Two machines labelled alike ("AMD EPYC")
# gave the C++ kernels times a factor of two apart, and bfloat16 GEMMs have native instructions
# only with avx512_bf16 or AMX: results are comparable only with these recorded.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_features() -> str:
    """torch's CPU capability and the bfloat16-relevant flags of /proc/cpuinfo, e.g.
    'AVX512; avx2 avx512f avx512_bf16'."""
    flags = set(_cpuinfo("flags").split())
    present = " ".join(flag for flag in _CPU_FLAGS if flag in flags)
    return f"{torch.backends.cpu.get_cpu_capability()}; {present}"


def _git_commit() -> str:
    """The checkout's commit (with "+dirty" for changes not committed); DOE_BENCH_COMMIT names
    it only where git cannot (a copied tree without .git): a stale value exported in a checkout
    never hides its own commit."""
    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True,  # noqa: E731
                                           cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        # "+dirty": the measured code had changes not yet committed to the tracked files (the
        # results that runs write, under benchmarks/results, are not the measured code)
        if not commit:
            return os.environ.get("DOE_BENCH_COMMIT") or "unknown"
        changed = run("status", "--porcelain", "-uno", "--", ":/",
                      ":(top,exclude)benchmarks/results")
        return commit + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):  # (no git at all)
        return os.environ.get("DOE_BENCH_COMMIT") or "unknown"


KNOB_PREFIXES = ("DOE_KERNELS_", "OMP_", "MKL_", "TRITON_")  # environment that changes the code run


def run_start(**fields) -> dict:
    """What a run records as it starts: its commit (a long run labelled by a later checkout would
    name code it did not measure), the machine's 1-minute load average and `fields`."""
    return dict(commit=_git_commit(), load_start=_load(), **fields)


def metadata(device: str, mode: str, copy_bandwidth: float | None = None,
             run_info: dict | None = None) -> dict:
    """The results files' `meta`: the machine, versions, date, commit (`run_info`'s, read at the
    run's start, else now), threads, CPU features, the environment variables that change which
    code runs (`knobs`) and the load averages at the start and end."""
    versions = {}
    for name in ("triton", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    run_info = dict(run_info or {})
    return dict(
        device=device_name(device), torch=torch.__version__, **versions,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=run_info.pop("commit", None) or _git_commit(), mode=mode,
        python=platform.python_version(), cpu_threads=torch.get_num_threads(),
        cpu_features=cpu_features(),
        copy_GBps=round(copy_bandwidth / 1e9, 1) if copy_bandwidth else None,
        knobs={key: value for key, value in sorted(os.environ.items())
               if key.startswith(KNOB_PREFIXES)},
        **run_info, load_end=_load(),
    )


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def write_results(recorder: Recorder, results_dir: str, mode: str) -> list[str]:
    """Write <device>_<mode>.json/.csv and the speed-up plots; returns the paths written."""
    device = recorder.rows[0].device if recorder.rows else recorder.overheads[0]["device"]
    meta = metadata(device, mode, recorder.copy_bandwidth, recorder.run_info)
    stem = f"{'gpu-' + _slug(meta['device']) if device.startswith('cuda') else 'cpu'}_{mode}"
    os.makedirs(results_dir, exist_ok=True)
    ratios = recorder.ratios()
    json_path = os.path.join(results_dir, stem + ".json")
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, results=[asdict(r) for r in recorder.rows], ratios=ratios,
                       memory=recorder.memory, overheads=recorder.overheads), f, indent=1)
    csv_path = os.path.join(results_dir, stem + ".csv")
    # the metadata's `device` (the machine) as `machine`: each row has its own (cpu, cuda)
    machine = {("machine" if key == "device" else key): json.dumps(value) if isinstance(
        value, dict) else value for key, value in meta.items()}
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(machine) + (list(ratios[0]) if ratios else []))
        writer.writeheader()
        for row in ratios:
            writer.writerow({**machine, **row})
    return [json_path, csv_path] + plot(ratios, meta, os.path.join(results_dir, "plots", stem))


def plot(ratios, meta, plot_dir) -> list[str]:
    """Speed-up over dense against pruning rate: one plot per bench, shape, dtype and backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = defaultdict(list)
    for r in ratios:
        groups[(r["bench"], r["shape"], r["dtype"], r["variant"])].append(r)
    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    for (bench, shape, dtype, variant), items in sorted(groups.items()):
        if len({r["prune_rate"] for r in items}) < 2 or variant.startswith("hf-"):
            continue  # a curve needs two pruning rates; transformers' own runs do not prune
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, rows in enumerate(sorted({r["rows"] for r in items})):
            line = sorted((r for r in items if r["rows"] == rows), key=lambda r: r["prune_rate"])
            rates = [100 * r["prune_rate"] for r in line]
            color = f"C{i}"
            unit = "tokens" if bench == "model" else "rows"  # model: tokens per call
            ax.plot(rates, [r["speedup_vs_dense"] for r in line], "o-", color=color,
                    label=f"{rows} {unit}")
            ax.plot(rates, [r["sliced_speedup_vs_dense"] for r in line], ":", color=color)
        if bench != "moe":  # dropping MoE experts leaves each token's top-k work as it was
            top = max(r["prune_rate"] for r in items)
            ideal = [p / 100 for p in range(0, round(100 * top) + 1, 5)]
            ax.plot([100 * p for p in ideal], [1 / (1 - p) for p in ideal], "k--", lw=0.8,
                    label="ideal 1/(1-p)")
        ax.set_xlabel("pruning rate (%)")
        ax.set_ylabel("speed-up over dense")
        ax.set_title(f"{bench} {shape} {dtype} {variant}\n{meta['device']}", fontsize=9)
        ax.grid(alpha=0.3)
        solid = {"model": "patched model", "moe": variant, "train": variant}.get(bench, "gather")
        ax.legend(fontsize=7, title=f"solid: {solid}, dotted: pre-sliced", title_fontsize=7)
        fig.tight_layout()
        path = os.path.join(plot_dir, f"{bench}_{_slug(shape)}_{dtype}_{variant}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def summary_lines(recorder: Recorder) -> list[str]:
    ratios = recorder.ratios()
    # Columns as wide as their longest entry (bench names such as "attention", model shapes).
    named = ratios + recorder.overheads
    wb = max([6] + [len(r["bench"]) for r in named])
    ws = max([20] + [len(r["shape"]) for r in named])
    wv = max([14] + [len(r["variant"]) for r in named])
    # "% copy bw": the weights' read rate against the copy bandwidth, for calls of at most 16 rows.
    bandwidth = recorder.copy_bandwidth is not None
    header = (f"{'bench':<{wb}} {'shape':<{ws}} {'dtype':<9} {'variant':<{wv}} {'prune':>5} "
              f"{'rows':>5} {'x dense':>8} {'/ sliced':>8} {'median ms':>10}"
              + (f" {'% copy bw':>9}" if bandwidth else ""))
    lines = [header, "-" * len(header)] if ratios else []
    for r in sorted(ratios, key=lambda r: (r["bench"], r["shape"], r["dtype"], r["variant"],
                                           r["prune_rate"], r["rows"])):
        fmt = lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8}"  # noqa: E731
        line = (f"{r['bench']:<{wb}} {r['shape']:<{ws}} {r['dtype']:<9} {r['variant']:<{wv}} "
                f"{100 * r['prune_rate']:5.0f} {r['rows']:5d} {fmt(r['speedup_vs_dense'])} "
                f"{fmt(r['time_vs_sliced'])} {1e3 * r['median_s']:10.3f}")
        if bandwidth:
            share = r["of_copy_bandwidth"]
            line += (f" {100 * share:9.0f}" if share is not None and r["rows"] <= 16
                     else f" {'-':>9}")
        lines.append(line)
    if bandwidth:
        lines.append(f"copy bandwidth (read + written): {recorder.copy_bandwidth / 1e9:.0f} GB/s")
    if recorder.memory:
        lines += ["", "memory (MiB): weights held beyond the dense model; peak allocated in one "
                  "call (GPU only)"]
        mib = lambda v: f"{v / 2**20:10.1f}" if v is not None else f"{'-':>10}"  # noqa: E731
        for m in recorder.memory:
            lines.append(f"{m['bench']:<{wb}} {m['shape']:<{ws}} {m['variant']:<{wv}} "
                         f"{100 * m['prune_rate']:5.0f} {m['rows']:5d} "
                         f"{mib(m['extra_weight_bytes'])} {mib(m['peak_bytes'])}")
    if recorder.overheads:
        lines += ["", "overheads: median time with the option / without it (the same call, timed "
                  "alternately)",
                  f"{'bench':<{wb}} {'shape':<{ws}} {'dtype':<9} {'variant':<{wv}} {'option':<8} "
                  f"{'prune':>5} {'rows':>5} {'ratio':>6} {'without ms':>10} {'with ms':>10}"]
        for o in sorted(recorder.overheads, key=lambda o: (o["bench"], o["shape"], o["dtype"],
                                                           o["variant"], o["option"],
                                                           o["prune_rate"], o["rows"])):
            lines.append(f"{o['bench']:<{wb}} {o['shape']:<{ws}} {o['dtype']:<9} "
                         f"{o['variant']:<{wv}} {o['option']:<8} {100 * o['prune_rate']:5.0f} "
                         f"{o['rows']:5d} {o['ratio']:6.3f} {1e3 * o['without_s']:10.3f} "
                         f"{1e3 * o['with_s']:10.3f}")
    return lines


def where_lines(paths: list[str], results_dir: str) -> list[str]:
    """The end of the report: a line per data file written, one for the plots, and the folder."""
    plots = [path for path in paths if path.endswith(".png")]
    lines = [f"wrote {_shown(path)}" for path in paths if not path.endswith(".png")]
    if plots:
        lines.append(f"wrote {len(plots)} plots under {_shown(os.path.dirname(plots[0]))}")
    where = f"results in {_shown(results_dir)}"
    if os.path.realpath(results_dir) == os.path.realpath(DEFAULT_RESULTS_DIR):
        where += (" (ignored by git; --results-dir benchmarks/results writes the committed "
                  "reference files)")
    return lines + [where]


def _shown(path: str) -> str:
    """`path` relative to the working directory when it lies under it, else as given."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
