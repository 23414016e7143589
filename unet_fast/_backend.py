"""Which kernels exist and which backend a call uses.

A backend is chosen per call: the explicit `backend=` argument, else the UNET_FAST_BACKEND
environment variable, else the fastest one built for the tensor's device. Asking for a backend
that cannot run raises; nothing falls back silently.
"""

import importlib.util
import os
import warnings

import torch

NAMES = ("auto", "cpu", "cuda", "triton", "reference")
# Public op -> the device kernels it needs (the rest of each op is device-generic composition).
REQUIRES = {
    "crop_concat": ("crop_concat", "crop_concat_backward"),
    "conv_bn_relu": (
        "batch_norm_relu",
        "batch_norm_relu_backward",
        "batch_norm_relu_apply",
        "conv_bn_relu",
        "double_conv",
    ),
    "conv_bias_relu": ("conv_bias_relu",),
    # the UNet's pooling and decoder join rebuilding a double conv's output (ops.recompute)
    "recompute": ("batch_norm_relu_max_pool_backward", "batch_norm_relu_concat"),
    "norm_act": ("norm_act", "norm_act_", "norm_act_apply", "norm_act_backward"),
    "up_conv": ("up_conv_backward",),
}

try:
    from . import _C  # loading the library registers the C++/CUDA kernels

    EXTENSION_ERROR = None
except ImportError as error:  # a source checkout that was never built, or a broken build
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"unet_fast._C is not available ({EXTENSION_ERROR}); every op runs the "
        "pure-PyTorch reference. Build with `pip install --no-build-isolation .`.",
        stacklevel=2,
    )


_CACHE_MIB = os.environ.get("UNET_FAST_CPU_CACHE_MIB", "1024")
if not _CACHE_MIB.isdigit():
    raise ValueError(
        "UNET_FAST_CPU_CACHE_MIB must be a whole number of MiB (0 turns the CPU buffer cache off), "
        f"got {_CACHE_MIB!r}"
    )
if EXTENSION_ERROR is None:
    _C.cpu_cache_reset(int(_CACHE_MIB) << 20)
# The bfloat16 Winograd kernel's matrix products need AVX512-BF16.
BF16_GEMM = EXTENSION_ERROR is None and _C.cpu_has_bf16_gemm()


# The CPU eval path computes wide 3x3 convolutions by Winograd F(2x2, 3x3) (ops.conv_bias_relu);
# UNET_FAST_CPU_WINOGRAD=0 keeps oneDNN's direct convolution everywhere.
_WINOGRAD = os.environ.get("UNET_FAST_CPU_WINOGRAD", "1")
if _WINOGRAD not in ("0", "1"):
    raise ValueError(f"UNET_FAST_CPU_WINOGRAD must be 0 or 1, got {_WINOGRAD!r}")
CPU_WINOGRAD = _WINOGRAD == "1"


def _registered(kernel: str, device_type: str) -> bool:
    """Asks the dispatcher whether unet_fast::<kernel> has a kernel for the device's key."""
    return EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"unet_fast::{kernel}", device_type.upper()
    )


# Read once: registrations happen when _C loads, and torch.compile cannot trace the query.
BUILT = {
    device: {op for op, kernels in REQUIRES.items() if all(_registered(k, device) for k in kernels)}
    for device in ("cpu", "cuda")
}


# Kernels built but not yet checked on their device: "auto" keeps the reference there until the
# tests have passed on it; backend="cuda" runs them (the tests' cuda parameters do).
UNVERIFIED = {"cuda": {"norm_act", "up_conv"}}


def default_backend(op: str, device_type: str) -> str:
    verified = op not in UNVERIFIED.get(device_type, ())
    return device_type if op in BUILT.get(device_type, ()) and verified else "reference"


def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend that runs `op` on `device`: validates an explicit choice, resolves "auto"."""
    if torch.onnx.is_in_onnx_export():
        return "reference"  # ONNX has no unet_fast ops: export the standard graph they compute
    if backend == "auto":
        backend = os.environ.get("UNET_FAST_BACKEND", "auto")
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(NAMES)}")
    if backend == "auto":
        return default_backend(op, device.type)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend {backend!r} cannot run tensors on device {device}")
        if op not in BUILT[backend]:
            raise RuntimeError(
                f"backend {backend!r} has no {op} kernels in this build"
                + (f": {EXTENSION_ERROR}" if EXTENSION_ERROR else "")
            )
    if backend == "triton" and not triton_runs_on(device):
        raise RuntimeError(
            f"the Triton backend cannot run on {device}: "
            + (
                "triton is not installed"
                if not triton_version()
                else "it needs a CUDA GPU, or TRITON_INTERPRET=1 (set before importing unet_fast) "
                "to interpret the kernels on the CPU"
            )
        )
    return backend


def triton_runs_on(device: torch.device) -> bool:
    if not triton_version():
        return False
    return device.type == "cuda" or (
        device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    )


def triton_version():
    return importlib.util.find_spec("triton") and __import__("triton").__version__


def cpu_cache_info() -> dict | None:
    """The CPU kernels' cache of large freed buffers: the bytes it holds, its limit (the
    UNET_FAST_CPU_CACHE_MIB environment variable, default 1024) and how many large tensors it
    served from a cached buffer (hits) or from new memory (misses). None without the extension.
    """
    if EXTENSION_ERROR is not None:
        return None
    cached, limit, hits, misses = _C.cpu_cache_info()
    return {"cached_bytes": cached, "limit_bytes": limit, "hits": hits, "misses": misses}


def empty_cache(limit_bytes: int | None = None) -> None:
    """Frees the CPU kernels' cached buffers, as torch.cuda.empty_cache does CUDA's; with
    `limit_bytes`, also sets how many bytes of freed buffers it keeps from now on (0: none)."""
    if limit_bytes is not None and limit_bytes < 0:
        raise ValueError(f"empty_cache: limit_bytes must be >= 0, got {limit_bytes}")
    if EXTENSION_ERROR is None:
        _C.cpu_cache_reset(_C.cpu_cache_info()[1] if limit_bytes is None else limit_bytes)


def backends() -> dict:
    """What was built and which backend each op uses by default on each device.

    >>> unet_fast.backends()["default"]["cpu"]
    {'crop_concat': 'cpu', 'conv_bn_relu': 'cpu', 'conv_bias_relu': 'cpu', 'recompute': 'cpu',
     'norm_act': 'cpu', 'up_conv': 'cpu'}
    """
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "extension": "built" if EXTENSION_ERROR is None else f"missing ({EXTENSION_ERROR})",
        "kernels": {device: sorted(ops) for device, ops in BUILT.items()},
        "unverified": {device: sorted(ops & BUILT[device]) for device, ops in UNVERIFIED.items()},
        "triton": {
            "version": triton_version() or None,
            "cpu": triton_runs_on(torch.device("cpu")) and "interpreter",
            "cuda": bool(gpu) and triton_runs_on(torch.device("cuda")),
        },
        "gpu": gpu,
        "default": {
            "cpu": {op: default_backend(op, "cpu") for op in REQUIRES},
            "cuda": {op: default_backend(op, "cuda") for op in REQUIRES} if gpu else None,
        },
        "override": os.environ.get("UNET_FAST_BACKEND"),
        "cpu_cache": cpu_cache_info(),
        "cpu_winograd": {
            "float32": CPU_WINOGRAD and EXTENSION_ERROR is None,
            "bfloat16": CPU_WINOGRAD and BF16_GEMM,
        },
    }
