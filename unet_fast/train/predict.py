"""A model's logits for images of any size: overlap-tile prediction (the geometry is in
tiling.py) and test-time augmentation, the mean over a task's symmetry views (symmetry.py).
Reading images and writing masks, and `unet-fast predict`, are in predict_files.py."""

import itertools

import torch

from .symmetry import SYMMETRIES, check_symmetry, turn, turn_back
from .tiling import blend_weight, mirror_pad, model_padding, plan


def predict_tiled(
    model,
    image: torch.Tensor,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    blend: str = "cosine",
) -> torch.Tensor:
    """Logits K×H×W (float32, on the image's device) for a normalised C×H×W float image, or
    K×D×H×W for a C×D×H×W volume and a 3-D model.

    `tile`: the largest model input per tile, one size or one per axis (rounded down to a valid
    size: a multiple of 16 for "same" padding, the paper's geometry for "valid"); `overlap`:
    the least overlap of neighbouring tiles' outputs (the stride is rounded down to a multiple
    of 16); `blend`: "cosine" ramps over the overlaps, "constant" averages them plainly. Runs
    under inference_mode in batches of `batch_size` tiles on the model's device, with the model
    in eval mode (restored afterwards), so a tile's result never depends on its batch.
    """
    return predict_views(model, image, [(0, False)], tile, overlap, batch_size, blend)


def predict_averaged(
    model, image: torch.Tensor, tta: bool = False, symmetry: str = "dihedral", **tiling
) -> torch.Tensor:
    """predict_tiled, or with tta=True its mean over the image's views under `symmetry` (on
    ISBI 2012 the 8 flips and rotations lower the pixel error by about 8%); the views' tiles
    share the batches."""
    if not tta:
        return predict_tiled(model, image, **tiling)
    check_symmetry(symmetry)
    return predict_views(model, image, SYMMETRIES[symmetry], **tiling)


def _check(model, image, overlap, batch_size):
    dims = getattr(model, "spatial_dims", 2)
    layout = "C×H×W" if dims == 2 else "C×D×H×W"
    if not isinstance(image, torch.Tensor) or image.dim() != dims + 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"a {dims}-D model predicts a {layout} tensor, got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"predict_tiled expects a floating-point image, got {image.dtype}")
    if image.shape[0] != model.in_channels:
        raise ValueError(
            f"the model expects {model.in_channels} channels, the image has {image.shape[0]}"
        )
    if 0 in image.shape[1:]:
        raise ValueError(f"the image is empty: {'x'.join(map(str, image.shape[1:]))}")
    if overlap < 0 or batch_size < 1:
        raise ValueError(f"need overlap >= 0 and batch_size >= 1, got {overlap} and {batch_size}")


class _View:
    """One view of the image: its tiles' plan, mirrored canvas, and blended logits."""

    def __init__(self, model, image, view, tile, overlap, blend, device, dtype):
        self.view = view
        turned = turn(image, view).contiguous()
        self.size = turned.shape[1:]
        self.axes = plan(self.size, tile, overlap, model_padding(model))
        self.padded = mirror_pad(turned.to(device=device, dtype=dtype), self.axes)
        self.tiles = list(itertools.product(*(axis.starts for axis in self.axes)))
        self.shape = tuple(axis.tile_in for axis in self.axes)
        # constant blending adds the tiles as they are: no weight to multiply by
        self.weight = blend_weight(self.axes, device, blend) if blend != "constant" else None
        canvas = tuple(axis.canvas for axis in self.axes)
        self.total = torch.zeros(model.num_classes, *canvas, device=device)
        self.norm = torch.zeros(canvas, device=device)
        self.done, self.result = 0, None

    def crop(self, starts):
        inputs = (slice(s, s + a.tile_in) for s, a in zip(starts, self.axes, strict=True))
        return self.padded[(slice(None), *inputs)]

    def add(self, starts, logits):
        """Blends one tile's logits in; after the last tile keeps only the view's result (all
        views' canvases at once would crowd the memory the model's batches run in)."""
        image = (slice(None), *(slice(0, n) for n in self.size))
        if len(self.tiles) == 1:  # no blending: bit for bit the plain forward pass
            self.result = turn_back(logits[image], self.view)
        else:
            out = tuple(slice(s, s + a.tile_out) for s, a in zip(starts, self.axes, strict=True))
            weighted = logits if self.weight is None else logits * self.weight
            self.total[(slice(None), *out)] += weighted
            self.norm[out] += 1 if self.weight is None else self.weight
            self.done += 1
            if self.done < len(self.tiles):
                return
            self.result = turn_back(self.total[image].div_(self.norm[image[1:]]), self.view)
        self.padded = self.total = self.norm = None


def predict_views(
    model, image, views, tile=256, overlap=32, batch_size=4, blend="cosine"
) -> torch.Tensor:
    """The mean over `views` ((quarter turns, mirror) of symmetry.py) of the overlap-tile logits
    of each view mapped back; the tiles of every view share batches of `batch_size` (tiles of
    one shape per batch)."""
    _check(model, image, overlap, batch_size)
    parameter = next(model.parameters())
    device = parameter.device
    planned = [_View(model, image, v, tile, overlap, blend, device, parameter.dtype) for v in views]
    work = sorted(
        ((view.shape, k, starts) for k, view in enumerate(planned) for starts in view.tiles),
        key=lambda item: item[0],
    )
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            first = 0
            while first < len(work):
                shape = work[first][0]
                chunk = [item for item in work[first : first + batch_size] if item[0] == shape]
                first += len(chunk)
                out = model(torch.stack([planned[k].crop(starts) for _, k, starts in chunk]))
                out = (out[-1] if isinstance(out, (list, tuple)) else out).float()
                for (_, k, starts), logits in zip(chunk, out, strict=True):
                    planned[k].add(starts, logits)
    finally:
        model.train(training)
    results = [view.result for view in planned]
    mean = results[0] if len(results) == 1 else torch.stack(results).mean(0)
    return mean.to(image.device)
