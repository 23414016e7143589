"""A learnt offset of the labels from the images (`--learn-offset`).

Hand-drawn labels can sit beside the structure they mark: ISBI 2012's membrane labels lie about
0.6 pixels above the dark lines. Flip and rotation augmentation turns such an offset with the
image, so a model trained on all 8 views learns a blur instead of the offset, and its
predictions miss the labels by it. With `learn_offset` the training loop draws each sample's
view itself, turns the logits back to the sample's own orientation and passes them through
`LabelOffset`, a 3×3 convolution per class that starts as the identity: the network learns the
structure, the convolution the offset (a fractional shift is a 3×3 interpolation kernel).
Validation and prediction apply it to the (view-averaged) logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError
from .predict import predict_averaged
from .symmetry import symmetric_mean, turn, turn_back
from .tiling import model_padding, quarter_overlap

# albumentations transforms that turn the image: with learn_offset the loop draws the views
TURNING = ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "Transpose", "D4", "SquareSymmetry")


class LabelOffset(nn.Module):
    """A 3×3 convolution of each class's logits on its own (edges replicated), from the identity."""

    def __init__(self, channels: int):
        super().__init__()
        weight = torch.zeros(channels, 1, 3, 3)
        weight[:, :, 1, 1] = 1
        self.weight = nn.Parameter(weight)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        padded = F.pad(logits, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, self.weight.to(logits.dtype), groups=logits.shape[1])

    def shift(self) -> torch.Tensor:
        """The kernel's centre of mass (rows, columns) from the centre, per class: out[y, x]
        takes from about in[y + rows, x + columns]."""
        weight = self.weight.detach()[:, 0]
        offsets = torch.arange(-1.0, 2.0, device=weight.device)
        total = weight.sum((1, 2))
        return torch.stack(
            [(weight.sum(2) * offsets).sum(1) / total, (weight.sum(1) * offsets).sum(1) / total], 1
        )


def load_offset(state: dict, channels: int, path) -> LabelOffset | None:
    """The checkpoint's learnt offset for a model with `channels` outputs; None if it has none."""
    if "offset" not in state:
        return None
    offset = LabelOffset(channels)
    try:
        offset.load_state_dict(state["offset"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: its label offset does not fit the model's {channels} "
            f"outputs ({str(error).splitlines()[0]})"
        ) from None
    return offset.to(state["offset"]["weight"].device)


class OffsetModel(nn.Module):
    """`model` followed by an optional LabelOffset: what fit trains, averages and validates.

    `forward(images, views)` turns each image to its view (a (quarter turns, mirror) pair, as in
    `symmetry.SYMMETRIES`), runs the model on the batch and turns each sample's logits back
    before the offset; `predict(images, tta, symmetry)` is validation's and prediction's path."""

    def __init__(self, model: nn.Module, offset: LabelOffset | None = None):
        super().__init__()
        self.model, self.offset = model, offset

    def _offset(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.offset is None else self.offset(logits)

    def forward(self, images: torch.Tensor, views=None) -> torch.Tensor:
        if views is None:
            return self._offset(self.model(images))
        if images.shape[-1] != images.shape[-2] and any(turns % 2 for turns, _ in views):
            raise ValueError(
                f"quarter turns of {tuple(images.shape[-2:])} crops would not stack: "
                "use square crops or --symmetry hflip"
            )
        layout = (
            torch.channels_last
            if images.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        turned = torch.stack([turn(x, view) for x, view in zip(images, views)])
        logits = self.model(turned.contiguous(memory_format=layout))
        return self._offset(torch.stack([turn_back(y, view) for y, view in zip(logits, views)]))

    def predict(
        self, images: torch.Tensor, tta: bool = False, symmetry: str = "dihedral"
    ) -> torch.Tensor:
        logits = symmetric_mean(self.model, images, symmetry) if tta else self.model(images)
        return self._offset(logits)

    def predict_tiled(
        self, image: torch.Tensor, tta: bool, symmetry: str, tile, batch_size: int
    ) -> torch.Tensor:
        """predict for one C×[D×]H×W image by overlap-tile prediction (tiles overlapping by a
        quarter of the smallest tile edge where they can, cosine-blended)."""
        overlap = quarter_overlap(tile, model_padding(self.model))
        logits = predict_averaged(
            self.model, image, tta, symmetry, tile=tile, overlap=overlap, batch_size=batch_size
        )
        return self._offset(logits[None])[0]


def check_transform_keeps_orientation(transform) -> None:
    """learn_offset draws the views in the loop; a transform that also turns would undo it."""

    def names(node):
        yield type(node).__name__
        for child in getattr(node, "transforms", []):
            yield from names(child)

    found = sorted(set(names(transform)) & set(TURNING)) if transform is not None else []
    if found:
        raise ValueError(
            f"learn_offset draws flips and rotations itself; the training transform "
            f"must not ({', '.join(found)}): build it with symmetry='none'"
        )
