"""Builds the one compiled extension, ``fastgrad._C``, with ninja.

C++ CPU kernels (csrc/cpu/*.cpp) are always compiled; CUDA C++ kernels (csrc/cuda/*.cu) join them
only when torch itself is a CUDA build and a CUDA toolkit is found (an nvcc next to a CPU torch is
not enough: the kernels register through torch's CUDA dispatch key). ``FASTGRAD_NO_EXT=1``
installs the pure-Python package; every op then runs on its reference kernel.
"""

import glob
import os
import platform

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("FASTGRAD_NO_EXT", "0") not in ("", "0"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -ffp-contract=off: no FMA contraction, so kernels round exactly like _reference.py.
    # -fno-trapping-math -fno-math-errno (torch's own flags): let gcc if-convert and vectorize loops with
    # float compares/floor (results unchanged; only FP exception flags become unobservable).
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
    link = []
    if platform.system() == "Linux":
        # at::parallel_for is a header template over OpenMP: without -fopenmp it compiles to a serial
        # loop. The extension then links the libgomp torch itself loads (same soname), one runtime.
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # AVX2 is on every x86-64 CPU since 2013; the kernels' inner loops are written to vectorize.
        cxx += ["-mavx2", "-mf16c"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # No --use_fast_math: it makes fp32 division approximate and flushes subnormals to zero;
        # -fmad=false: no FMA contraction. Both keep the CUDA quantizer codes bitwise the reference's.
        # C++20: the standard torch 2.13 builds extensions with (its headers warn under C++17).
        nvcc = ["-O3", "-std=c++20", "-fmad=false", "-lineinfo", "-DFASTGRAD_WITH_CUDA"]
        ext = CUDAExtension(
            "fastgrad._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DFASTGRAD_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("fastgrad._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def initialize_options(self) -> None:
            super().initialize_options()
            # One build folder in the source tree (ignored by git) rather than a fresh temporary one:
            # installing again (the Quickstart's test line after its train line, or an upgrade)
            # recompiles only the sources that changed. --build-temp still overrides it.
            self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "temp")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()

setup(
    packages=[*find_packages(include=["fastgrad", "fastgrad.*"]), "fastgrad.kernels"],
    package_dir={"fastgrad.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
