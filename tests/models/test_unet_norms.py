"""unet_fast.UNet with other norms, activations and 3-D volumes (spatial_dims, norm, act,
features) against reference.UNet with the same arguments: a training history (outputs, every
gradient, eval passes, buffers), state_dict keys, what fuse_report says, bad arguments."""

import pytest
import torch

import unet_fast
from tests.helpers import assert_histories_close, training_history
from unet_fast import _backend, reference

pytestmark = pytest.mark.skipif(
    _backend.EXTENSION_ERROR is not None, reason="unet_fast._C is not built"
)

CONFIGS = [
    (3, "instance", ("leaky_relu", 0.01)),  # nnU-Net's
    (3, "batch", "relu"),
    (3, ("group", 2), "relu"),
    (2, "instance", ("leaky_relu", 0.01)),
    (2, ("group", 2), ("leaky_relu", 0.1)),
]


def twins(spatial_dims, norm, act, bilinear=False, **kw):
    args = dict(spatial_dims=spatial_dims, norm=norm, act=act, **kw)
    torch.manual_seed(0)
    ref = reference.UNet(1, 2, 4, bilinear, **args).double()
    ours = unet_fast.UNet(1, 2, 4, bilinear, **args).double()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("spatial_dims,norm,act", CONFIGS, ids=str)
@pytest.mark.parametrize("bilinear", [False, True], ids=["transposed", "interpolated"])
def test_matches_the_reference(spatial_dims, norm, act, bilinear):
    ours, ref = twins(spatial_dims, norm, act, bilinear)
    assert ours.fuse_report.fused and not ours.fuse_report.left
    x = torch.randn(2, 1, *[32] * spatial_dims, dtype=torch.float64)  # instance norm: >1 voxel
    got, want = training_history(ours, x, steps=2), training_history(ref, x, steps=2)
    assert_histories_close(got, want, torch.float64)


def test_features_in_3d():
    ours, ref = twins(3, "instance", ("leaky_relu", 0.01), features=(2, 4, 6, 8, 10))
    assert ours.inc.double_conv[0].out_channels == 2 and ours.outc.in_channels == 2
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    assert_histories_close(
        training_history(ours, x, steps=1), training_history(ref, x, steps=1), torch.float64
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_prelu_trains_its_weights_inside_the_fused_kernels(spatial_dims):
    ours, ref = twins(spatial_dims, "instance", "prelu")
    assert ours.fuse_report.fused and not ours.fuse_report.left
    assert all(what.endswith("-> PReLU") for what in ours.fuse_report.fused.values())
    for module in ref.modules():  # a slope of its own per channel
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    called = []
    for module in ours.modules():  # the kernels apply the slopes: the modules never run
        if isinstance(module, torch.nn.PReLU):
            module.register_forward_hook(lambda *_: called.append(1))
    x = torch.randn(2, 1, *[32] * spatial_dims, dtype=torch.float64)
    assert_histories_close(
        training_history(ours, x, steps=1), training_history(ref, x, steps=1), torch.float64
    )
    assert not called


def test_float32_volume_runs_channels_last_3d():
    ours, ref = twins(3, "instance", ("leaky_relu", 0.01))
    ours, ref = ours.float(), ref.float()
    assert ours.inc.double_conv[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 32, 32)
    out = ours(x)
    assert out.is_contiguous()  # returned in the input's layout
    assert_histories_close(
        training_history(ours, x, steps=1), training_history(ref, x, steps=1), torch.float32
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"norm": "layer"}, "norm must be 'batch', 'instance' or"),
        ({"norm": "group"}, "needs its number of groups"),
        ({"act": "gelu"}, "act must be 'relu'"),
        ({"features": (4, 8)}, "features must give 5 widths"),
    ],
)
def test_bad_arguments_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unet_fast.UNet(1, 2, 4, **kwargs)


def test_a_volume_network_refuses_an_image():
    ours, _ = twins(3, "instance", "relu")
    with pytest.raises(ValueError, match=r"expects a 5-D input \(N, 1, D, H, W\)"):
        ours(torch.randn(2, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="input depth 8 is too small for 4 poolings"):
        ours(torch.randn(2, 1, 8, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("model", ["ours", "reference"])
def test_one_value_per_channel_at_the_bottleneck_is_refused_naming_the_sizes(model):
    """InstanceNorm at a 1x1x1 bottleneck (any mode), BatchNorm there with a batch of one in
    training: a clear error before any layer runs; one axis of 32 or a second sample is enough."""
    instance = twins(3, "instance", "relu")[model == "reference"]
    message = r"\(1, 1, 16, 16, 16\) leaves one value per channel at the 1x1x1 bottleneck"
    for mode in (True, False):
        with pytest.raises(ValueError, match=message + ", and InstanceNorm needs more"):
            instance.train(mode)(torch.randn(1, 1, 16, 16, 16, dtype=torch.float64))
    assert instance(torch.randn(1, 1, 16, 16, 32, dtype=torch.float64)).shape == (1, 2, 16, 16, 32)
    batch = twins(2, "batch", "relu")[model == "reference"].train()
    with pytest.raises(ValueError, match=r"BatchNorm in training \(a batch of one\) needs more"):
        batch(torch.randn(1, 1, 16, 16, dtype=torch.float64))
    assert batch(torch.randn(2, 1, 16, 16, dtype=torch.float64)).shape == (2, 2, 16, 16)
    assert batch.eval()(torch.randn(1, 1, 16, 16, dtype=torch.float64)).shape == (1, 2, 16, 16)
