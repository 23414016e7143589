"""The fused modules against the nn.Sequential they replace: state_dict, training, eval, caching."""

import copy
import pickle

import pytest
import torch
from torch import nn

from tests import tutorial_unet
from tests.helpers import (
    assert_bf16_within_rule,
    assert_close,
    assert_histories_close,
    training_history,
)
from unet_fast import ops, reference
from unet_fast.nn import CropConcat, FusedConvBNReLU, FusedDoubleConv
from unet_fast.ops.conv_bias_relu import _frozen, frozen_entries


def pair(cls, *args, dtype=torch.float64, **kw):
    """A fused module and a plain nn.Sequential copy of it with the same weights."""
    fused = cls(*args, **kw).to(dtype)
    with torch.no_grad():
        for module in fused.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
    plain = copy.deepcopy(fused)
    plain.__class__ = nn.Sequential
    return fused, plain


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls, args", [(FusedConvBNReLU, (3, 8)), (FusedDoubleConv, (3, 8, 5))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_eval_train_eval_matches_sequential(cls, args, dtype, channels_last):
    fused, plain = pair(cls, *args, dtype=dtype)
    x = torch.randn(2, 3, 17, 12, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_histories_close(
        training_history(fused, x, lr=0.05),
        training_history(plain, x, lr=0.05),
        dtype,
        float32_tol=1e-5,
    )


def test_state_dict_keys_match_and_tutorial_checkpoints_load():
    fused, plain = pair(FusedDoubleConv, 3, 8)
    assert list(fused.state_dict()) == list(plain.state_dict())
    tutorial = tutorial_unet.DoubleConv(3, 8)
    fused.load_state_dict(tutorial.double_conv.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(fused.float().eval()(x), tutorial.eval()(x), torch.float32)
    assert list(FusedConvBNReLU(3, 4).state_dict()) == list(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).state_dict()
    )


def test_folded_weights_follow_every_change():
    fused, plain = pair(FusedDoubleConv, 3, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused.eval(), plain.eval()
    with torch.no_grad():
        first = fused(x)
        assert fused(x) is not first and torch.equal(fused(x), first)  # cached folding, same value
        for model in (fused, plain):  # a checkpoint loaded in eval mode
            model[4].running_var.mul_(3.0)
            model[0].weight.add_(0.1)
        assert_close(fused(x), plain(x), torch.float64)
        fused.load_state_dict(pair(FusedDoubleConv, 3, 4)[1].state_dict())
        plain.load_state_dict(fused.state_dict())
        assert_close(fused(x), plain(x), torch.float64)


def test_autocast_eval_caches_folded_weights_per_dtype():
    """Under autocast the folded weights are cast (and prepacked) once per dtype, kept beside the
    float32 ones, and rebuilt when a parameter changes, as the float32 cache is."""
    fused, plain = pair(FusedConvBNReLU, 3, 4)
    fused, plain = fused.float().eval(), plain.float().eval()
    x = torch.randn(2, 3, 8, 8)
    entries = frozen_entries(fused[0].weight)
    with torch.no_grad():
        fused(x)
        with torch.autocast("cpu", torch.bfloat16):
            got = fused(x)
            cached = entries[torch.bfloat16][1][0]
            fused(x)
            assert entries[torch.bfloat16][1][0] is cached  # not folded again
            want = plain(x)
        assert set(entries) == {torch.float32, torch.bfloat16}
        assert got.dtype == want.dtype == torch.bfloat16
        assert_bf16_within_rule([got], [want], [plain.double()(x.double())])
        plain.float()
        for model in (fused, plain):
            model[1].running_mean.add_(1.0)
        with torch.autocast("cpu", torch.bfloat16):
            assert fused(x).dtype == torch.bfloat16
            assert entries[torch.bfloat16][1][0] is not cached
            assert_bf16_within_rule([fused(x)], [plain(x)], [plain.double()(x.double())])


def test_compiled_inference_keeps_the_folded_weights_and_sees_changes():
    """torch.compile leaves the frozen op opaque: a compiled eval model folds once, refolds when a
    statistic changes, and matches the plain model; a freed weight takes its entry with it."""
    fused, plain = pair(FusedConvBNReLU, 3, 4)
    fused, plain = fused.float().eval(), plain.float().eval()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    entries = frozen_entries(fused[0].weight)
    with torch.no_grad():
        assert_close(compiled(x), plain(x), torch.float32)
        cached = entries[torch.float32][1][0]
        compiled(x)
        assert entries[torch.float32][1][0] is cached
        for model in (fused, plain):
            model[1].running_var.mul_(4.0)
        assert_close(compiled(x), plain(x), torch.float32)
        assert entries[torch.float32][1][0] is not cached
    key = id(fused[0].weight)
    assert key in _frozen
    del fused, compiled, entries, cached
    torch._dynamo.reset()
    assert key not in _frozen


def test_frozen_op_refuses_parameters_that_need_gradients():
    fused, _ = pair(FusedConvBNReLU, 3, 4)
    conv, bn = fused[0], fused[1]
    x = torch.randn(2, 3, 8, 8, dtype=conv.weight.dtype)
    args = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, 1e-5, 1)
    with pytest.raises(ValueError, match="need gradients"):
        ops.conv_bn_relu_frozen(x, *args)


def test_momentum_none_is_a_cumulative_average_and_untracked_stats_work():
    for kw in ({"momentum": None}, {"track_running_stats": False}):
        fused, plain = pair(FusedConvBNReLU, 3, 4)
        for model in (fused, plain):
            model[1] = nn.BatchNorm2d(4, **kw).double()
        fused = FusedConvBNReLU.from_modules(*plain)  # shares parameters with `plain`
        twin = copy.deepcopy(plain)
        x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
        for _ in range(3):
            assert_close(fused.train()(x + _), twin.train()(x + _), torch.float64)
        assert_close(list(plain.buffers()), list(twin.buffers()), torch.float64)
        with torch.no_grad():
            assert_close(fused.eval()(x), twin.eval()(x), torch.float64)


def test_eval_mode_gradients_reach_every_parameter():
    fused, plain = pair(FusedDoubleConv, 3, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for model in (fused.eval(), plain.eval()):
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert_close(grads[0], grads[1], torch.float64)


def test_deepcopy_pickle_and_from_modules():
    fused, _ = pair(FusedDoubleConv, 3, 4)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = fused.eval()(x)
        for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert_close(clone(x), expected, torch.float64)
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedConvBNReLU.from_modules(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4))


def test_reference_backend_runs_the_plain_sequential():
    fused, plain = pair(FusedDoubleConv, 3, 4, backend="reference")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert fused(x).grad_fn.name() == plain(x).grad_fn.name()  # ReLU, not the fused op


def test_crop_concat_module():
    skip, up = torch.randn(2, 3, 9, 9), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(CropConcat()(skip, up), reference.crop_concat(skip, up, (9, 9)))
