"""Test session setup: the Triton interpreter without a GPU, float32 without TF32, one seed per test.

Shared helpers live in tests/helpers.py (`from tests.helpers import ...`)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # prove the Triton kernels through Triton's interpreter;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
os.environ.setdefault("UNET_FAST_TRITON_TUNE", "0")
# float32 means float32: cuDNN and cuBLAS would otherwise use TF32 in the reference's convolutions
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False  # one tile shape: tests check values, not speed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
