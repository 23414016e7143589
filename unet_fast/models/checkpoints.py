"""Loading U-Net checkpoints of other code bases into unet_fast.UNet."""

import re

import torch

from .unet import UNet

_CONV_BIAS = re.compile(r"(.*double_conv)\.([03])\.bias$")


def from_pytorch_unet(checkpoint, **kwargs) -> UNet:
    """A unet_fast.UNet holding a Pytorch-UNet (milesial) checkpoint: a state_dict or a path to one.

    Its architecture (channels, classes, width, bilinear) is read from the tensors. Pytorch-UNet
    names the head `outc.conv.*` (renamed to `outc.*`) and may store `mask_values`. Older versions
    gave every 3x3 conv a bias; a bias b before BatchNorm is the same as running_mean - b with no
    bias (batch statistics cancel it in training), so it is folded there exactly. Anything else
    that does not fit raises a ValueError naming the keys.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint.items() if k != "mask_values"}
    for name in ("weight", "bias"):
        if f"outc.conv.{name}" in state:
            state[f"outc.{name}"] = state.pop(f"outc.conv.{name}")
    for key in [k for k in state if _CONV_BIAS.match(k)]:
        prefix, index = _CONV_BIAS.match(key).groups()
        bias = state.pop(key)
        mean_key = f"{prefix}.{int(index) + 1}.running_mean"
        if mean_key in state:
            state[mean_key] = state[mean_key] - bias
    try:
        first, head = state["inc.double_conv.0.weight"], state["outc.weight"]
    except KeyError as missing:
        raise ValueError(
            f"not a Pytorch-UNet or tutorial UNet checkpoint: no {missing} among "
            f"{sorted(checkpoint)[:8]}..."
        ) from None
    model = UNet(
        first.shape[1],
        head.shape[0],
        first.shape[0],
        bilinear="up1.up.weight" not in state,
        **kwargs,
    ).to(first.dtype)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            "checkpoint does not fit a Pytorch-UNet/tutorial UNet of "
            f"{first.shape[1]} channels, {head.shape[0]} classes, width "
            f"{first.shape[0]}: missing {result.missing_keys[:6]}, unexpected "
            f"{result.unexpected_keys[:6]}"
        )
    return model
