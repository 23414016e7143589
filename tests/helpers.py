"""Shared test helpers: layouts, DESIGN.md's tolerances, the bfloat16 rule, training histories."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through the interpreter
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels_last or a strided view."""
    if name == "contiguous":
        return x.contiguous()
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if name == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(name)


LAYOUTS = ["contiguous", "channels_last", "strided"]


def assert_close(got, want, dtype):
    """DESIGN.md's tolerances: float64 ~1e-10, float32 ~1e-5 relative to the tensor's scale."""
    pairs = zip(got, want, strict=True) if isinstance(got, (tuple, list)) else [(got, want)]
    for g, w in pairs:
        scale = max(w.abs().max().item(), 1.0) if w.numel() else 1.0
        tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale, equal_nan=True)


def rms(t: torch.Tensor) -> float:
    return t.double().square().mean().sqrt().item()


def assert_bf16_within_rule(got, ref_bf16, ref_f64):
    """bfloat16: RMS error against a float64 run on the same (bfloat16-valued) inputs at most 2x
    the RMS error of the reference run in bfloat16. RMS, not max: a ReLU whose input rounds across
    zero flips one gradient element, in ours or the reference's, at random."""
    assert len(got) == len(ref_bf16) == len(ref_f64)
    for g, r, exact in zip(got, ref_bf16, ref_f64, strict=True):
        ours, theirs = rms(g.double() - exact), rms(r.double() - exact)
        assert ours <= 2 * theirs + 1e-6 * rms(exact), (ours, theirs)


def bf16_rule_runs(ours, ref, x, training: bool):
    """[output, parameter gradients] of `ours` in bfloat16, `ref` in bfloat16 and `ref` in
    float64, all on the same bfloat16-rounded weights and input (for assert_bf16_within_rule)."""
    results = []
    for model, dtype in ((ours, torch.bfloat16), (ref, torch.bfloat16), (ref, torch.float64)):
        model = copy.deepcopy(model).to(x.device, dtype).train(training)
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(torch.bfloat16))
        out = model(x.to(torch.bfloat16).to(dtype))
        out.double().square().mean().backward()
        results.append([out] + [p.grad for p in model.parameters()])
    return results


def training_history(model, x, steps=3, lr=0.01):
    """Outputs, parameter gradients and buffers over SGD steps (a loss that keeps values
    moderate), with an eval pass after each step. Models may return a list of outputs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    as_list = lambda out: out if isinstance(out, list) else [out]  # noqa: E731
    history = []
    for _ in range(steps):
        model.train()
        outs = as_list(model(x))
        optimizer.zero_grad()
        sum(
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).mean()
            for o in outs
        ).backward()
        history.append([o.detach() for o in outs] + [p.grad.clone() for p in model.parameters()])
        optimizer.step()
        model.eval()
        with torch.no_grad():
            history.append(as_list(model(x)))
    return history + [list(model.buffers())]


def assert_histories_close(got, want, dtype, float32_tol=1e-4):
    tol = {torch.float64: 1e-10, torch.float32: float32_tol}[dtype]
    for g_step, w_step in zip(got, want, strict=True):
        for g, w in zip(g_step, w_step, strict=True):
            scale = max(w.abs().max().item(), 1.0)
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale)


def printed_on_import(code: str, variable: str, value: str) -> str | None:
    """What `code` prints (its last word) in a fresh interpreter with the environment `variable`
    set to `value`; None when it fails, after checking that the error names the variable."""
    env = dict(os.environ, **{variable: value})
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        assert variable in run.stderr, run.stderr
        return None
    return run.stdout.split()[-1]


def poison(t: torch.Tensor) -> torch.Tensor:
    """A copy of t (same layout) with NaN, +Inf and -Inf at three places around its middle, as a
    corrupted image or weight would carry them."""
    flat = t.detach().flatten().clone()
    for i, value in enumerate((float("nan"), float("inf"), -float("inf"))):
        flat[(flat.numel() // 2 + 37 * i) % flat.numel()] = value
    return torch.empty_like(t).copy_(flat.view(t.shape))


class DispatchedOps(TorchDispatchMode):
    """The names ("unet_fast.up_conv_backward", "aten.mm", ...) of the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
