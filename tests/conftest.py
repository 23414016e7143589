import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tutorial_unet, the specification fixture

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels_last or a strided view."""
    if name == "contiguous":
        return x.contiguous()
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if name == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(name)


LAYOUTS = ["contiguous", "channels_last", "strided"]
