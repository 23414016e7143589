"""The flips and 90-degree rotations a task's labels are symmetric under: the views training
augmentation draws (augment.py, offset.py) and test-time augmentation averages (predict.py).

A view is (quarter turns, mirror the last axis), applied to an image's last two axes.
"""

import torch

# "hflip" keeps up and down, for labels that are not symmetric under the rest (ISBI 2012's sit
# about half a pixel above the membranes they mark; --learn-offset keeps all 8 views and learns
# the offset, see offset.py).
SYMMETRIES = {
    "dihedral": [(turns, flip) for turns in range(4) for flip in (False, True)],
    "hflip": [(0, False), (0, True)],
    "none": [(0, False)],
}


def check_symmetry(symmetry: str) -> None:
    if symmetry not in SYMMETRIES:
        raise ValueError(f"symmetry must be one of {sorted(SYMMETRIES)}, not {symmetry!r}")


def turn(image: torch.Tensor, view: tuple[int, bool]) -> torch.Tensor:
    """`image` (..., H, W) seen from `view`: (quarter turns, then mirror the last axis)."""
    turns, flip = view
    image = torch.rot90(image, turns, (-2, -1))
    return image.flip(-1) if flip else image


def turn_back(result: torch.Tensor, view: tuple[int, bool]) -> torch.Tensor:
    """The inverse of `turn`: a result computed on the view, in the image's orientation."""
    turns, flip = view
    return torch.rot90(result.flip(-1) if flip else result, -turns, (-2, -1))


def symmetric_mean(predict, image: torch.Tensor, symmetry: str = "dihedral") -> torch.Tensor:
    """The mean of `predict` over the image's views under `symmetry` (of its last two axes),
    each result mapped back; "dihedral", the 8 flips and rotations, is the paper's averaging
    over rotated inputs."""
    check_symmetry(symmetry)
    total = 0
    for view in SYMMETRIES[symmetry]:
        total = total + turn_back(predict(turn(image, view).contiguous()), view)
    return total / len(SYMMETRIES[symmetry])
