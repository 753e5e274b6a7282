"""python/host_overhead.py on the CPU: every variant present is timed and profiled, and the files
are written (on a GPU it adds the triton variants and device times)."""
import json
import os
import re
import sys

import pytest

import doe_kernels as dk

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import host_overhead  # noqa: E402

SHAPES = ["all-MiniLM-L6-v2", "SmolLM2-135M"]


def test_every_variant_is_timed_and_the_slowest_profiled(tmp_path):
    """Per shape a row per variant, and one profile, headed by the shape and the variant of the
    largest host time in the JSON."""
    host_overhead.main(["--out", str(tmp_path), "--shapes", ",".join(SHAPES),
                        "--device", "cpu", "--dtype", "float32", "--calls", "3", "--rounds", "2"])
    results = json.loads((tmp_path / "host_overhead.json").read_text())["results"]
    variants = ["dense"] + [f"{kind}-{b}" for b in dk.available_backends("cpu") if b != "triton"
                            for kind in ("gather", "kernels")]
    profile = (tmp_path / "host_overhead_profile.txt").read_text()
    profiled = re.findall(r"^== (.+), (\S+): 3 calls$", profile, flags=re.MULTILINE)
    assert profile.count("== ") == 2 and [shape for shape, _ in profiled] == list(SHAPES)
    for shape, variant in profiled:
        timed = {r["variant"]: r for r in results if r["shape"] == shape}
        assert sorted(timed) == sorted(variants)
        assert all(r["host_us"] > 0 and r["rows"] == 1 for r in timed.values())
        assert variant == max(timed, key=lambda v: timed[v]["host_us"]), shape  # the slowest


def test_unknown_shapes_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit):
        host_overhead.main(["--out", str(tmp_path), "--shapes", "gpt-9"])
    assert not os.listdir(tmp_path)
