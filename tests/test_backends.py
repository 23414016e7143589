"""What was built, and how a backend is chosen."""

import shutil
import subprocess
import sys

import pytest
import torch

import unet_fast
from unet_fast import _backend, bench


def test_cpu_extension_is_built_and_registered():
    info = unet_fast.backends()
    assert info["extension"] == "built"
    ops = ["conv_bias_relu", "conv_bn_relu", "crop_concat", "norm_act", "recompute", "up_conv"]
    assert info["kernels"]["cpu"] == ops
    assert info["default"]["cpu"] == dict.fromkeys(ops, "cpu")
    kernels = ("crop_concat", "batch_norm_relu", "batch_norm_relu_backward", "conv_bias_relu")
    for kernel in (*kernels, "norm_act", "norm_act_backward", "up_conv_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unet_fast::{kernel}", "CPU")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("nm") is None,
    reason="libstdc++ and binutils' nm: Linux",
)
def test_extension_uses_the_shared_libstdcxx():
    # A private static copy of libstdc++ (linked by another GCC) crashed formatting the first
    # TORCH_CHECK message; the extension must import std::ostream from the process's libstdc++.
    from unet_fast import _C

    symbols = subprocess.run(
        ["nm", "-D", _C.__file__], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    insert_long = [line.split() for line in symbols if "_ZNSo9_M_insertIlEERSoT_" in line]
    assert insert_long and all(fields[0] == "U" for fields in insert_long), insert_long


@pytest.mark.skipif(not _backend.BUILT["cuda"], reason="built without CUDA kernels")
def test_unverified_cuda_kernels_are_registered_but_auto_keeps_the_reference():
    for kernel in ("norm_act", "norm_act_backward", "norm_act_apply", "up_conv_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unet_fast::{kernel}", "CUDA")
    info = unet_fast.backends()
    assert {"norm_act", "up_conv"} <= set(info["kernels"]["cuda"])
    assert info["unverified"]["cuda"] == ["norm_act", "up_conv"]
    assert _backend.default_backend("norm_act", "cuda") == "reference"
    assert _backend.default_backend("up_conv", "cuda") == "reference"
    assert _backend.default_backend("crop_concat", "cuda") == "cuda"
    # and `unet-fast bench` on a GPU says why parts of the fused network run the reference there
    config = {"device": "cuda", "backends": info, "backend_asked": "auto", "model": "nnunet-3d"}
    assert "cuda norm_act, up_conv kernels are built but unverified" in bench.unverified_note(
        config
    )
    assert "cuda up_conv kernels" in bench.unverified_note({**config, "model": "unet"})
    assert bench.unverified_note({**config, "backend_asked": "cuda"}) == ""
    assert bench.unverified_note({**config, "device": "cpu"}) == ""


def test_gpu_entry_matches_the_machine():
    info = unet_fast.backends()
    assert (info["gpu"] is not None) == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert info["default"]["cuda"]["crop_concat"] == "cuda"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("UNET_FAST_BACKEND", "reference")
    assert _backend.resolve("auto", torch.device("cpu"), "crop_concat") == "reference"
    assert (
        _backend.resolve("cpu", torch.device("cpu"), "crop_concat") == "cpu"
    )  # an explicit choice wins
    assert unet_fast.backends()["override"] == "reference"
    monkeypatch.setenv("UNET_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        _backend.resolve("auto", torch.device("cpu"), "crop_concat")


def test_triton_backend_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
        _backend.resolve("triton", torch.device("cpu"), "crop_concat")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("triton", torch.device("cpu"), "crop_concat") == "triton"
    assert unet_fast.backends()["triton"]["cpu"] == "interpreter"
