"""unet_fast.UNet on the Triton backend (through Triton's interpreter without a GPU) and on CUDA,
against the reference UNet."""

import pytest
import torch

import unet_fast
from tests.helpers import assert_histories_close, layout, needs_cuda, training_history
from unet_fast import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_unet_on_the_triton_backend_matches_reference():
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False, backend="triton").to(DEVICE)
    ref = reference.UNet(3, 2, base_features=4, bilinear=False).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    results = []
    for model in (ours, ref):
        out = model(x)
        out.square().mean().backward()
        results.append([out] + [p.grad for p in model.parameters()] + list(model.buffers()))
        with torch.no_grad():
            results[-1].append(model.eval()(x))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=1e-4 * max(want.abs().max().item(), 1)
        )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32])
def test_unet_on_cuda_matches_reference(dtype):
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False).to("cuda", dtype)
    ref = reference.UNet(3, 2, base_features=4, bilinear=False).to("cuda", dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 37, 45, device="cuda", dtype=dtype)
    assert_histories_close(training_history(ours, x), training_history(ref, x), dtype)


@needs_cuda
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_bfloat16_unet_on_gpu_within_the_rule(x_layout, backend, training):
    """A bfloat16 UNet on each GPU backend: RMS error against float64 at most twice the
    reference's own bfloat16 error (DESIGN.md's rule), outputs and parameter gradients."""
    from tests.helpers import assert_bf16_within_rule, bf16_rule_runs

    ours = unet_fast.UNet(3, 2, base_features=8, bilinear=False, backend=backend)
    ref = reference.UNet(3, 2, base_features=8, bilinear=False)
    ref.load_state_dict(ours.state_dict())
    x = layout(torch.randn(2, 3, 40, 48, device="cuda", dtype=torch.float64), x_layout)
    assert_bf16_within_rule(*bf16_rule_runs(ours, ref, x, training))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_a_corrupted_image_gives_nan_as_the_tutorials_model_does(backend, training):
    """NaN and ±Inf pixels reach the output and the gradients exactly where the reference UNet
    puts them: convolutions, BatchNorm, ReLU (folded or not), pooling and joins alike."""
    device = DEVICE if backend == "triton" else "cpu"
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False, backend=backend).to(device)
    ref = reference.UNet(3, 2, base_features=4, bilinear=False).to(device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 32, 32, device=device)
    x[0, 1, 5, 7], x[0, 0, 20, 3], x[0, 2, 30, 30] = float("nan"), float("inf"), -float("inf")
    results = []
    for model in (ours, ref):
        model.train(training)
        out = model(x)
        assert out.isnan().any()
        out.nan_to_num().sum().backward()
        results.append([out, *[p.grad for p in model.parameters()], *model.buffers()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, equal_nan=True)
