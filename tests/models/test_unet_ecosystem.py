"""unet_fast.UNet with the rest of PyTorch: compile, export, inference mode, autocast, pickling."""

import copy
import io
import pickle

import pytest
import torch

import unet_fast
from tests.helpers import assert_bf16_within_rule, assert_close
from unet_fast import reference


def twins(**kw):
    ref = reference.UNet(3, 2, base_features=4, bilinear=False, **kw)
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    ours, ref = twins()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    out = compiled(x)
    assert_close(out, ref(x), torch.float32)
    out.sum().backward()  # through the compiled backward
    assert all(p.grad is not None for p in ours.parameters())
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_close(compiled(x), ref(x), torch.float32)


def test_torch_export_for_inference():
    ours, ref = twins()
    ours.eval(), ref.eval()
    x = torch.randn(1, 3, 32, 32)
    program = torch.export.export(ours, (x,))
    with torch.no_grad():
        assert_close(program.module()(x), ref(x), torch.float32)


def test_inference_mode_and_autocast_bfloat16():
    ours, ref = twins()
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert_close(ours(x), ref(x), torch.float32)
        with torch.autocast("cpu", torch.bfloat16):
            got, want = ours(x), ref(x)
        exact = ref.double()(x.double())
    assert got.dtype == want.dtype == torch.bfloat16
    assert_bf16_within_rule([got], [want], [exact])


def test_training_under_autocast_matches_reference_rule():
    ours, ref = twins()
    x = torch.randn(2, 3, 32, 32)
    results = []
    for model in (ours, ref):
        with torch.autocast("cpu", torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results.append([out, *[p.grad for p in model.parameters()]])
    exact_model = copy.deepcopy(ref).double()
    exact_model.zero_grad()
    out = exact_model(x.double())
    out.square().mean().backward()
    exact = [out, *[p.grad for p in exact_model.parameters()]]
    assert_bf16_within_rule(results[0][:1], results[1][:1], exact[:1])  # outputs
    assert_bf16_within_rule(results[0][1:], results[1][1:], exact[1:])  # every parameter gradient


@pytest.mark.parametrize("clone", ["deepcopy", "pickle", "state_dict_bytes"])
def test_copies_compute_the_same(clone):
    ours, _ = twins()
    x = torch.randn(2, 3, 32, 32)
    ours.eval()
    with torch.no_grad():
        expected = ours(x)  # also fills the folded-weight caches, which copies must not carry
        if clone == "deepcopy":
            other = copy.deepcopy(ours)
        elif clone == "pickle":
            other = pickle.loads(pickle.dumps(ours))
        else:
            buffer = io.BytesIO()
            torch.save(ours.state_dict(), buffer)
            other = unet_fast.UNet(3, 2, base_features=4, bilinear=False).eval()
            other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_onnx_export_is_a_standard_graph_that_onnxruntime_runs(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    ours, ref = twins()
    ours.eval(), ref.eval()
    x = torch.randn(1, 3, 32, 32)
    program = torch.onnx.export(ours, (x,), dynamo=True)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert ops <= {
        "Conv",
        "ConvTranspose",
        "Relu",
        "MaxPool",
        "Concat",
        "Pad",
        "BatchNormalization",
        "Slice",
        "Add",
        "Mul",
    }, ops
    program.save(str(tmp_path / "unet.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "unet.onnx"))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(out), ref(x), torch.float32)


def test_distributed_data_parallel_wraps_it():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ours, ref = twins()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(ours)
        x = torch.randn(2, 3, 32, 32)
        model(x).square().mean().backward()
        ref(x).square().mean().backward()
        assert_close(
            [p.grad for p in ours.parameters()], [p.grad for p in ref.parameters()], torch.float32
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "shape, dtype, error, message",
    [
        ((3, 32, 32), torch.float32, ValueError, r"4-D input \(N, 3, H, W\)"),
        ((1, 1, 32, 32), torch.float32, ValueError, "expects 3 input channels"),
        ((1, 3, 32, 32), torch.int64, TypeError, "floating-point"),
        ((1, 3, 12, 32), torch.float32, ValueError, "minimum is 16"),
    ],
)
def test_bad_input_raises_a_clear_error(shape, dtype, error, message):
    ours, _ = twins()
    with pytest.raises(error, match=message):
        ours(torch.zeros(shape, dtype=dtype))
