"""unet_fast.UNet against the reference UNet and the tutorial's code; fuse() on other models."""

import pytest
import torch
from torch import nn

import unet_fast
from tests import tutorial_unet
from tests.helpers import DispatchedOps, assert_close, assert_histories_close, training_history
from unet_fast import _backend, reference
from unet_fast.nn import FusedDoubleConv


def twins(dtype=torch.float64, **kw):
    ref = reference.UNet(3, 2, base_features=4, **kw).to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm parameters
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    ours = unet_fast.UNet(3, 2, base_features=4, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def run(model, x, steps=3):
    return training_history(model, x, steps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (37, 45)])
def test_matches_reference_through_training(dtype, bilinear, size):
    ours, ref = twins(dtype, bilinear=bilinear)
    x = torch.randn(2, 3, *size, dtype=dtype)
    assert_histories_close(run(ours, x), run(ref, x), dtype)


def test_loads_the_tutorials_checkpoint_and_gives_its_outputs():
    tutorial = tutorial_unet.UNet(3, 2, base_features=4, bilinear=False).double()
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False).double()
    ours.load_state_dict(tutorial.state_dict(), strict=True)
    tutorial.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 40, 33, dtype=torch.float64)
    for got, want in zip(run(ours, x, steps=2), run(tutorial, x, steps=2), strict=True):
        assert_close(got, want, torch.float64)


def test_uses_the_fused_ops_and_keeps_the_callers_layout():
    ours, _ = twins(torch.float32)
    assert all(
        type(m.double_conv) is FusedDoubleConv
        for m in ours.modules()
        if type(m).__name__ == "DoubleConv"
    )
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = ours(x)
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.add(fn.name())
            stack.extend(f for f, _ in fn.next_functions)
    assert any("double_conv" in n for n in names)
    assert "_JoinDoubleConvBackward" in names and "_MaxPoolBackward" in names  # keep recipes
    assert not any("NativeBatchNorm" in n or n == "CatBackward0" for n in names)
    out = ours(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("size", [(32, 48), (37, 34)])  # odd sizes: joins pad, crop_concat runs
def test_training_rebuilds_skips_in_one_pass_with_or_without_the_kernels(
    monkeypatch, kernels, size
):
    """The decoder reads each encoder output through its pooling's node, whose backward sums
    both gradients, and the join's backward rebuilds its input from the skip's recipe: in one
    kernel each where built, composed (CUDA) where not; the same either way."""
    if not kernels:
        monkeypatch.setitem(_backend.BUILT, "cpu", _backend.BUILT["cpu"] - {"recompute"})
    tutorial = tutorial_unet.UNet(3, 2, base_features=4, bilinear=False).double()
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False).double()
    ours.load_state_dict(tutorial.state_dict())
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    for got, want in zip(run(ours, x, steps=2), run(tutorial, x, steps=2), strict=True):
        assert_close(got, want, torch.float64)
    with DispatchedOps() as dispatched:
        ours.train()(x).sum().backward()
    pooled = "unet_fast.batch_norm_relu_max_pool_backward" in dispatched.names
    joined = dispatched.names.count("unet_fast.batch_norm_relu_concat")
    assert pooled == kernels
    assert ("aten.max_pool2d_with_indices_backward" in dispatched.names) != kernels
    # 32 x 48: no join pads; 37 x 34: all but the deepest do
    assert joined == (0 if not kernels else 4 if size[0] == 32 else 1)


def test_valid_padding_and_size_errors():
    ours = unet_fast.UNet(1, 2, base_features=2, bilinear=False, padding="valid")
    ref = reference.UNet(1, 2, base_features=2, bilinear=False, padding="valid")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 572, 572)
    with torch.no_grad():
        out = ours.eval()(x)
        assert out.shape == (1, 2, 388, 388)
        assert_close(out, ref.eval()(x), torch.float32)
    with pytest.raises(ValueError, match="nearest valid sizes: 572"):
        ours(torch.randn(1, 1, 573, 572))
    with pytest.raises(ValueError, match="minimum is 16"):
        unet_fast.UNet(3, 2, base_features=4)(torch.randn(1, 3, 8, 64))


def test_fuse_replaces_conv_bn_relu_runs_and_keeps_keys():
    tutorial = tutorial_unet.UNet(3, 2, base_features=4, bilinear=False).double()
    plain = tutorial_unet.UNet(3, 2, base_features=4, bilinear=False).double()
    plain.load_state_dict(tutorial.state_dict())
    keys = list(tutorial.state_dict())
    model, report = unet_fast.fuse(tutorial, report=True)
    assert model is tutorial and list(model.state_dict()) == keys
    assert len(report.fused) == 9 and "inc.double_conv" in report.fused

    class Conv2dReLU(nn.Sequential):  # as segmentation_models_pytorch's decoder blocks
        def __init__(self, c_in, c_out):
            super().__init__(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

    class Custom(nn.Sequential):  # its own forward: not fused
        def forward(self, x):
            return super().forward(x) * 2

    wrapper = nn.Module()
    wrapper.smp = Conv2dReLU(4, 4)
    wrapper.head = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
    )
    wrapper.strided = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU())
    wrapper.custom = Custom(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    keys = list(wrapper.state_dict())
    _, report = unet_fast.fuse(wrapper, report=True)
    assert list(report.fused) == ["smp", "head", "strided"] and list(wrapper.state_dict()) == keys
    assert type(wrapper.head).__name__ == "FusedSequential" and unet_fast.fuse(wrapper) is wrapper
    assert type(wrapper.strided).__name__ == "FusedConvNormAct"  # a strided conv: ops.norm_act
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    for got, want in zip(run(model, x, steps=2), run(plain, x, steps=2), strict=True):
        assert_close(got, want, torch.float64)


def test_checkpointing_keeps_results_and_running_statistics():
    _, ref = twins(torch.float64, bilinear=False)
    lean = unet_fast.UNet(3, 2, base_features=4, bilinear=False, checkpointing=True).double()
    lean.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for got, want in zip(
        run(lean, x), run(ref, x), strict=True
    ):  # includes every buffer at the end
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("bilinear", [False, True])
def test_pytorch_unet_checkpoints_with_and_without_conv_biases(bilinear, tmp_path):
    ref = twins(torch.float64, bilinear=bilinear)[1]
    with torch.no_grad():  # an older Pytorch-UNet: every 3x3 conv has a bias
        for m in ref.modules():
            if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d):
                for i in (0, 3):
                    conv = nn.Conv2d(m[i].in_channels, m[i].out_channels, 3, padding=1).double()
                    conv.weight.copy_(m[i].weight)
                    m[i] = conv
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    state = {k.replace("outc.", "outc.conv."): v for k, v in ref.state_dict().items()}
    state["mask_values"] = [0, 1]
    torch.save(state, tmp_path / "checkpoint.pth")
    ours = unet_fast.from_pytorch_unet(str(tmp_path / "checkpoint.pth"))
    assert ours.bilinear is bilinear and ours.num_classes == 2 and ours.in_channels == 3
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for got, want in zip(run(ours, x, steps=2)[:-1], run(ref, x, steps=2)[:-1], strict=True):
        assert_close(got[:1], want[:1], torch.float64)  # outputs, train and eval
    with pytest.raises(ValueError, match="not a Pytorch-UNet"):
        unet_fast.from_pytorch_unet({"fc.weight": torch.zeros(2, 2)})
    state.pop("up2.up.weight", None), state.pop("down2.maxpool_conv.1.double_conv.1.bias")
    with pytest.raises(ValueError, match="missing"):
        unet_fast.from_pytorch_unet(state)


@pytest.mark.parametrize("training", [True, False])
def test_bfloat16_model_within_the_rule(training):
    from tests.helpers import assert_bf16_within_rule, bf16_rule_runs

    ours, ref = twins(torch.float64, bilinear=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_bf16_within_rule(*bf16_rule_runs(ours, ref, x, training))


def test_one_channel_input_runs_channels_last_inside():
    """With one channel, NCHW strides already count as channels_last contiguous; the model must
    still run its layers channels_last on the CPU (else every convolution reorders weights)."""
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    formats = []
    model.inc.register_forward_hook(
        lambda module, inputs, output: formats.append(
            torch._prims_common.suggest_memory_format(output)
        )
    )
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert formats == [torch.channels_last] and out.is_contiguous()
