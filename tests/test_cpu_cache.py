"""The CPU kernels' cache of large freed buffers (csrc/cpu/buffer_cache.cpp): reuse, its limit,
and no stale value ever reaching a result."""

import copy
import multiprocessing
import sys
import threading

import pytest
import torch

import unet_fast
from tests.helpers import printed_on_import
from unet_fast import ops
from unet_fast._backend import EXTENSION_ERROR

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason="needs the C++ extension")

LIMIT = 1 << 30
BIG = (2, 32, 128, 128)  # 4 MiB of float32: the smallest size the cache keeps


@pytest.fixture(autouse=True)
def fresh_cache():
    limit = unet_fast.cpu_cache_info()["limit_bytes"]
    unet_fast.empty_cache(LIMIT)
    yield
    unet_fast.empty_cache(limit)


def test_a_freed_buffer_serves_the_next_tensor_of_its_size():
    x = torch.randn(BIG)
    ops.crop_concat(x, x)  # freed at once: now cached
    before = unet_fast.cpu_cache_info()
    assert before["cached_bytes"] == 2 * x.nbytes
    out = ops.crop_concat(x, x)
    after = unet_fast.cpu_cache_info()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert after["cached_bytes"] == 0
    torch.testing.assert_close(out, torch.cat([x, x], 1), rtol=0, atol=0)


def test_small_tensors_bypass_the_cache():
    x = torch.randn(1, 8, 32, 32)
    before = unet_fast.cpu_cache_info()
    ops.crop_concat(x, x)
    assert unet_fast.cpu_cache_info() == before


def test_limit_evicts_the_oldest_and_empty_cache_frees_all():
    small, large = torch.randn(BIG), torch.randn(2, 64, 128, 128)
    unet_fast.empty_cache(3 * small.nbytes)
    ops.crop_concat(small, small)  # 2 units cached
    ops.crop_concat(large, small)  # 3 units: the 2-unit buffer goes
    info = unet_fast.cpu_cache_info()
    assert info["cached_bytes"] == 3 * small.nbytes
    ops.crop_concat(small, small)  # must miss: its size was evicted
    assert unet_fast.cpu_cache_info()["misses"] == info["misses"] + 1
    ops.crop_concat(large, large)  # 4 units: over the limit, freed at once
    assert unet_fast.cpu_cache_info()["cached_bytes"] <= 3 * small.nbytes
    unet_fast.empty_cache()
    info = unet_fast.cpu_cache_info()
    assert info["cached_bytes"] == 0 and info["limit_bytes"] == 3 * small.nbytes


def test_limit_zero_keeps_nothing():
    unet_fast.empty_cache(0)
    x = torch.randn(BIG)
    hits = unet_fast.cpu_cache_info()["hits"]
    for _ in range(3):
        ops.crop_concat(x, x)
    info = unet_fast.cpu_cache_info()
    assert info["cached_bytes"] == 0 and info["hits"] == hits


def test_a_cached_tensor_resizes_like_any_other():
    x = torch.randn(BIG)
    out = ops.crop_concat(x, x)
    grown = out.resize_(3, *out.shape[1:])  # a larger storage: the allocator's own path
    torch.testing.assert_close(grown[:2], torch.cat([x, x], 1), rtol=0, atol=0)


def test_padding_is_written_not_inherited():
    """Fresh pages are zero, cached ones are not: crop_concat must write its zero padding."""
    nan = torch.full(BIG, float("nan"))
    ops.crop_concat(nan, nan)  # a NaN-filled buffer of the next output's size, cached
    skip, up = torch.randn(BIG), torch.randn(2, 32, 100, 100)
    hits = unet_fast.cpu_cache_info()["hits"]
    out = ops.crop_concat(skip, up)
    assert unet_fast.cpu_cache_info()["hits"] == hits + 1
    want = unet_fast.reference.crop_concat(skip, up, skip.shape[-2:])
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_training_step_is_the_same_with_and_without_the_cache(channels_last, norm):
    """A UNet training step (every CPU kernel: joins, poolings, up_conv, recomputation) right
    after a step on NaN input, against the same step with the cache off."""
    torch.manual_seed(0)
    model = unet_fast.UNet(3, 2, 16, bilinear=False, norm=norm, act="relu")
    x = torch.randn(2, 3, 192, 192)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(model, x):
        out = model(x)
        out.square().mean().backward()
        return [out.detach()] + [p.grad for p in model.parameters()]

    def run(limit):
        """The step's results after a step on NaN input, and the cache hits of the second step."""
        unet_fast.empty_cache(limit)
        step(copy.deepcopy(model), torch.full_like(x, float("nan")))
        hits = unet_fast.cpu_cache_info()["hits"]
        results = step(copy.deepcopy(model), x)
        return results, unet_fast.cpu_cache_info()["hits"] - hits

    (with_cache, hits), (without, no_hits) = run(LIMIT), run(0)
    assert hits > 0 and no_hits == 0
    for got, want in zip(with_cache, without, strict=True):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want)


def test_threads_share_the_cache_safely():
    inputs = [torch.randn(2, 16 * (i + 1), 128, 128) for i in range(4)]
    errors = []

    def work(x):
        try:
            for _ in range(10):
                torch.testing.assert_close(ops.crop_concat(x, x), torch.cat([x, x], 1))
        except Exception as error:  # surfaced in the main thread below
            errors.append(error)

    before = unet_fast.cpu_cache_info()
    threads = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = unet_fast.cpu_cache_info()
    assert info["hits"] + info["misses"] - before["hits"] - before["misses"] == 40


def _child_sum(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: GNU OpenMP's team does not survive a fork
    x = torch.ones(BIG)
    queue.put(ops.crop_concat(x, x).sum().item())


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_runs_with_its_own_cache():
    x = torch.ones(BIG)
    ops.crop_concat(x, x)  # the parent holds a cached buffer when it forks
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_sum, args=(queue,), daemon=True)
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and result == 2 * x.numel()


@pytest.mark.parametrize("value, ok", [("0", True), ("64", True), ("lots", False), ("-1", False)])
def test_the_limit_comes_from_the_environment(value, ok):
    code = "import unet_fast; print(unet_fast.cpu_cache_info()['limit_bytes'])"
    printed = printed_on_import(code, "UNET_FAST_CPU_CACHE_MIB", value)
    assert printed == (str(int(value) << 20) if ok else None)


def test_negative_limit_is_refused():
    with pytest.raises(ValueError, match="limit_bytes"):
        unet_fast.empty_cache(-1)
