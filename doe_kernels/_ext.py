"""Loads the compiled extension doe_kernels._C once, and warns once if it is missing or broken.

`import doe_kernels` never fails because of the extension: `extension()` returns None when it
cannot be loaded, and the backends that need it report themselves unavailable.
"""
import functools
import os
import warnings


@functools.lru_cache(maxsize=None)
def extension():
    """The doe_kernels._C module, or None (with one warning) when it cannot be loaded."""
    if os.environ.get("DOE_KERNELS_NO_EXT", "0") == "1":
        return None
    try:
        from doe_kernels import _C
    except ImportError as error:
        warnings.warn(
            f"doe_kernels: the compiled extension could not be loaded ({error}); the 'cpu' and "
            "'cuda' backends are unavailable and the ops fall back to 'triton' or 'torch'. "
            "Reinstall with `pip install --no-build-isolation -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


def has_cuda_kernels() -> bool:
    ext = extension()
    return ext is not None and ext.has_cuda()
