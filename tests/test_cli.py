"""The `unet-fast` command: a tiny bench end to end, and bad input as one line on stderr."""

import json

import pytest
import torch

from unet_fast import _backend, cli


def test_bench_reports_every_figure(tmp_path, capsys):
    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert (
        cli.main(
            [
                "bench",
                "--size",
                "32",
                "--base-features",
                "4",
                "--rounds",
                "1",
                "--warmup",
                "0",
                "--quiet",
                "--json",
                str(path),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "float32" in text and "bfloat16" in text and "of one large conv's" in text
    result = json.loads(path.read_text())
    assert [run["dtype"] for run in result["runs"]] == ["float32", "bfloat16"]
    for run in result["runs"]:
        for mode in ("inference", "train"):
            assert run[f"candidate_{mode}_images_per_s"] > 0
            assert run[f"candidate_{mode}_flops_per_s"] > 0
        assert run["candidate_saved_bytes"] < 0.7 * run["baseline_saved_bytes"]
        assert run["gradient_diff"][2] is True and run["inference_output_diff"][2] is True
    assert result["runs"][0]["forward_flops"] > 0 and png.stat().st_size > 1000
    if result["config"]["backend"] == "cpu":  # the CPU kernels' buffer cache is named, with its use
        cache = result["cpu_cache"]
        assert f"(limit {cache['limit_bytes'] >> 20} MiB" in text
        assert f"{cache['hits']} reused, {cache['misses']} new" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--device", "cuda"], "no CUDA GPU is available"),
        (["bench", "--batch", "1"], "--batch must be at least 2"),
        (["bench", "--size", "8", "--quiet"], "too small for 4 poolings"),
    ],
)
def test_bench_bad_input_is_one_line_on_stderr(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--backend", "fast"], "invalid choice: 'fast'"),
        (["bench", "--rounds", "x"], "invalid int value"),
    ],
)
def test_bad_arguments_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_bench_autocast_times_the_drop_in_case_against_both_layouts(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["bench", "--size", "32", "--base-features", "4", "--rounds", "1", "--warmup", "0"]
    assert cli.main([*args, "--quiet", "--autocast", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "under torch.autocast" in text and "channels_last" in text and "vs ch-last" in text
    (run,) = json.loads(path.read_text())["runs"]  # float32 has no autocast run
    assert run["dtype"] == "bfloat16 autocast"
    for name in ("baseline", "baseline_channels_last", "candidate"):
        assert run[f"{name}_inference_images_per_s"] > 0 and run[f"{name}_saved_bytes"] > 0
    assert run["gradient_diff"][2] and run["inference_output_diff"][2]  # within tolerance
    assert cli.main([*args, "--quiet", "--autocast", "--dtype", "float32"]) == 2
    assert "--autocast needs --dtype bfloat16 or float16" in capsys.readouterr().err


def test_bench_compile_times_compiled_tutorial_and_ours(tmp_path, capsys):
    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--size", "32", "--base-features", "4", "--rounds", "1", "--warmup", "1"]
    argv = [*args, "--dtype", "float32", "--compile", "default", "--quiet"]
    assert cli.main([*argv, "--json", str(path), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "c-tut" in text and "c-ours" in text and "vs c-tut" in text
    (run,) = json.loads(path.read_text())["runs"]
    for name in ("baseline_compiled_default", "candidate_compiled_default"):
        for mode in ("inference", "train"):
            assert run[f"{name}_{mode}_images_per_s"] > 0
        assert run[f"{name}_saved_bytes"] > 0
    for key in ("inference_output_diff", "train_output_diff", "gradient_diff"):
        assert run[f"{key}_compiled_default"][2]  # compiled ours within tolerance
    assert png.stat().st_size > 0


def test_bench_model_times_a_network_against_fuse_of_it(tmp_path, capsys):
    pytest.importorskip("dynamic_network_architectures")
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "nnunet-2d", "--size", "64", "--batch", "2", "--rounds", "1"]
    assert (
        cli.main([*argv, "--warmup", "0", "--dtype", "float32", "--quiet", "--json", str(path)])
        == 0
    )
    text = capsys.readouterr().out
    assert "nnunet-2d, input 2x1x64x64" in text and "unet_fast.fuse()" in text
    assert "vs orig CL" in text
    (run,) = json.loads(path.read_text())["runs"]
    for name in ("baseline", "baseline_channels_last", "candidate"):
        assert run[f"{name}_train_images_per_s"] > 0 and run[f"{name}_saved_bytes"] > 0
    assert run["gradient_diff"][2] and run["train_output_diff"][2]


@pytest.mark.skipif(_backend.EXTENSION_ERROR is not None, reason="unet_fast._C is not built")
@pytest.mark.parametrize("winograd", [True, False])
def test_bench_says_which_convolutions_ran_by_winograd(monkeypatch, tmp_path, capsys, winograd):
    monkeypatch.setattr(_backend, "CPU_WINOGRAD", winograd)
    path = tmp_path / "bench.json"
    args = ["bench", "--size", "32", "--base-features", "16", "--dtype", "float32", "--quiet"]
    assert cli.main(args + ["--rounds", "1", "--warmup", "0", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    winograd_layers, folded = json.loads(path.read_text())["runs"][0]["winograd_layers"]
    assert folded == 18 and (winograd_layers > 0) == winograd
    assert (f"{winograd_layers} of 18 folded convolutions by Winograd" in text) == winograd
