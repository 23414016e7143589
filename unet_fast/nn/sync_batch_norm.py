"""BatchNorm + ReLU with statistics synchronised across processes (DistributedDataParallel).

Forward: one all-reduce of each layer's per-channel sum, sum of squares and count, then the
fused normalise + ReLU kernel with the global statistics. Backward: one all-reduce of the two
per-channel gradient sums. Runs on any backend torch.distributed supports, gloo on the CPU
included (torch.nn.SyncBatchNorm needs CUDA). Parameter gradients stay local: DDP averages them.
"""

import torch
import torch.distributed as dist

from .. import _backend
from .._common import bn_affine, stats_dtype, update_running_stats


def _channels(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _apply(y, weight, bias, mean, invstd):
    """relu(bn(y)) with given statistics: the fused kernel where one is built, else ATen."""
    acc = stats_dtype(y)
    mean, invstd = mean.to(acc), invstd.to(acc)
    if _backend.resolve("auto", y.device, "conv_bn_relu") in ("cpu", "cuda"):
        return torch.ops.unet_fast.batch_norm_relu_apply(y, weight, bias, mean, invstd)
    scale, shift = bn_affine(mean, invstd, weight, bias)
    return torch.relu(y * _channels(scale.to(acc)) + _channels(shift.to(acc))).to(y.dtype)


class SyncBatchNormReLU(torch.autograd.Function):
    """relu(batch_norm(y)) with the batch statistics of every process in `group`: (out, mean,
    unbiased var), the statistics in float64 for the running averages."""

    @staticmethod
    def forward(ctx, y, weight, bias, eps, group):
        c = y.shape[1]
        count = y.numel() // max(c, 1)
        stats = torch.cat(
            [
                y.sum((0, 2, 3), dtype=torch.float64),
                y.double().square().sum((0, 2, 3)),
                torch.tensor([float(count)], dtype=torch.float64, device=y.device),
            ]
        )
        dist.all_reduce(stats, group=group)
        total = stats[-1].item()
        if total <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{int(total)} across all processes"
            )
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean.square()).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        out = _apply(y, weight, bias, mean, invstd)
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.group, ctx.total = group, total
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var * total / (total - 1)

    @staticmethod
    def backward(ctx, grad_out, _mean, _var):
        y, weight, bias, mean, invstd = ctx.saved_tensors
        scale, shift = bn_affine(mean, invstd, weight, bias)
        compute = stats_dtype(y)
        y_c = y.to(compute)
        # the kernels' mask (F.relu's, NaN passes) with float coefficients
        mask = ~(y_c * _channels(scale.to(compute)) + _channels(shift.to(compute)) <= 0)
        a = torch.where(mask, grad_out.to(compute), 0)
        centred = y_c - _channels(mean.to(compute))
        local = torch.cat(
            [
                a.sum((0, 2, 3), dtype=torch.float64),
                (a * centred).sum((0, 2, 3), dtype=torch.float64),
            ]
        )
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        c = y.shape[1]
        mean_a, mean_b = sums[:c] / ctx.total, sums[c:] / ctx.total
        grad_y = _channels(scale.to(compute)) * (
            a
            - _channels(mean_a.to(compute))
            - centred * _channels((invstd.square() * mean_b).to(compute))
        )
        grad_weight = None if weight is None else (local[c:] * invstd).to(weight.dtype)
        grad_bias = None if bias is None else local[:c].to(bias.dtype)
        return grad_y.to(y.dtype), grad_weight, grad_bias, None, None


def sync_batch_norm_relu(y, weight, bias, eps, running_mean, running_var, momentum, group):
    """Synchronised BN + ReLU in training, updating the running statistics (if given)."""
    out, mean, var = SyncBatchNormReLU.apply(y, weight, bias, eps, group)
    update_running_stats(running_mean, running_var, mean, var, momentum, 1)
    return out
