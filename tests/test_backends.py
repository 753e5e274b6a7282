"""Backend choice: the `auto` rule, and importing without the compiled extension."""
import contextlib
import subprocess
import sys
import warnings

import pytest
import torch

import doe_kernels as dk
from doe_kernels import backends
from doe_kernels._ext import extension


def test_auto_on_cpu_prefers_the_cpp_kernels():
    expected = "cpu" if extension() is not None else "torch"
    for rows in (1, 16, 17, 4096):
        assert backends.resolve("auto", torch.device("cpu"), torch.float32, rows) == expected
    # float16 is not taken by the C++ kernels: auto falls through to torch.
    assert backends.resolve("auto", torch.device("cpu"), torch.float16, 1) == "torch"


def test_auto_never_picks_the_interpreter():
    for rows in (1, 4096):
        assert backends.resolve("auto", torch.device("cpu"), torch.float32, rows) != "triton"


def test_auto_calls_match_torch():
    x, w, wt = torch.randn(5, 40), torch.randn(37, 40), torch.randn(37, 40)
    kept = torch.tensor([0, 4, 36])
    torch.testing.assert_close(dk.gather_ffn(x, w, None, wt, None, kept),
                               dk.gather_ffn(x, w, None, wt, None, kept, backend="torch"))


def test_explicit_request_for_an_unsupported_dtype_is_an_error():
    if extension() is None:
        pytest.skip("the cpu backend is not built")
    x = torch.randn(2, 40, dtype=torch.float16)
    w = torch.randn(37, 40, dtype=torch.float16)
    with pytest.raises(dk.BackendUnavailableError, match="does not support torch.float16"):
        dk.gather_ffn(x, w, None, w, None, torch.tensor([1]), backend="cpu")


def _run_python(code):
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, timeout=300)


def test_import_without_extension_warns_once_and_falls_back():
    code = (
        "import sys; sys.modules['doe_kernels._C'] = None\n"  # makes `from doe_kernels import _C` fail
        "import torch, doe_kernels as dk\n"
        "print(dk.available_backends('cpu'))\n"
        "x, w = torch.randn(2, 8), torch.randn(5, 8)\n"
        "dk.gather_ffn(x, w, None, w, None, torch.tensor([1, 2]))\n"
        "dk.gather_ffn(x, w, None, w, None, torch.tensor([1, 2]))\n"
        "try:\n    dk.gather_ffn(x, w, None, w, None, torch.tensor([1]), backend='cpu')\n"
        "except dk.BackendUnavailableError as e:\n    print('error:', e)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "'cpu'" not in result.stdout.splitlines()[0]
    assert "error: backend 'cpu' is not available" in result.stdout
    assert result.stderr.count("compiled extension could not be loaded") == 1, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_backends_are_built():
    """On a GPU machine, an install with the extension offers the cuda and triton backends."""
    present = dk.available_backends("cuda")
    assert "triton" in present, present
    assert "cuda" in present, f"{present}: the extension was built without CUDA"
    assert backends.resolve("auto", torch.device("cuda"), torch.bfloat16, 1) == "cuda"
    assert backends.resolve("auto", torch.device("cuda"), torch.bfloat16, 4096) == "triton"


def stand_in_gpus(monkeypatch, runs_on):
    """CUDA GPUs (compute capability 12.0, RTX PRO 6000) and an extension whose kernels run on
    those `runs_on(index)` says, for the cuda backend's probe; the probe's cache cleared."""
    from types import SimpleNamespace

    from doe_kernels.backends import cuda

    ext = SimpleNamespace(has_cuda=lambda: True, cuda_kernels_run_on=runs_on)
    monkeypatch.setattr(cuda, "extension", lambda: ext)
    monkeypatch.setattr(cuda, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA RTX PRO 6000")
    cuda._runs_on.cache_clear()
    return ext


def test_cuda_kernels_built_for_other_gpus_leave_the_backend_off_with_a_warning(monkeypatch):
    """A GPU the build holds no code for (here one the probe refuses): the cuda backend is off
    its list, `auto` picks another, with one warning naming the GPU and the knob to rebuild."""
    from doe_kernels.backends import cuda

    probed = []
    ext = stand_in_gpus(monkeypatch, lambda device: probed.append(device) or False)
    try:
        with pytest.warns(RuntimeWarning, match=r"RTX PRO 6000 \(compute capability 12\.0\)"
                          r".*DOE_KERNELS_CUDA_ARCHS=\"12\.0\""):
            assert not cuda.available("cuda")
        assert not cuda.available("cuda") and probed == [0]  # probed and warned once
        ext.cuda_kernels_run_on = lambda device: True
        cuda._runs_on.cache_clear()
        assert cuda.available("cuda") and not cuda.available("cpu")
    finally:
        cuda._runs_on.cache_clear()


def test_the_probe_of_another_gpu_runs_under_torchs_guard(monkeypatch):
    """The extension's probe of a GPU that is not the current one runs with that GPU made
    current by torch's guard (the extension's own, restoring the current GPU with cudaSetDevice,
    would create a context there if it had none)."""
    from doe_kernels.backends import cuda

    entered = []
    stand_in_gpus(monkeypatch, lambda device: entered.append(("probe", device)) or True)

    @contextlib.contextmanager
    def guard(device):
        entered.append(("guard", torch.device(device).index))
        yield

    monkeypatch.setattr(torch.cuda, "device", guard)
    try:
        assert cuda._runs_on(1) and cuda._runs_on(0)
        assert entered == [("guard", 1), ("probe", 1), ("probe", 0)]  # (0 is current)
    finally:
        cuda._runs_on.cache_clear()


def test_auto_probes_the_gpu_a_tensor_is_on(monkeypatch):
    """On a machine whose extension runs on its first GPU only, a call on the second GPU gets no
    `cuda` backend (`auto` falls through, an explicit request is refused, naming what that GPU
    has), and a call on the first gets it, whichever GPU is the current one."""
    from doe_kernels import backends
    from doe_kernels.backends import cuda

    stand_in_gpus(monkeypatch, lambda device: device == 0)
    try:
        first, second = torch.device("cuda", 0), torch.device("cuda", 1)
        assert backends.resolve("auto", first, torch.bfloat16, 1) == "cuda"
        assert backends.resolve("cuda", torch.device("cuda"), torch.bfloat16, 1) == "cuda"
        with pytest.warns(RuntimeWarning, match="RTX PRO 6000"):
            assert backends.resolve("auto", second, torch.bfloat16, 1) != "cuda"
        with pytest.raises(backends.BackendUnavailableError, match="'cuda' is not available") \
                as refused:
            backends.resolve("cuda", second, torch.bfloat16, 1)
        assert "'torch'" in str(refused.value).split("available:")[1]
        assert "'cuda'" not in str(refused.value).split("available:")[1]
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        assert backends.resolve("auto", first, torch.bfloat16, 1) == "cuda"
    finally:
        cuda._runs_on.cache_clear()


@pytest.mark.parametrize("name, value, good", [
    ("DOE_KERNELS_CPU_ISA", "avx2", True), ("DOE_KERNELS_CPU_ISA", "AVX2", False),
    ("DOE_KERNELS_CPU_ISA", "", True), ("DOE_KERNELS_CPU_GATHER_ABOVE", "64", True),
    ("DOE_KERNELS_CPU_GATHER_ABOVE", "-1", True), ("DOE_KERNELS_CPU_GATHER_ABOVE", "", True),
    ("DOE_KERNELS_CPU_GATHER_ABOVE", "abc", False), ("DOE_KERNELS_CPU_GATHER_ABOVE", "-2", False),
    ("DOE_KERNELS_CPU_GATHER_ABOVE", "1e3", False),
    ("DOE_KERNELS_CPU_GATHER_ABOVE", "1_000", False)])  # int() reads it, atoll does not
def test_cpu_knobs_the_kernels_would_misread_are_refused(monkeypatch, name, value, good):
    """The C++ reads an unknown ISA as no cap and a non-number as 0 rows (gather + GEMM for
    every call): refused by name before the extension loads."""
    from doe_kernels import _ext

    monkeypatch.setenv(name, value)
    if good:
        _ext.check_cpu_knobs()
    else:
        with pytest.raises(ValueError, match=name):
            _ext.check_cpu_knobs()


def test_triton_on_the_cpu_needs_an_interpreter_that_runs_the_kernels(monkeypatch):
    """A Triton whose interpreter cannot run the kernels' loops (3.6 with numpy 2.4 or later) leaves
    the backend off the CPU's list, with one warning that says why."""
    from doe_kernels.backends import triton as triton_backend

    def broken_probe(*args):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend._kernels(), "interpreter_probe_kernel", {(1,): broken_probe})
    triton_backend._interpreter_runs.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="triton backend is unavailable on the CPU.*"
                                                "only 0-dimensional arrays"):
            assert "triton" not in dk.available_backends("cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the answer is kept: no second warning
            assert "triton" not in dk.available_backends("cpu")
    finally:
        monkeypatch.undo()
        triton_backend._interpreter_runs.cache_clear()


def test_activation_codes_agree_with_the_compiled_kernels():
    """One table of activations (doe_kernels/activations.py); the C++/CUDA enum mirrors it."""
    import pathlib
    import re

    from doe_kernels.activations import ACTIVATION_CODES

    header = (pathlib.Path(__file__).resolve().parent.parent / "csrc" / "doe_kernels.h").read_text()
    enum = re.search(r"enum Activation : int64_t \{(.*?)\};", header, re.S).group(1)
    codes = [int(code) for code in re.findall(r"k\w+ = (\d+)", enum)]
    assert codes == sorted(ACTIVATION_CODES.values())
    assert list(ACTIVATION_CODES) == ["identity", "gelu", "gelu_tanh", "relu"]  # enum order


@pytest.mark.parametrize("limit, arch", [(227 * 1024, 90), (163 * 1024, 80), (99 * 1024, 86)],
                         ids=["h100", "a100", "sm86"])
@pytest.mark.parametrize("weights", [1, 2])
@pytest.mark.parametrize("element_size", [2, 4])
def test_triton_launch_configs_fit_shared_memory(weights, element_size, limit, arch):
    """On an H100, an A100 and a 99 KiB card, the fixed launch of every row regime fits the
    device's shared memory (float32 SwiGLU drops pipeline stages), and for every row regime the
    autotuner keeps configs that fit, none of them twice (an A100 fitted no float32 SwiGLU
    config at 16 rows: they were dropped, then all tried, and every one failed to launch; the
    float32 128 x 256 output tile fits no 99 KiB card)."""
    pytest.importorskip("triton")
    from doe_kernels.backends.triton import kernels as k

    limit -= k._SMEM_MARGIN  # the device's shared memory per block, less the margin kept
    assert k.smem_limit(torch.device("cpu")) == k.SMEM_LIMITS[90] == 227 * 1024 - k._SMEM_MARGIN
    assert k.device_arch(torch.device("cpu")) == 90
    configs = k.SWIGLU_CONFIGS if weights == 2 else k.MATMUL_CONFIGS
    prune = k._make_prune(weights, "x", limit, arch)["early_config_prune"]

    def smem(meta, stages):
        return k.smem_bytes(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], stages, weights,
                            element_size, arch)

    for rows in (1, 16, 17, 64, 128, 129, 4096):
        meta = k.fixed_launch(rows, weights, element_size, limit, arch)
        assert smem(meta, meta["num_stages"]) <= limit
        x = torch.empty(0, dtype=torch.float32 if element_size == 4 else torch.bfloat16)
        kept = prune(configs, {"M_BUCKET": k.m_bucket(rows), "x": x})
        assert kept and all(smem(c.kwargs, c.num_stages) <= limit for c in kept), rows
        assert all(c.kwargs["BLOCK_M"] <= max(16, k.m_bucket(rows)) for c in kept), rows
        shapes = [(sorted(c.kwargs.items()), c.num_warps, c.num_stages) for c in kept]
        assert len(shapes) == len({repr(shape) for shape in shapes}), rows


def test_triton_shared_memory_estimate_follows_the_compiler():
    """kernels.smem_bytes against what ptxas gave (.ci/compile_triton.py checks every launch):
    the pipeliner's num_stages - 1 operand buffers; num_stages where sm_90 runs the dot as a
    wgmma (16-bit tiles of at least 64 rows); at least the float32 output tile."""
    pytest.importorskip("triton")
    from doe_kernels.backends.triton import kernels as k

    assert k.smem_bytes(16, 64, 128, 4, 2, 4, arch=90) == 221_184  # float32 SwiGLU, sm_90
    assert k.smem_bytes(64, 64, 64, 4, 1, 2, arch=90) == 65_536  # bfloat16 wgmma, sm_90
    assert k.smem_bytes(64, 64, 64, 4, 1, 2, arch=80) == 49_152  # the same on sm_80
    assert k.smem_bytes(128, 64, 64, 3, 2, 2, arch=90) == 98_304
    assert k.smem_bytes(128, 256, 64, 2, 1, 4, arch=80) == 131_072  # the float32 output tile
    assert k.smem_bytes(128, 256, 64, 2, 1, 2, arch=80) == 49_152  # (none in bfloat16)
    assert k.fixed_launch(64, 1, 2, 99 * 1024 - k._SMEM_MARGIN, 86)["num_stages"] == 4
    assert k.fixed_launch(64, 1, 2, 60 * 1024, 90)["num_stages"] == 3  # (4 need 64 KiB there)


def test_triton_autotuners_are_per_kind_of_gpu(monkeypatch):
    """Triton's autotuner caches a key's best config without the device, and the configs it may
    try depend on the device's shared memory: each kind of GPU (shared memory, compute
    capability) gets its own autotuner, pruned for it; one kind shares one."""
    pytest.importorskip("triton")
    from doe_kernels.backends.triton import kernels as k

    monkeypatch.setattr(k, "_TUNED", {})
    monkeypatch.setattr(k, "_TUNED_ON", {})
    kinds = {0: (227 * 1024, 90), 1: (99 * 1024, 89), 2: (227 * 1024, 90)}
    monkeypatch.setattr(k, "smem_limit", lambda device: kinds[device.index][0])
    monkeypatch.setattr(k, "device_arch", lambda device: kinds[device.index][1])
    gpu = [torch.device("cuda", index) for index in kinds]
    big, small = k.tuned("gather_swiglu", gpu[0]), k.tuned("gather_swiglu", gpu[1])
    assert big is not small and k.tuned("gather_swiglu", gpu[2]) is big
    assert k.tuned("gather_rows_linear", gpu[0]) is not big
    assert k.tuned("gather_swiglu", gpu[1]) is small  # (looked up by device from here on)
    assert k._TUNED_ON[("gather_swiglu", 1)] is small
    assert big.doe_lock is not small.doe_lock  # (each launches one thread at a time)
    x = torch.empty(0, dtype=torch.float32)
    fits = {}
    for tuner, (limit, arch) in ((big, kinds[0]), (small, kinds[1])):
        pruned = tuner.early_config_prune(k.SWIGLU_CONFIGS, {"M_BUCKET": 16, "x_ptr": x})
        fits[limit] = [k.smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                    c.num_stages, 2, 4, arch) for c in pruned]
        assert max(fits[limit]) <= limit
    assert max(fits[227 * 1024]) > 99 * 1024  # (the H100's would not launch on the small card)


def test_has_tuned_reads_the_key_as_tritons_autotuner_makes_it(monkeypatch):
    """`has_tuned` (whether a launch would autotune, which a CUDA graph's capture cannot) finds
    the key the installed Triton's own Autotuner stored: the key arguments, then every tensor
    argument's dtype. Run through the real Autotuner with its timing and launch stood in."""
    pytest.importorskip("triton")
    from doe_kernels.backends.triton import kernels as k

    monkeypatch.setattr(k, "_TUNED", {})
    monkeypatch.setattr(k, "_TUNED_ON", {})
    tuner = k.tuned("gather_rows_linear", torch.device("cpu"))
    monkeypatch.setattr(tuner, "_bench", lambda *args, config, **kwargs: [
        float(config.kwargs["BLOCK_N"])] * 3)
    launched = []
    monkeypatch.setattr(tuner.fn, "run", lambda *args, **kwargs: launched.append(kwargs))

    def launch(rows, dtype, bucket_of=k.m_bucket):
        x = torch.zeros(rows, 32, dtype=dtype)
        weight, index = torch.zeros(48, 32, dtype=dtype), torch.arange(5)
        out = torch.empty(rows, 5, dtype=dtype)
        args = (x, weight, x, index, out, rows, 5, 32, 48, 32, 32, 5, bucket_of(rows),
                k.kept_bucket(5))
        return args, dict(HAS_BIAS=False, ACTIVATION=0, F32_DOT=dtype == torch.float32)

    args, constants = launch(3, torch.float32)
    assert not k.has_tuned(tuner, args, constants)
    tuner[(1,)](*args, **constants)
    assert launched and launched[-1]["BLOCK_N"] == 64  # (the fastest, stood-in)
    assert k.has_tuned(tuner, args, constants)
    assert k.has_tuned(tuner, *launch(9, torch.float32))  # the same row bucket
    assert not k.has_tuned(tuner, *launch(40, torch.float32))  # another bucket
    assert not k.has_tuned(tuner, *launch(3, torch.bfloat16))  # another dtype


def test_a_triton_launch_inside_a_capture_never_autotunes(monkeypatch):
    """While a CUDA graph is captured a launch whose key was never tuned runs the fixed
    configuration (tuning synchronizes the device, which breaks a capture); a tuned key, or a
    launch outside a capture, runs the autotuner; with autotuning off, the fixed one. Stand-in
    kernels and capture state: the decision alone."""
    pytest.importorskip("triton")
    import doe_kernels.backends.triton as backend
    from doe_kernels.backends.triton import kernels as k

    class Kernel:
        def __init__(self, name):
            self.name, self.locked = name, False
            if name == "tuned":  # (the autotuner's lock, held through its launch)
                self.doe_lock = contextlib.contextmanager(self._locking)()

        def _locking(self):
            self.locked = True
            yield
            self.locked = False

        def __getitem__(self, grid):
            return lambda *args, **kwargs: ran.append((self.name, kwargs, self.locked))

    ran, tuned_keys = [], set()
    monkeypatch.setattr(k, "INTERPRET", False)
    monkeypatch.setattr(k, "tuned", lambda name, device: Kernel("tuned"))  # (a new lock a call)
    monkeypatch.setattr(k, "gather_swiglu_kernel", Kernel("fixed"))
    monkeypatch.setattr(k, "has_tuned", lambda tuner, args, constants: args[5] in tuned_keys)
    x = torch.zeros(3, 8)
    cases = ((False, False, "1", "tuned"), (True, False, "1", "fixed"), (True, True, "1", "tuned"),
             (False, False, "0", "fixed"))
    for capture, tuned, autotune, want in cases:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing",
                            lambda capture=capture: capture)
        monkeypatch.setenv("DOE_KERNELS_TRITON_AUTOTUNE", autotune)
        tuned_keys = {3} if tuned else set()
        ran.clear()
        backend._launch(k, "gather_swiglu", x, 3, 4, 8, (x, x, x, x, x, 3), {"F32_DOT": True})
        assert [name for name, _, _ in ran] == [want], (capture, tuned, autotune)
        fixed = k.fixed_launch(3, 2, 4, k.smem_limit(x.device), k.device_arch(x.device))
        assert (ran[0][1] == dict(fixed, F32_DOT=True)) == (want == "fixed")
        assert ran[0][2] == (want == "tuned")


def test_backend_checks_trace_under_torch_compile_without_warnings():
    """The probes behind `available` (is Triton importable, do the CUDA kernels run on this GPU)
    trace under torch.compile, as a patched model's forward calls them, without Dynamo's warning
    on functools.lru_cache wrappers."""
    from doe_kernels.backends import cuda
    from doe_kernels.backends import triton as triton_backend

    def f(x):
        return x * (2 if triton_backend.available("cuda") or cuda.available("cuda") else 3)

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(f, fullgraph=True)(torch.ones(2))
    assert torch.equal(out, f(torch.ones(2)))
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]


def test_a_launch_makes_its_gpu_current_only_where_another_is(monkeypatch):
    """The triton and cuda backends launch under torch's device guard where the tensors' GPU is
    not the current one (Triton launches on the current device; the extension's own guard would
    create a context on the device it restores), and skip it where it is (a cost per launch).
    Stand-in tensors: no GPU is needed to name one."""
    import types

    from doe_kernels.backends.device import device_guard

    on_second = types.SimpleNamespace(device=torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert isinstance(device_guard(on_second), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = device_guard(on_second)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.ones(1)), contextlib.nullcontext)
