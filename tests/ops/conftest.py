"""The `backend` fixture: every op test that takes it runs on cpu (C++), reference, triton (through
Triton's interpreter without a GPU) and cuda; what this machine cannot run is skipped, saying why."""

import pytest
import torch

from unet_fast import _backend

BACKENDS = ["cpu", "reference", "triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    name = request.param
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda: this machine has no CUDA GPU")
    if name in ("cpu", "cuda") and _backend.EXTENSION_ERROR is not None:
        pytest.skip(f"{name}: unet_fast._C is not built ({_backend.EXTENSION_ERROR})")
    if name == "triton" and not _backend.triton_runs_on(torch.device(device_of(name))):
        pytest.skip("triton: not installed, or no GPU and TRITON_INTERPRET unset")
    return name


def device_of(backend: str) -> str:
    """The device a backend's tests run on: Triton natively where a GPU exists."""
    return (
        "cuda"
        if backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
        else "cpu"
    )


@pytest.fixture
def device(backend) -> str:
    return device_of(backend)
