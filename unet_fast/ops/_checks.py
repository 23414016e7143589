"""Input validation shared by the public ops (clear Python exceptions before any kernel runs),
and the autocast rule for their convolution inputs."""

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
            raise TypeError(
                f"{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{op}: {name} has batch size {t.shape[0]} but {first_name} has {first.shape[0]}"
            )


def check_size(op: str, size) -> tuple:
    """A target spatial size (H, W) of two non-negative integers."""
    size = tuple(size)
    if len(size) != 2 or any(not isinstance(s, (int, torch.SymInt)) or s < 0 for s in size):
        raise ValueError(f"{op}: size must be two non-negative integers (H, W), got {size}")
    return size


Tensor = torch.Tensor


def check_channel_vectors(op: str, channels: int, device, **tensors) -> None:
    """Per-channel parameters and statistics (None where absent) of shape (channels,) on device."""
    for name, t in tensors.items():
        if t is not None and (t.shape != (channels,) or t.device != device):
            raise ValueError(
                f"{op}: {name} must have shape ({channels},) on {device}, "
                f"got {tuple(t.shape)} on {t.device}"
            )


def check_conv(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, padding, training):
    check_tensors("conv_bn_relu", x=x)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(
            f"conv_bn_relu: weight must be 4-D (C_out, C_in, kH, kW), got "
            f"{getattr(weight, 'shape', weight)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv_bn_relu: x has {x.shape[1]} channels but weight expects "
            f"{weight.shape[1]} (weight shape {tuple(weight.shape)})"
        )
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(
            f"conv_bn_relu: weight is {weight.dtype} on {weight.device} but x is "
            f"{x.dtype} on {x.device}"
        )
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"conv_bn_relu: padding must be a non-negative int, got {padding!r}")
    c_out = weight.shape[0]
    check_channel_vectors(
        "conv_bn_relu",
        c_out,
        x.device,
        bias=bias,
        bn_weight=bn_weight,
        bn_bias=bn_bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    h, w = (x.shape[i] + 2 * padding - weight.shape[i] + 1 for i in (2, 3))
    if h <= 0 or w <= 0:
        raise ValueError(
            f"conv_bn_relu: input {tuple(x.shape[2:])} with padding {padding} is "
            f"smaller than the {tuple(weight.shape[2:])} kernel"
        )
    if training and x.shape[0] * h * w == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{(x.shape[0], c_out, h, w)}"
        )


def autocast_inputs(*tensors):
    """Under torch.autocast the convolution inputs take the autocast dtype, as F.conv2d's would;
    BatchNorm parameters and statistics stay in float32."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
