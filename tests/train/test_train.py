"""The training loop: resuming, atomic checkpoints, bad input, and distributed training with
synchronised fused BatchNorm (two gloo processes on the CPU)."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

import unet_fast
from unet_fast import cli
from unet_fast.models.registry import MODELS
from unet_fast.train import checkpoint, losses, metrics
from unet_fast.train import fit as fit_module
from unet_fast.train.augment import train_transforms, val_transforms
from unet_fast.train.data import SyntheticCells
from unet_fast.train.distributed import Distributed
from unet_fast.train.fit import TrainConfig, WeightAverage, cosine_factor, fit
from unet_fast.train.offset import LabelOffset, OffsetModel
from unet_fast.train.validate import validate

ROOT = Path(__file__).parents[2]


def tiny_run(out, epochs, resume=False, **options):
    torch.manual_seed(0)
    model = unet_fast.UNet(1, 1, base_features=4)
    views = "none" if options.get("learn_offset") else "dihedral"  # learn_offset draws them
    train = SyntheticCells(8, 48, seed=1, transform=train_transforms(32, 1, symmetry=views))
    val = SyntheticCells(2, 32, seed=2, transform=val_transforms(1))
    config = TrainConfig(
        out=str(out), epochs=epochs, batch_size=4, resume=resume, progress=False, **options
    )
    history = fit(model, train, val, config, {"channels": 1})
    return model, history


@pytest.mark.parametrize(
    "options", [{}, {"schedule": "cosine", "ema": 0.9}, {"ema": 0.9, "learn_offset": True}]
)
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, monkeypatch, options):
    straight, history = tiny_run(tmp_path / "straight", 3, **options)
    write_log = fit_module.write_log

    def interrupt(*args):  # Ctrl-C right after the first epoch's checkpoint and log
        write_log(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "write_log", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "resumed", 3, **options)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed, resumed_history = tiny_run(tmp_path / "resumed", 3, resume=True, **options)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)

    def drop(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert drop(resumed_history) == drop(history) and len(history) == 3
    log = (tmp_path / "resumed" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,train_loss") and len(log) == 4  # one row per epoch
    saved = checkpoint.load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert saved["epoch"] == 3 and saved["model"]["class"] == "UNet"
    straight_saved = checkpoint.load_checkpoint(tmp_path / "straight" / "last.pt")
    for key, value in straight_saved["state_dict"].items():  # the weight average, if any
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=0, atol=0, msg=key)
    if options.get("ema"):
        assert not torch.equal(
            saved["state_dict"]["inc.double_conv.0.weight"],
            saved["train_state_dict"]["inc.double_conv.0.weight"],
        )
    for key in ("offset", "train_offset"):
        assert (key in saved) == bool(options.get("learn_offset"))
        if key in saved:
            torch.testing.assert_close(saved[key], straight_saved[key], rtol=0, atol=0)
    assert (tmp_path / "resumed" / "curves.png").stat().st_size > 0
    model, _ = checkpoint.load_model(tmp_path / "resumed" / "best.pt")
    assert model.init_kwargs["base_features"] == 4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_rebuilt_from_its_checkpoint_spec(name):
    model = MODELS[name](1, 2, base_features=4, spatial_dims=3, norm=("group", 2), act="prelu")
    rebuilt = checkpoint.build_model(checkpoint.model_spec(model))
    assert type(rebuilt) is type(model) and rebuilt.init_kwargs == model.init_kwargs
    assert rebuilt.init_kwargs["norm"] == ("group", 2) and rebuilt.spatial_dims == 3
    rebuilt.load_state_dict(model.state_dict(), strict=True)


KILLED_WHILE_SAVING = textwrap.dedent("""
    import sys, time, torch
    from unet_fast.train import checkpoint
    path = sys.argv[1]
    checkpoint.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
    real_save = torch.save
    def slow_save(obj, file):  # writes part of the file, then hangs until killed
        file.write(b"PK" + b"x" * 100000)
        file.flush()
        print("writing", flush=True)
        time.sleep(60)
    torch.save = slow_save
    checkpoint.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
""")


def test_readme_training_commands_parse():
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = [
        line.split("#")[0].split()[1:]
        for line in text.splitlines()
        if line.startswith("unet-fast train")
    ]
    assert len(commands) >= 2
    for argv in commands:
        args = cli.parser().parse_args(argv)  # an unknown or renamed option exits here
        assert args.command == "train"


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factors = [cosine_factor(step / 100, warmup=0.1) for step in range(101)]
    rising, falling = factors[:11], factors[10:]
    assert rising == sorted(rising) and rising[0] < 0.02 and factors[10] == 1.0
    assert falling == sorted(falling, reverse=True) and factors[100] == 0.0
    assert factors[55] == pytest.approx(0.5)


def test_weight_average_follows_the_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    model = unet_fast.UNet(1, 1, base_features=4)
    average = WeightAverage(model, decay=0.75)
    before = {k: v.clone() for k, v in average.model.state_dict().items()}
    model.train()(torch.randn(2, 1, 32, 32)).sum().backward()  # moves BatchNorm statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    average.update(model, step=1000)  # past the warm-up: decay 0.75
    now = model.state_dict()
    for key, value in average.model.state_dict().items():
        want = now[key] if not value.is_floating_point() else 0.75 * before[key] + 0.25 * now[key]
        torch.testing.assert_close(value, want, msg=key)
    assert not any(p.requires_grad for p in average.model.parameters())
    average.update(model, step=0)  # warm-up: decay 1/10, nearly the weights themselves
    key = "inc.double_conv.0.weight"
    torch.testing.assert_close(
        average.model.state_dict()[key],
        0.1 * (0.75 * before[key] + 0.25 * now[key]) + 0.9 * now[key],
    )
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(model, 1.0)


@pytest.mark.parametrize(
    "symmetry, views",
    [
        ("dihedral", [(t, f) for t in range(4) for f in (False, True)]),
        ("hflip", [(0, False), (0, True)]),
    ],
)
def test_validation_with_tta_scores_the_mean_of_the_symmetry_views(symmetry, views):
    torch.manual_seed(0)
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    val = SyntheticCells(2, 32, seed=2, transform=val_transforms(1))
    loader = DataLoader(val, batch_size=2)
    images, masks = next(iter(loader))
    loss_fn = losses.bce_loss
    env = Distributed("cpu")
    outputs = []
    with torch.no_grad():
        for turns, flip in views:
            view = torch.rot90(images, turns, (2, 3))
            out = model(view.flip(3) if flip else view)
            outputs.append(torch.rot90(out.flip(3) if flip else out, -turns, (2, 3)))
    mean = torch.stack(outputs).mean(0)
    assert not torch.allclose(mean, outputs[0], atol=1e-3)  # the views differ: averaging shows
    for tta, logits in ((False, model(images).detach()), (True, mean)):
        loss, dice, _, error = validate(
            OffsetModel(model),
            loader,
            loss_fn,
            2,
            None,
            None,
            env,
            False,
            tta=tta,
            symmetry=symmetry,
        )
        labels = metrics.labels_from_logits(logits)
        assert error.item() == pytest.approx((labels != masks).float().mean().item())
        assert loss == pytest.approx(loss_fn(logits, masks).item(), rel=1e-5)


class LowerLabels(SyntheticCells):
    """Cells whose membrane labels sit one row below the membranes."""

    def load(self, index):
        image, mask = super().load(index)
        return image, np.concatenate([mask[:1], mask[:-1]])


def test_offset_model_scores_each_view_in_the_samples_own_orientation():
    torch.manual_seed(0)
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    offset = LabelOffset(1)
    with torch.no_grad():
        offset.weight.copy_(torch.randn(1, 1, 3, 3))
    images = torch.randn(3, 1, 32, 32)
    views = [(1, True), (2, False), (3, True)]
    with torch.no_grad():
        got = OffsetModel(model, offset)(images, views)
        for image, (turns, flip), out in zip(images, views, got, strict=True):
            view = torch.rot90(image[None], turns, (2, 3))
            logits = model(view.flip(3) if flip else view)
            back = torch.rot90(logits.flip(3) if flip else logits, -turns, (2, 3))
            padded = torch.nn.functional.pad(back, (1, 1, 1, 1), mode="replicate")
            torch.testing.assert_close(out, torch.nn.functional.conv2d(padded, offset.weight)[0])
        torch.testing.assert_close(OffsetModel(model, LabelOffset(1))(images), model(images))
    with pytest.raises(ValueError, match="quarter turns of \\(32, 48\\) crops"):
        OffsetModel(model)(torch.randn(2, 1, 32, 48), [(1, False), (0, False)])


def test_learn_offset_finds_labels_one_row_below_the_membranes(tmp_path):
    torch.manual_seed(0)
    model = unet_fast.UNet(1, 1, base_features=4)
    train = LowerLabels(16, 64, seed=1, transform=train_transforms(48, 1, symmetry="none"))
    val = LowerLabels(2, 64, seed=2, transform=val_transforms(1))
    config = TrainConfig(
        out=str(tmp_path), epochs=6, batch_size=4, lr=1e-2, learn_offset=True, progress=False
    )
    fit(model, train, val, config, {"channels": 1})
    saved = checkpoint.load_checkpoint(tmp_path / "last.pt")
    offset = LabelOffset(1)
    offset.load_state_dict(saved["offset"])
    rows, columns = offset.shift()[0].tolist()
    assert rows < -0.2 and abs(columns) < abs(rows) / 2  # out[y] takes from logits[y - 1]


def test_learn_offset_refuses_a_transform_that_turns(tmp_path):
    model = unet_fast.UNet(1, 1, base_features=4)
    train = SyntheticCells(8, 48, seed=1, transform=train_transforms(32, 1, symmetry="hflip"))
    val = SyntheticCells(2, 32, seed=2, transform=val_transforms(1))
    with pytest.raises(ValueError, match="must not \\(HorizontalFlip\\)"):
        fit(
            model,
            train,
            val,
            TrainConfig(out=str(tmp_path / "run"), learn_offset=True, progress=False),
        )
    assert not (tmp_path / "run" / "last.pt").exists()


def test_unknown_symmetry_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="symmetry must be one of"):
        tiny_run(tmp_path / "run", 1, symmetry="rot45")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_run_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    state = checkpoint.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(1000))


def test_checkpoint_errors_are_clear(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a unet_fast training checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")


def train_cli(capsys, *args):
    code = cli.main(
        ["train", "--base-features", "4", "--crop", "32", "--epochs", "1", "--quiet", *args]
    )
    return code, capsys.readouterr().err


def test_train_command_bad_input_is_one_line_and_keeps_what_was_saved(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    code, err = train_cli(capsys, "--data", str(empty), "--out", str(tmp_path / "run"))
    assert code == 2 and "holds no PNG or TIFF files" in err, err
    code, err = train_cli(capsys, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1, err
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    code, err = train_cli(capsys, "--out", str(blocked / "run"))
    assert code == 2 and "cannot write to output folder" in err, err
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"precious")
    code, err = train_cli(capsys, "--out", str(run))
    assert code == 2 and "--resume" in err and (run / "last.pt").read_bytes() == b"precious"
    code, err = train_cli(capsys, "--out", str(run), "--resume")
    assert code == 2 and "not a readable checkpoint" in err
    assert (run / "last.pt").read_bytes() == b"precious"


def _one_step(rank, world, init_file, state, x, target, result):
    """One SGD step of DDP with synchronised BatchNorm on this rank's share of the batch."""
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = unet_fast.UNet(1, 1, base_features=4, bilinear=False)
        model.load_state_dict(state)
        unet_fast.nn.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ddp(x[share]), target[share])
        loss.backward()
        optimizer.step()
        if rank == 0:
            torch.save(model.state_dict(), result)
    finally:
        dist.destroy_process_group()


def test_two_processes_with_sync_bn_match_one_process_on_the_whole_batch(tmp_path):
    """Parameters and running statistics after a step equal those of one process training on
    the whole batch with plain BatchNorm."""
    torch.manual_seed(0)
    reference = unet_fast.reference.UNet(1, 1, base_features=4, bilinear=False)
    x, target = torch.randn(4, 1, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    mp.spawn(
        _one_step, args=(2, tmp_path / "init", state, x, target, tmp_path / "result.pt"), nprocs=2
    )
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    torch.nn.functional.binary_cross_entropy_with_logits(reference(x), target).backward()
    optimizer.step()
    synced = torch.load(tmp_path / "result.pt")
    for key, value in reference.state_dict().items():
        scale = max(value.abs().max().item(), 1.0) if value.is_floating_point() else 1.0
        torch.testing.assert_close(synced[key], value, rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_torchrun_trains_with_sync_bn(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "unet_fast.train",
            "--sync-bn",
            "--schedule",
            "cosine",
            "--time-limit",
            "5",
            "--base-features",
            "4",
            "--crop",
            "32",
            "--epochs",
            "1",
            "--epoch-samples",
            "8",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch 1:" in result.stdout
    assert checkpoint.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
