"""Test accuracy against pruning rate for one to four runs of unplug_and_play.py, task by task:
where each run's expert landed (pruning rate, paired change from its baseline with its standard
error), an arrow from each run's expert to the next's.

    python python/compare_runs.py BEFORE/results.json AFTER/results.json \
        --labels "v10 recipe" "defaults" --out comparison.png

A run made of several invocations (some tasks each) is given as their results files joined by
commas: `A/results.json,B/results.json`. Prints the rows side by side as a markdown table too.
"""
import argparse
import json


def load_rows(paths: str) -> dict:
    """One run's rows by task, from a results file or several joined by commas (a task in two
    of them is an error: which row is the run's would be a guess)."""
    rows = {}
    for path in paths.split(","):
        with open(path) as f:
            for row in json.load(f)["rows"]:
                if row["task"] in rows:
                    raise SystemExit(f"{row['task']!r} is in more than one of {paths}")
                rows[row["task"]] = row
    return rows


def table(runs: list, labels: list) -> str:
    """Per task, each run's baseline, expert, change (SE), pruning rate and speed-up."""
    lines = ["| task | run | baseline | expert | change (SE) | pruned | speed-up |",
             "|---|---|---|---|---|---|---|"]
    tasks = [task for task in runs[0] if all(task in run for run in runs)]
    for task in tasks:
        for run, label in zip(runs, labels):
            r = run[task]
            lines.append(f"| {task} | {label} | {r['prompt_tuned_accuracy']:.3f} | "
                         f"{r['expert_accuracy']:.3f} | {100 * r['change']:+.1f} "
                         f"({100 * r['change_se']:.1f}) | {100 * r['pruning_rate']:.1f}% | "
                         f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(runs: list, labels: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = ["o", "s", "^", "D"]
    tasks = [task for task in runs[0] if all(task in run for run in runs)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(tasks):
        points = [(100 * run[task]["pruning_rate"], 100 * run[task]["change"],
                   100 * run[task]["change_se"]) for run in runs]
        color = colors[i % len(colors)]
        for (x, y, se), marker in zip(points, markers):
            ax.errorbar(x, y, yerr=se, fmt=marker, color=color, capsize=3)
        for (x0, y0, _), (x1, y1, _) in zip(points, points[1:]):
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="->", color=color, alpha=0.6))
        ax.plot([], [], "-", color=color, label=task)
    for label, marker in zip(labels, markers):
        ax.plot([], [], marker, color="gray", label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(-1, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("pruning rate (%)")
    ax.set_ylabel("test accuracy change from baseline (points)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+",
                        help="results.json files, oldest first (a run of several: joined by "
                             "commas)")
    parser.add_argument("--labels", nargs="+", help="one per results file")
    parser.add_argument("--title", default="experts before and after")
    parser.add_argument("--out", required=True, help="the plot (.png)")
    args = parser.parse_args(argv)
    labels = args.labels or [f"run {i + 1}" for i in range(len(args.results))]
    if len(labels) != len(args.results):
        parser.error("give one label per results file")
    if len(args.results) > 4:
        parser.error("at most four runs")
    runs = [load_rows(path) for path in args.results]
    print(table(runs, labels))
    plot(runs, labels, args.out, args.title)


if __name__ == "__main__":
    main()
