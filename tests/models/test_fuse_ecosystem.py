"""fuse() on the networks of nnU-Net (dynamic_network_architectures) and MONAI, 2-D and 3-D:
outputs, every parameter gradient and every buffer against the original network."""

import copy

import pytest
import torch
from torch import nn

import unet_fast
from tests.helpers import assert_bf16_within_rule, assert_close
from unet_fast import _backend
from unet_fast.bench import saved_bytes

monai_nets = pytest.importorskip("monai.networks.nets")
plain_conv_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
pytestmark = pytest.mark.skipif(
    _backend.EXTENSION_ERROR is not None, reason="unet_fast._C is not built"
)


def nnunet(dims, norm="instance"):
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    norms = {
        "instance": (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d, {"affine": True}),
        "batch": (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d, {}),
    }
    norm_op, norm_kwargs = norms[norm]
    return plain_conv_unet.PlainConvUNet(
        1,
        3,
        (4, 8, 16),
        conv,
        (1, 3, 3) if dims == 3 else 3,
        (1, 2, 2),
        (2, 2, 2),
        3,
        (1, 1),
        False,
        norm_op,
        {"eps": 1e-5, **norm_kwargs},
        None,
        None,
        nn.LeakyReLU,
        {"inplace": True},
        deep_supervision=False,
    )


def basic_unet(dims):
    return monai_nets.BasicUNet(dims, 1, 2, features=(4, 4, 8, 8, 16, 4))


def dyn_unet(dims, res_block=False):
    """MONAI's DynUNet with UnetBasicBlock or UnetResBlock (InstanceNorm, LeakyReLU 0.01)."""
    return monai_nets.DynUNet(
        dims,
        1,
        2,
        [3, 3, 3],
        [1, 2, 2],
        [2, 2],
        filters=[4, 8, 16],
        norm_name="instance",
        res_block=res_block,
    )


def residual_encoder_unet(dims):
    """nnU-Net's ResidualEncoderUNet: BasicBlockD stages (a strided, pooled shortcut)."""
    return plain_conv_unet.ResidualEncoderUNet(
        1,
        3,
        (4, 8, 16),
        nn.Conv3d if dims == 3 else nn.Conv2d,
        3,
        (1, 2, 2),
        (1, 2, 2),
        3,
        (1, 1),
        False,
        nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d,
        {"eps": 1e-5, "affine": True},
        None,
        None,
        nn.LeakyReLU,
        {"inplace": True},
        deep_supervision=False,
    )


def monai_residual_unet(dims):
    """MONAI's UNet of ResidualUnits (InstanceNorm, PReLU, a conv shortcut)."""
    return monai_nets.UNet(dims, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)


NETWORKS = {
    "nnunet-2d": (lambda: nnunet(2), (2, 1, 16, 16)),
    "nnunet-3d": (lambda: nnunet(3), (2, 1, 8, 16, 16)),
    "nnunet-3d-batchnorm": (lambda: nnunet(3, "batch"), (2, 1, 8, 16, 16)),
    "monai-basicunet-2d": (lambda: basic_unet(2), (2, 1, 32, 32)),
    "monai-basicunet-3d": (lambda: basic_unet(3), (2, 1, 32, 32, 32)),
    # odd edge lengths: UpCat replicate-pads the upsampled maps
    "monai-basicunet-2d-odd": (lambda: basic_unet(2), (2, 1, 30, 35)),
    "monai-dynunet-2d": (lambda: dyn_unet(2), (2, 1, 16, 16)),
    "monai-dynunet-3d": (lambda: dyn_unet(3), (2, 1, 8, 16, 16)),
    "monai-dynunet-res-2d": (lambda: dyn_unet(2, True), (2, 1, 16, 16)),
    "monai-dynunet-res-3d": (lambda: dyn_unet(3, True), (2, 1, 8, 16, 16)),
    "monai-unet-residual-3d": (lambda: monai_residual_unet(3), (2, 1, 16, 16, 16)),
    "nnunet-resenc-2d": (lambda: residual_encoder_unet(2), (2, 1, 16, 16)),
    "nnunet-resenc-3d": (lambda: residual_encoder_unet(3), (2, 1, 8, 16, 16)),
}


def step(model, x, training):
    """[output, every parameter gradient, every buffer] after one step in a mode; parameters
    the forward does not use (nnU-Net's unused deep-supervision heads) give an empty tensor."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = [torch.empty(0) if p.grad is None else p.grad for p in model.parameters()]
    return [out, *grads, *model.buffers()]


@pytest.mark.parametrize("name", list(NETWORKS))
def test_fused_network_matches_the_original(name):
    make, shape = NETWORKS[name]
    torch.manual_seed(0)
    original = make().double()
    fused, report = unet_fast.fuse(copy.deepcopy(original), report=True)
    assert report.fused and list(fused.state_dict()) == list(original.state_dict())
    assert any(isinstance(m, unet_fast.nn.FusedConvNormAct) for m in fused.modules())
    x = torch.randn(shape, dtype=torch.float64)
    for training in (True, False, True):  # eval between steps reads the running statistics
        assert_close(step(fused, x, training), step(original, x, training), torch.float64)


def test_float32_channels_last_3d():
    make, shape = NETWORKS["nnunet-3d"]
    torch.manual_seed(0)
    original = make()
    fused = unet_fast.fuse(copy.deepcopy(original))
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    for model in (original, fused):
        model.to(memory_format=torch.channels_last_3d)
    assert_close(step(fused, x, True), step(original, x, True), torch.float32)


def test_report_says_what_was_fused_and_what_was_left_and_why():
    net = monai_nets.UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    model, report = unet_fast.fuse(copy.deepcopy(net), report=True)
    assert report.fused and all(
        what.endswith("InstanceNorm2d -> PReLU") for what in report.fused.values()
    )
    x = torch.randn(2, 1, 16, 16)
    assert_close(model(x), net(x), torch.float32)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    _, report = unet_fast.fuse(nn.Sequential(seq), report=True)
    assert not report.fused and report.left == {"0": "Conv2d 0: ReLU before any norm"}
    assert "left  0: Conv2d 0: ReLU before any norm" in str(report)


def test_active_dropout_runs_as_written():
    seq = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Dropout3d(0.5), nn.InstanceNorm3d(4), nn.ReLU())
    fused = unet_fast.fuse(nn.Sequential(copy.deepcopy(seq)))[0]
    x = torch.randn(2, 2, 6, 6, 6)
    torch.manual_seed(1)
    want = seq(x)
    torch.manual_seed(1)
    assert_close(fused(x), want, torch.float32)  # the same dropout mask: run as written
    fused.eval(), seq.eval()
    assert_close(fused(x), seq(x), torch.float32)


@pytest.mark.parametrize(
    "name,most",
    [
        ("nnunet-3d", 0.76),
        ("monai-dynunet-3d", 0.61),
        ("monai-basicunet-2d", 0.59),
        ("monai-basicunet-3d", 0.58),
    ],
)
def test_fused_network_keeps_less_for_backward(name, most):
    """Consecutive Conv -> Norm -> Act layers train as one chain that rebuilds the activations
    between them, whatever reads a chain's output unchanged (the next chain, a transposed
    convolution, the segmentation head, a max pooling) keeps its recipe instead, and MONAI's
    UpCat no longer keeps a padded copy: measured 0.750, 0.606, 0.582 and 0.569 of the
    original's bytes."""
    make, shape = NETWORKS[name]
    torch.manual_seed(0)
    original = make()
    fused = unet_fast.fuse(copy.deepcopy(original))
    x = torch.randn(shape)
    ratio = saved_bytes(fused.train(), x) / saved_bytes(original.train(), x)
    assert ratio < most


def test_training_under_autocast_within_the_bfloat16_rule():
    """Under bfloat16 autocast the fused layers run one by one (no chain) and the step keeps
    the original network's bfloat16 error against float64, within twice: the output, and the
    parameter gradients as one vector (per tensor, one decoder InstanceNorm bias gradient of
    scale 1e-3 comes to 2.2x the original's error)."""
    make, shape = NETWORKS["nnunet-2d"]
    torch.manual_seed(0)
    original = make()
    fused = unet_fast.fuse(copy.deepcopy(original))
    exact = copy.deepcopy(original).double()
    x = torch.randn(shape).to(torch.bfloat16).float()
    results = []
    for model in (fused, original):
        with torch.autocast("cpu", torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results.append([out.float()] + [p.grad for p in model.parameters() if p.grad is not None])
    out = exact(x.double())
    out.square().mean().backward()
    truth = [out] + [p.grad for p in exact.parameters() if p.grad is not None]
    flat = [[r[0], torch.cat([g.double().flatten() for g in r[1:]])] for r in (*results, truth)]
    assert_bf16_within_rule(*flat)


def test_residual_blocks_fuse_both_paths():
    """DynUNet's UnetResBlock: conv1-norm1-act and conv2-norm2 on the main path, conv3-norm3 on
    the shortcut; only the output head (a bare conv) is left."""
    _, report = unet_fast.fuse(dyn_unet(3, res_block=True), report=True)
    three_runs = "Conv3d -> InstanceNorm3d -> LeakyReLU; Conv3d -> InstanceNorm3d; Conv3d -> "
    assert report.fused["input_block"] == three_runs + "InstanceNorm3d"
    assert list(report.left) == ["output_block.conv"]


def test_nnunet_residual_blocks_chain_and_blocks_doing_more_are_left():
    """BasicBlockD: conv1 and conv2 as one chain, the projection shortcut fused; one with
    squeeze-excitation runs its own forward, its ConvDropoutNormReLU modules fused one by one."""
    _, report = unet_fast.fuse(residual_encoder_unet(3), report=True)
    stride_two = "Conv3d -> InstanceNorm3d -> LeakyReLU; Conv3d -> InstanceNorm3d; Conv3d -> "
    assert report.fused["encoder.stages.1.blocks.0"] == stride_two + "InstanceNorm3d"
    residual = pytest.importorskip("dynamic_network_architectures.building_blocks.residual")
    torch.manual_seed(0)
    block = residual.BasicBlockD(
        nn.Conv2d,
        4,
        8,
        3,
        2,
        False,
        nn.InstanceNorm2d,
        {"affine": True},
        None,
        None,
        nn.LeakyReLU,
        {"inplace": True},
        squeeze_excitation=True,
    ).double()
    fused, report = unet_fast.fuse(copy.deepcopy(block), report=True)
    assert sorted(report.fused) == ["conv1.all_modules", "conv2.all_modules", "skip"]
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    assert_close(step(fused, x, True), step(block, x, True), torch.float64)


def test_basic_unets_upcat_pads_only_where_sizes_differ():
    torch.manual_seed(0)
    original = basic_unet(2)
    fused, report = unet_fast.fuse(copy.deepcopy(original), report=True)
    upcats = [name for name, m in original.named_modules() if type(m).__name__ == "UpCat"]
    ups = [name for name, m in original.named_modules() if type(m) is nn.ConvTranspose2d]
    assert len(upcats) == 4 and sorted(report.leaner) == sorted(upcats + ups)
    assert all(type(fused.get_submodule(name)).__name__ == "LeanUpCat" for name in upcats)
    assert "lean  upcat_1: UpCat pads only where sizes differ" in str(report)

    def pads(model, shape):
        """How many replicate paddings the autograd graph of a training forward holds."""
        nodes, stack = set(), [model.train()(torch.randn(shape)).grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                stack.extend(f for f, _ in node.next_functions)
        return sum(type(n).__name__.startswith("ReplicationPad") for n in nodes)

    assert (pads(original, (2, 1, 32, 32)), pads(fused, (2, 1, 32, 32))) == (4, 0)
    assert pads(fused, (2, 1, 30, 35)) == pads(original, (2, 1, 30, 35)) > 0


def test_fused_convolutions_and_poolings_read_recipes_and_still_pickle(tmp_path):
    """fuse() swaps the network's convolutions and max poolings for their recipe-reading
    classes: the same modules, parameters and keys; the whole model still saves and loads."""
    torch.manual_seed(0)
    original = basic_unet(2).double()
    fused = unet_fast.fuse(copy.deepcopy(original))
    kinds = {type(m).__name__ for m in fused.modules()}
    assert {"RecipeConv2d", "RecipeConvTranspose2d", "RecipeMaxPool2d"} <= kinds
    assert not kinds & {"Conv2d", "ConvTranspose2d", "MaxPool2d"}
    assert list(fused.state_dict()) == list(original.state_dict())
    torch.save(fused, tmp_path / "fused.pt")
    again = torch.load(tmp_path / "fused.pt", weights_only=False)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    assert_close(step(again, x, True), step(original, x, True), torch.float64)
