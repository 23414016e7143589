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

try:
    from . import _C  # noqa: F401  (loading the library registers the C++/CUDA kernels)

    EXTENSION_ERROR = None
except ImportError as error:  # a source checkout that was never built, or a broken build
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(f"unet_fast._C is not available ({EXTENSION_ERROR}); every op runs the "
                  "pure-PyTorch reference. Build with `pip install --no-build-isolation .`.",
                  stacklevel=2)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether unet_fast::<op> has a kernel registered for a dispatch key (asks the dispatcher)."""
    return (EXTENSION_ERROR is None
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"unet_fast::{op}", dispatch_key))


# Read once: registrations happen when _C loads, and torch.compile cannot trace the query.
BUILT = {"cpu": has_kernel("crop_concat", "CPU"), "cuda": has_kernel("crop_concat", "CUDA")}


def triton_version():
    return importlib.util.find_spec("triton") and __import__("triton").__version__


def default_backend(device_type: str) -> str:
    return device_type if BUILT.get(device_type) else "reference"


def resolve(backend: str, device: torch.device) -> str:
    """The backend that runs a call on `device`: validates an explicit choice, resolves "auto"."""
    if backend == "auto":
        backend = os.environ.get("UNET_FAST_BACKEND", "auto")
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(NAMES)}")
    if backend == "auto":
        return default_backend(device.type)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend {backend!r} cannot run tensors on device {device}")
        if not BUILT[backend]:
            raise RuntimeError(f"backend {backend!r} was not built: "
                               + (EXTENSION_ERROR or f"unet_fast._C has no {backend.upper()} kernels"))
    if backend == "triton":
        raise NotImplementedError("the Triton backend is not available in this version")
    return backend


def backends() -> dict:
    """What was built and what each device uses by default.

    >>> unet_fast.backends()["default"]["cpu"]
    'cpu'
    """
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "extension": "built" if EXTENSION_ERROR is None else f"missing ({EXTENSION_ERROR})",
        "kernels": dict(BUILT),
        "triton": triton_version() or None,
        "gpu": gpu,
        "default": {"cpu": default_backend("cpu"), "cuda": default_backend("cuda") if gpu else None},
        "override": os.environ.get("UNET_FAST_BACKEND"),
    }
