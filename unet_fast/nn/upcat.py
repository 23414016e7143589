"""MONAI BasicUNet's UpCat without its no-op padding.

UpCat replicate-pads the upsampled map to the skip's size whenever `is_pad` is set (the
default), by zero along every axis where the sizes already agree (even edge lengths), and
F.pad keeps its input for backward: a full-resolution map that nothing else keeps. LeanUpCat
pads only when a size differs and is otherwise MONAI's UpCat: the same parameters, state_dict
and outputs. fuse() swaps it in; this module imports MONAI, so it is imported only then.
"""

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import UpCat


class LeanUpCat(UpCat):
    def forward(self, x: torch.Tensor, x_e=None):
        x_0 = self.upsample(x)
        if not isinstance(x_e, torch.Tensor):
            return self.convs(x_0)
        if self.is_pad:  # one more value at the end of each axis that is one short, last first
            pad = []
            for axis in range(x.dim() - 2):
                pad += [0, int(x_e.shape[-axis - 1] != x_0.shape[-axis - 1])]
            if any(pad):
                x_0 = F.pad(x_0, pad, "replicate")
        return self.convs(torch.cat([x_e, x_0], dim=1))
