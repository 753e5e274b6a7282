"""Build of doe_kernels._C, the compiled kernels, with torch.utils.cpp_extension and ninja.

The C++ CPU kernels are always built. The CUDA kernels are built too when the installed torch has
CUDA and nvcc is found. Knobs (environment variables, no hardware probing):
  DOE_KERNELS_NO_EXT=1        pure-Python install (the ops use the torch and triton backends)
  DOE_KERNELS_NO_CUDA=1       build the CPU kernels only
  DOE_KERNELS_CUDA_ARCHS      semicolon-separated compute capabilities, default "8.0;9.0+PTX"
                              (+PTX: code newer GPUs compile when they load it)
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("DOE_KERNELS_NO_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch builds with
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("DOE_KERNELS_NO_CUDA")
    )
    if with_cuda:
        archs = os.environ.get("DOE_KERNELS_CUDA_ARCHS", "8.0;9.0+PTX")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT)) + sorted(
            glob.glob("csrc/cuda/*.cpp", root_dir=ROOT)
        )
        ext = cpp_extension.CUDAExtension(
            "doe_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("DOE_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "doe_kernels._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
