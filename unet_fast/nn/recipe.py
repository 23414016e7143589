"""Convolutions and max poolings that read a chain's output by its recipe.

A Conv -> Norm -> Act chain's output carries its recipe (its last conv output and statistics,
which the chain keeps anyway; ops.conv_norm_act). A module whose backward reads its input — a
convolution, a transposed convolution, a max pooling — keeps that input for backward; reading a
chain's output unchanged (nnU-Net's transposed convolutions and segmentation head, MONAI's
pooling and upsampling), these modules keep the recipe instead and rebuild the input in backward.
Otherwise (no recipe, no gradient, string padding, another padding mode, pooling indices asked
for, extra arguments) they run as their PyTorch class does. They are those classes, with the
same parameters and state_dict: `read_recipes(model)` swaps them in place.
"""

import torch
from torch import nn

from ..ops.conv_norm_act import ConvOp, MaxPoolOp, from_recipe, recipe_of
from .up_conv import UpConvTranspose2d, UpConvTranspose3d


def _each(value, dims: int) -> list:
    return [value] * dims if isinstance(value, int) else list(value)


class _ReadsRecipe:
    def forward(self, x, *args, **kwargs):
        recipe = None if args or kwargs or not torch.is_grad_enabled() else recipe_of(x)
        op = None if recipe is None else self.recipe_op(x.dim() - 2)
        if op is None:
            return super().forward(x, *args, **kwargs)
        return from_recipe(op, x, recipe, *self.recipe_params())


class _Conv(_ReadsRecipe):
    def recipe_op(self, dims):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        transposed = isinstance(self, nn.modules.conv._ConvTransposeNd)
        output_padding = self.output_padding if transposed else (0,) * dims
        return ConvOp(
            self.stride, self.padding, self.dilation, transposed, output_padding, self.groups
        )

    def recipe_params(self):
        return self.weight, self.bias


class _MaxPool(_ReadsRecipe):
    def recipe_op(self, dims):
        if self.return_indices:
            return None
        stride = self.stride or self.kernel_size
        sizes = (self.kernel_size, stride, self.padding, self.dilation)
        return MaxPoolOp(*[_each(v, dims) for v in sizes], self.ceil_mode)

    def recipe_params(self):
        return ()


class RecipeConv2d(_Conv, nn.Conv2d):
    pass


class RecipeConv3d(_Conv, nn.Conv3d):
    pass


class RecipeConvTranspose2d(_Conv, UpConvTranspose2d):
    pass


class RecipeConvTranspose3d(_Conv, UpConvTranspose3d):
    pass


class RecipeMaxPool2d(_MaxPool, nn.MaxPool2d):
    pass


class RecipeMaxPool3d(_MaxPool, nn.MaxPool3d):
    pass


READERS = {
    nn.Conv2d: RecipeConv2d,
    nn.Conv3d: RecipeConv3d,
    nn.ConvTranspose2d: RecipeConvTranspose2d,
    nn.ConvTranspose3d: RecipeConvTranspose3d,
    UpConvTranspose2d: RecipeConvTranspose2d,
    UpConvTranspose3d: RecipeConvTranspose3d,
    nn.MaxPool2d: RecipeMaxPool2d,
    nn.MaxPool3d: RecipeMaxPool3d,
}


def read_recipes(model: nn.Module) -> None:
    """Swaps every convolution and max pooling of `model` for its recipe-reading class, in place."""
    for module in model.modules():
        reader = READERS.get(type(module))
        if reader is not None:
            module.__class__ = reader
