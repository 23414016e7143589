"""The tutorial's memory tools, made true: estimate_memory and visualize_activations."""

from typing import Sequence, Union

import torch


def estimate_memory(
    batch_size: int,
    image_size: Union[int, Sequence[int]],
    base_features: int = 64,
    in_channels: int = 3,
    *,
    bilinear: bool = False,
    fused: bool = True,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes autograd keeps for backward in one training step of a same-padding UNet: unet_fast's
    (fused=True) or the tutorial's (fused=False).

    The tutorial's estimate counted each encoder output twice. What the tutorial's model really
    keeps, per double conv: its input, both conv outputs y1 and y2, relu(bn(y1)), relu(bn(y2))
    and per-channel statistics; per pooling, int64 indices. unet_fast's keeps, per double conv,
    its input (in the decoder only the upsampled half of the concatenation: the skip half is
    recomputed from the encoder's y2), y1, y2 and the statistics; the block output only where a
    transposed convolution or the head needs it (pooling and joins recompute it, bilinear
    upsampling needs nothing).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    width = torch.finfo(dtype).bits // 8
    stats_width = 8 if dtype == torch.float64 else 4

    def activation(channels, size, element=width):
        return batch_size * channels * size[0] * size[1] * element

    def double_conv(c_in, c_mid, c_out, size, output_kept):
        kept = activation(c_in, size) + activation(c_mid, size) + activation(c_out, size)
        if output_kept or not fused:
            kept += activation(c_out, size)
        if not fused:
            kept += activation(c_mid, size)
        return kept + 2 * (c_mid + c_out) * stats_width

    f = [base_features * 2**i for i in range(5)]
    factor = 2 if bilinear else 1
    sizes = [(h, w)]
    for _ in range(4):
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    total = double_conv(in_channels, f[0], f[0], sizes[0], output_kept=False)
    for k in range(1, 5):
        out = f[k] // factor if k == 4 else f[k]
        if not fused:
            total += activation(f[k - 1], sizes[k], element=8)  # pooling indices
        total += double_conv(f[k - 1], out, out, sizes[k], output_kept=k == 4 and not bilinear)
    for k in range(3, -1, -1):
        out = f[k] // factor if k > 0 else f[0]
        kept_input = f[k] if fused else f[k + 1]  # the upsampled half, or the whole join
        total += double_conv(
            kept_input,
            f[k + 1] // 2 if bilinear else out,
            out,
            sizes[k],
            output_kept=k == 0 or not bilinear,
        )
    return total


def visualize_activations(model, image: torch.Tensor):
    """A matplotlib figure of the channel-mean activation of each encoder level and the
    bottleneck for one image (1, C, H, W), and the activations themselves, keyed by name."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = {
        "inc": "enc1",
        "down1": "enc2",
        "down2": "enc3",
        "down3": "enc4",
        "down4": "bottleneck",
    }
    activations, handles = {}, []
    for attr, name in names.items():

        def hook(module, inputs, output, name=name):
            activations[name] = output.detach().float().cpu()

        handles.append(getattr(model, attr).register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    fig, axes = plt.subplots(2, 3, figsize=(15, 10))
    for ax, (name, act) in zip(axes.flat, activations.items()):
        ax.imshow(act[0].mean(dim=0).numpy(), cmap="viridis")
        ax.set_title(f"{name}: {tuple(act.shape)}")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig, activations
