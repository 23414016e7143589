"""Input validation shared by the public ops: clear Python exceptions before any kernel runs."""
import torch

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """Every tensor is 4-D, floating point, and all share one dtype, device and batch size."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in FLOATING:
            raise TypeError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"{op}: {name} has batch size {t.shape[0]} but {first_name} has "
                             f"{first.shape[0]}")


def check_size(op: str, size) -> tuple:
    """A target spatial size (H, W) of two non-negative integers."""
    size = tuple(size)
    if len(size) != 2 or any(not isinstance(s, (int, torch.SymInt)) or s < 0 for s in size):
        raise ValueError(f"{op}: size must be two non-negative integers (H, W), got {size}")
    return size
