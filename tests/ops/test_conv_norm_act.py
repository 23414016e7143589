"""conv_norm_act_chain against the same layers as modules: outputs, every gradient, running
statistics; what it keeps for backward; on cpu and (through the interpreter) triton."""

import copy

import pytest
import torch
from torch import nn

from tests.helpers import assert_bf16_within_rule, assert_close, rms
from unet_fast import _backend
from unet_fast.nn.conv_norm_act import chain_layer, find_runs, leaves
from unet_fast.nn.recipe import read_recipes
from unet_fast.ops.conv_norm_act import conv_norm_act_chain

pytestmark = pytest.mark.skipif(
    _backend.EXTENSION_ERROR is not None, reason="unet_fast._C is not built"
)


def stack(dims):
    """Four layers: a strided anisotropic conv with bias, a dilated grouped conv, two plain
    ones; InstanceNorm (affine), GroupNorm, BatchNorm, InstanceNorm; LeakyReLU, ReLU, nothing,
    PReLU (a slope of each sign per channel)."""
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    kernel = (1, 3, 3) if dims == 3 else (1, 3)
    padding = (0, 1, 1) if dims == 3 else (0, 1)
    instance_norm = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
    prelu = nn.PReLU(5)
    prelu.weight.data.uniform_(-0.5, 0.5)
    return nn.Sequential(
        conv(3, 8, kernel, stride=2, padding=padding, bias=True),
        instance_norm(8, affine=True),
        nn.LeakyReLU(0.01),
        conv(8, 8, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        conv(8, 6, 3, padding=1),
        (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(6),
        conv(6, 5, 3, padding=1),
        instance_norm(5),
        prelu,
    )


def step(fn, model, x):
    out = fn(x)
    out.mul(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out, x.grad, *[p.grad for p in model.parameters()], *model.buffers()]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_chain_matches_the_modules(dims, x_layout):
    torch.manual_seed(0)
    model = stack(dims).double()
    twin = copy.deepcopy(model)
    shape = (2, 3, 6, 10, 12) if dims == 3 else (2, 3, 10, 12)
    x = torch.randn(shape, dtype=torch.float64)
    if x_layout == "channels_last":
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        x, model = x.contiguous(memory_format=fmt), model.to(memory_format=fmt)
    runs, _ = find_runs(leaves(model))
    layers = [chain_layer(run) for run in runs]
    assert len(layers) == 4 and all(layers)
    got = step(
        lambda t: conv_norm_act_chain(t, layers, backend="cpu"), model, x.clone().requires_grad_()
    )
    want = step(twin, twin, x.clone().requires_grad_())
    assert_close(got, want, torch.float64)


@pytest.mark.skipif(
    not _backend.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="triton: not installed, or no GPU and TRITON_INTERPRET unset",
)
def test_chain_on_triton_within_twice_the_modules_float32_error():
    """float32 against the float64 truth (the last conv's bias gradient is analytically zero
    under BatchNorm, so two float32 runs agree on it only to rounding)."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = stack(2).to(device)
    twin, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(2, 3, 10, 12, device=device)
    layers = [chain_layer(run) for run in find_runs(leaves(model))[0]]
    got = step(
        lambda t: conv_norm_act_chain(t, layers, backend="triton"),
        model,
        x.clone().requires_grad_(),
    )
    theirs = step(twin, twin, x.clone().requires_grad_())
    truth = step(exact, exact, x.double().requires_grad_())
    got, theirs, truth = [[t.cpu() for t in ts] for ts in (got, theirs, truth)]
    zero = [i for i, t in enumerate(truth) if rms(t) < 1e-8]  # biases right before a norm
    assert zero == [3, 10, 14]
    for i in zero:  # rounding noise of sums that cancel exactly: a float32 size, no more
        assert rms(got[i]) < 1e-5 and rms(theirs[i]) < 1e-5
    kept = [i for i in range(len(truth)) if i not in zero]
    assert_bf16_within_rule(*[[ts[i] for i in kept] for ts in (got, theirs, truth)])


def test_chain_keeps_its_input_and_the_conv_outputs_only():
    torch.manual_seed(0)
    model = stack(2)
    x = torch.randn(2, 3, 10, 12, requires_grad=True)
    layers = [chain_layer(run) for run in find_runs(leaves(model))[0]]
    params = {p.data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = conv_norm_act_chain(x, layers, backend="cpu")
    activations = [t for t in saved if t.dim() == 4 and t.data_ptr() not in params]
    # x and the four conv outputs, never an activation between the layers (nor the output)
    assert len(activations) == 5 and activations[0] is x
    assert all(t.data_ptr() != out.data_ptr() for t in activations)


def two_chains(dims=2):
    """stack()'s first two layers, then a strided pair as nnU-Net's next stage: two chains."""
    torch.manual_seed(0)
    first = nn.Sequential(*list(stack(dims))[:6]).double()
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    second = nn.Sequential(
        conv(8, 6, 3, stride=2, padding=1),
        nn.GroupNorm(2, 6),
        nn.LeakyReLU(0.1),
        conv(6, 6, 3, padding=1),
        nn.GroupNorm(3, 6),
        nn.ReLU(),
    ).double()
    return first, second


@pytest.mark.parametrize("in_place", [False, True], ids=["as_made", "changed_in_place"])
def test_a_chain_keeps_the_recipe_of_the_chain_output_it_reads(in_place):
    first, second = two_chains()
    twin = nn.Sequential(copy.deepcopy(first), copy.deepcopy(second))
    chains = [[chain_layer(run) for run in find_runs(leaves(m))[0]] for m in (first, second)]
    model = nn.Sequential(first, second)

    made = []

    def fused(x):
        h = conv_norm_act_chain(x, chains[0], backend="cpu")
        if in_place:  # voids the recipe: the second chain keeps h itself
            h.mul_(1.5)
        made.append(h)
        return conv_norm_act_chain(h, chains[1], backend="cpu")

    def modules(x):
        h = twin[0](x)
        return twin[1](h.mul(1.5) if in_place else h)

    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = step(fused, model, x.clone().requires_grad_())
    want = step(modules, twin, x.clone().requires_grad_())
    assert_close(got, want, torch.float64)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert (made[0].untyped_storage().data_ptr() in storages) == in_place


@pytest.mark.parametrize(
    "reader",
    [
        lambda: nn.ConvTranspose2d(8, 4, 2, stride=2),
        lambda: nn.Conv2d(8, 3, 1),
        lambda: nn.Conv2d(8, 3, 3, padding=2, dilation=2, groups=1, bias=False),
        lambda: nn.MaxPool2d(2),
        lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    ],
    ids=["transposed", "1x1", "dilated", "pool", "pool-ceil"],
)
def test_convolutions_and_poolings_keep_a_chain_outputs_recipe(reader):
    first, _ = two_chains()
    torch.manual_seed(1)
    plain = reader().double()
    swapped = copy.deepcopy(plain)
    read_recipes(swapped)
    assert type(swapped).__name__ == "Recipe" + type(plain).__name__
    twin = nn.Sequential(copy.deepcopy(first), plain)
    layers = [chain_layer(run) for run in find_runs(leaves(first))[0]]
    model = nn.Sequential(first, swapped)
    made = []

    def fused(x):
        made.append(conv_norm_act_chain(x, layers, backend="cpu"))
        return swapped(made[-1])

    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = step(fused, model, x.clone().requires_grad_())
    assert_close(got, step(twin, twin, x.clone().requires_grad_()), torch.float64)
    assert made[0].untyped_storage().data_ptr() not in {
        t.untyped_storage().data_ptr() for t in saved
    }
    with torch.no_grad():  # no gradient: the module's own forward
        assert_close(swapped(made[0]), plain(made[0]), torch.float64)
