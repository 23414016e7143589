"""Builds unet_fast._C: C++ CPU kernels always, CUDA kernels when possible (or FORCE_CUDA=1).

Environment:
  FORCE_CUDA=1            build the CUDA sources even without a GPU; a failed .cu compile fails the build
  UNET_FAST_NO_CUDA=1     never build the CUDA sources
  TORCH_CUDA_ARCH_LIST    CUDA targets (default "8.0;9.0")
  UNET_FAST_CPU_ISA       default | avx2 | avx512 (default: avx2 when the build machine has AVX2 and FMA)
  DEBUG=1                 -O0 -g instead of -O3
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup


def locate_cuda_home():
    """torch guesses CUDA_HOME as the parent of `which nvcc`; a wrapper script on PATH (for example
    /usr/local/bin/nvcc) fools it, so prefer a toolkit that really has the runtime headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
    if guess and os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    for home in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def use_torchs_compiler():
    """Compile and link with torch's C++ compiler ($CXX, else `c++`, as its JIT builds do), not
    the one Python was built with: an image whose Python came from another GCC linked that GCC's
    libstdc++ statically into the extension, and its first TORCH_CHECK message segfaulted."""
    if os.name == "nt":
        return
    for var, default in (("CC", "cc"), ("CXX", "c++")):
        if var not in os.environ and shutil.which(default):
            os.environ[var] = default


locate_cuda_home()  # before torch.utils.cpp_extension reads it
use_torchs_compiler()  # before setuptools reads the compiler from sysconfig

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - explained to the user, not handled
    sys.exit(
        "unet_fast builds against the installed torch: `pip install torch==2.14.1` first, "
        "then `pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def flag(name):
    return os.environ.get(name, "0") == "1"


def cuda_decision():
    """(build CUDA?, why) — FORCE_CUDA wins over detection; a forced build that cannot work fails loudly."""
    if flag("UNET_FAST_NO_CUDA"):
        return False, "UNET_FAST_NO_CUDA=1"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc / CUDA_HOME not found")
    if flag("FORCE_CUDA"):
        if problems:
            sys.exit("FORCE_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        return True, "FORCE_CUDA=1"
    if problems:
        return False, "; ".join(problems)
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {cpp_extension.CUDA_HOME}"


def cpu_isa():
    """Instruction set for at::vec::Vectorized; the kernels run on the machine that built them."""
    isa = os.environ.get("UNET_FAST_CPU_ISA")
    if isa is None:
        isa = "default"
        if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
            flags = open("/proc/cpuinfo").read()
            if " avx2" in flags and " fma" in flags:
                isa = "avx2"
    return isa, {
        "default": [],
        "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
        "avx512": [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ],
    }[isa]


def nvidia_wheel_includes():
    """CUDA library headers shipped in torch's nvidia-* wheels, for toolkits that lack them."""
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cudnn/include", "nvidia/cu12/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def extensions():
    with_cuda, why = cuda_decision()
    isa, isa_flags = cpu_isa()
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    std = ["-std=c++20"]  # explicit: older torch would otherwise pass -std=c++17
    cxx = opt + std + ["-fopenmp", "-fdiagnostics-color=always"] + isa_flags
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + std + ["--expt-relaxed-constexpr", "-lineinfo"]
        include_dirs += nvidia_wheel_includes()
        ext_cls = cpp_extension.CUDAExtension
    print("unet_fast build configuration:", flush=True)
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CPU kernels: on, ISA {isa}, {'debug -O0 -g' if DEBUG else '-O3'}, OpenMP")
    print(
        f"  CUDA kernels: {'on' if with_cuda else 'off'} ({why})"
        + (f", archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "")
    )
    return [
        ext_cls(
            "unet_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=[("UNET_FAST_WITH_CUDA", "1" if with_cuda else "0")],
        )
    ]


setup(
    packages=find_packages(include=["unet_fast", "unet_fast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
