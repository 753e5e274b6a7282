"""Loads the compiled extension doe_kernels._C once, and warns once if it is missing or broken.

`import doe_kernels` never fails because of the extension: `extension()` returns None when it
cannot be loaded, and the backends that need it report themselves unavailable. The CPU kernels'
knobs, environment variables the C++ reads once, are checked here: a value it would misread
raises ValueError.
"""
import os
import re
import warnings


CPU_ISAS = ("generic", "avx2", "avx512")  # DOE_KERNELS_CPU_ISA: the highest the kernels may use


_LOADED: list = []  # [the extension module, or None], once loaded (a plain list, not an lru_cache:
# torch.compile traces calls to extension() in a patched model's forward, and warns on lru_caches)


def extension():
    """The doe_kernels._C module, or None (with one warning) when it cannot be loaded."""
    if not _LOADED:
        _LOADED.append(_load())
    return _LOADED[0]


def _load():
    if os.environ.get("DOE_KERNELS_NO_EXT", "0") == "1":
        return None
    check_cpu_knobs()
    try:
        from doe_kernels import _C
    except ImportError as error:
        warnings.warn(
            f"doe_kernels: the compiled extension could not be loaded ({error}); the 'cpu' and "
            "'cuda' backends are unavailable and the ops fall back to 'triton' or 'torch'. "
            "Reinstall with `pip install --no-build-isolation -e .` to build it.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return _C


def check_cpu_knobs() -> None:
    """ValueError for a DOE_KERNELS_CPU_ISA or DOE_KERNELS_CPU_GATHER_ABOVE the C++ would misread
    (an unknown ISA as no cap, a non-number as 0: gather + GEMM everywhere)."""
    isa = os.environ.get("DOE_KERNELS_CPU_ISA")
    if isa and isa not in CPU_ISAS:  # (empty: unset, as the C++ reads it)
        raise ValueError(f"DOE_KERNELS_CPU_ISA must be one of {CPU_ISAS}, got {isa!r}")
    above = os.environ.get("DOE_KERNELS_CPU_GATHER_ABOVE", "")
    if above and not (re.fullmatch(r"\s*-?[0-9]+\s*", above) and int(above) >= -1):  # as atoll
        raise ValueError("DOE_KERNELS_CPU_GATHER_ABOVE must be a row count (-1: the CPU's own "
                         f"rule), got {above!r}")


def has_cuda_kernels() -> bool:
    ext = extension()
    return ext is not None and ext.has_cuda()
