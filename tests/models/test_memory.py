"""estimate_memory against measured saved-for-backward bytes; visualize_activations."""

import pytest
import torch

import unet_fast
from tests import tutorial_unet
from unet_fast.bench import saved_bytes


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (61, 83)])
def test_estimate_matches_measured_bytes(bilinear, size):
    x = torch.randn(2, 3, *size)
    fused = unet_fast.UNet(3, 2, base_features=8, bilinear=bilinear).train()
    estimate = unet_fast.estimate_memory(2, size, 8, bilinear=bilinear)
    assert abs(estimate - saved_bytes(fused, x)) <= 0.01 * estimate
    if not bilinear:  # the tutorial's own model, as its users run it
        tutorial = tutorial_unet.UNet(3, 2, base_features=8, bilinear=False).train()
        estimate = unet_fast.estimate_memory(2, size, 8, fused=False)
        assert abs(estimate - saved_bytes(tutorial, x)) <= 0.01 * estimate


def test_fused_keeps_less_than_the_tutorial_and_the_tutorials_formula_undercounts():
    ours = unet_fast.estimate_memory(8, 512)
    theirs = unet_fast.estimate_memory(8, 512, fused=False)
    assert ours < 0.85 * theirs
    tutorial_formula = (
        sum(8 * c * s * s for s, c in [(512, 64), (256, 128), (128, 256), (64, 512), (32, 1024)])
        * 2
        * 4
    )
    assert theirs > 2 * tutorial_formula


def test_visualize_activations_returns_a_figure_of_every_level():
    model = unet_fast.UNet(3, 2, base_features=4)
    fig, activations = unet_fast.visualize_activations(model, torch.randn(1, 3, 64, 64))
    assert list(activations) == ["enc1", "enc2", "enc3", "enc4", "bottleneck"]
    assert activations["bottleneck"].shape == (1, 32, 4, 4)  # 4 * 16 // 2 (bilinear)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 5
    assert model.training  # left as it was
