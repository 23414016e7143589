"""The training loop: the tutorial's AdamW + ReduceLROnPlateau on validation Dice, early stopping
and best-checkpoint saving, plus autocast, channels_last, progress bars, an epoch log (CSV and
JSON), per-epoch seeds (a resumed run continues exactly as an uninterrupted one), atomic
checkpoints, resuming, loss and metric curves, and DistributedDataParallel under torchrun.

`fit` runs `_setup` once, then per epoch `_train_epoch`, `validate` (validate.py),
`_record_epoch` and on rank 0 `_save_epoch`.
"""

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm import tqdm

from ..nn import convert_sync_batchnorm
from . import checkpoint, losses
from .data import seed_transform
from .distributed import Distributed
from .offset import LabelOffset, OffsetModel, check_transform_keeps_orientation
from .run_folder import check_output_folder, plot_curves, write_log
from .symmetry import SYMMETRIES, check_symmetry
from .validate import (
    channels_last_format,
    foreground_mean,
    to_device,
    validate,
    validation_loader,
)

LOSSES = {
    "bce": losses.bce_loss,
    "dice": losses.dice_loss,
    "bce_dice": losses.bce_dice_loss,
    "ce": losses.cross_entropy_loss,
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    out: str = "runs/unet"  # checkpoints (best.pt, last.pt), log.csv, log.json, curves.png
    epochs: int = 50
    batch_size: int = 4
    epoch_samples: int | None = None  # training samples per epoch (default: the data set once)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str | None = None  # default: bce_dice for binary tasks, ce for multi-class
    pos_weight: float | None = None
    precision: str = "auto"  # fp32 | bf16 | fp16; auto: fp32 on the CPU, bf16 on CUDA
    channels_last: bool = True
    schedule: str = "plateau"  # plateau: ReduceLROnPlateau; cosine: see cosine_factor
    lr_patience: int = 5  # plateau: halve the rate after this many flat epochs
    warmup: float = 0.03  # cosine: fraction of the run with a linearly rising rate
    patience: int = 10  # early stopping: stop after this many epochs without a better Dice
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    resume: bool = False
    sync_bn: bool = False  # distributed: BatchNorm statistics across all processes
    ema: float = 0.0  # > 0: validate and save an exponential moving average of the weights
    tta: bool = False  # validate on the mean over the symmetry's views (the paper's averaging)
    symmetry: str = "dihedral"  # flips and rotations of augmentation and tta: see SYMMETRIES
    learn_offset: bool = False  # the loop draws the views and learns the labels' offset: see
    #                             offset.py (the training transform must not flip or rotate)
    time_limit: float | None = None  # minutes of training (over resumes): no epoch starts after
    val_tile: tuple[int, ...] | None = None  # validate sample by sample, by overlap-tile
    #                                          prediction with tiles of this size (volumes)
    progress: bool = True


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics: smoother than
    the weights of any one step. The decay warms up as (1 + n) / (10 + n) over the first steps,
    so the average does not keep the initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the weight average's decay must be in (0, 1), got {decay}")
        self.model, self.decay = copy.deepcopy(model).requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        pairs = list(
            zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)
        )
        floating = [pair for pair in pairs if pair[0].is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floating], [b for _, b in floating], 1 - decay)
        for mine, theirs in pairs:
            if not mine.is_floating_point():  # BatchNorm's batch counts
                mine.copy_(theirs)


def _loss_function(config: TrainConfig, train_set):
    name = config.loss or ("bce_dice" if train_set.binary else "ce")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose from {sorted(LOSSES)}")
    if train_set.binary == (name == "ce"):
        task = "binary" if train_set.binary else "multi-class"
        raise ValueError(f"loss {name!r} does not fit a {task} task")
    ignore = getattr(train_set, "ignore_index", None)
    if name in ("bce", "bce_dice"):
        return lambda logits, target: LOSSES[name](logits, target, config.pos_weight, ignore)
    return lambda logits, target: LOSSES[name](logits, target, ignore_index=ignore)


def _autocast_dtype(config: TrainConfig, device: torch.device):
    if config.precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or auto")
    return PRECISIONS[config.precision]


def cosine_factor(progress: float, warmup: float) -> float:
    """Learning-rate multiplier at `progress` (0 to 1) through the run: a linear rise over the
    first `warmup`, then half a cosine down to 0."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def _seed_epoch(config: TrainConfig, epoch: int, train_set) -> torch.Generator:
    """Every random choice of an epoch follows (seed, epoch): order, augmentation, dropout."""
    seed = config.seed * 100003 + epoch
    torch.manual_seed(seed)
    transform = getattr(train_set, "transform", None)
    seed_transform(transform, seed)  # in-process loading; workers reseed themselves
    return torch.Generator().manual_seed(seed)


class _Clock:
    """Seconds of training so far, the runs a resumed run continues included."""

    def __init__(self, before: float):
        self.before, self.started = before, time.monotonic()

    def __call__(self) -> float:
        return self.before + time.monotonic() - self.started


@dataclass
class _Training:
    """What `_setup` builds for the epochs: the models, the optimizer's state and the record."""

    env: Distributed
    model: torch.nn.Module  # the network as given, on the device
    offset: LabelOffset | None  # the labels' learnt offset (learn_offset)
    trained: OffsetModel  # model and offset: what the optimizer steps
    average: WeightAverage | None
    evaluated: OffsetModel  # validated and saved: the weight average if any, else `trained`
    network: torch.nn.Module  # `trained`, wrapped for DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    loss_fn: Callable
    state: dict  # epoch, best, bad_epochs, history, seconds: saved with every checkpoint


def _resume(path: Path, run: _Training) -> dict:
    """Loads last.pt into the model, offset, optimizer, scheduler, scaler, record and random
    generators; returns the checkpoint (its weight average is restored after SyncBatchNorm)."""
    saved = checkpoint.load_checkpoint(path, run.env.device)
    run.model.load_state_dict(saved.get("train_state_dict", saved["state_dict"]))
    if (run.offset is None) != ("offset" not in saved):
        raise ValueError(
            f"{path} was trained with{'' if run.offset is None else 'out'}"
            " --learn-offset: resume it as it was started"
        )
    if run.offset is not None:
        run.offset.load_state_dict(saved.get("train_offset", saved["offset"]))
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    run.state = {key: saved.get(key, run.state[key]) for key in run.state}
    checkpoint.set_rng_state(saved["rng"])
    return saved


def _setup(model, train_set, val_set, config: TrainConfig) -> _Training:
    """Checks the configuration and data, moves the model to the device and builds the
    optimizer, schedule, weight average and distributed wrapper; resumes if asked."""
    env = Distributed(config.device)
    out = Path(config.out)
    if env.main:
        check_output_folder(out, config.resume)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(
            f"empty data set: {len(train_set)} training, {len(val_set)} validation samples"
        )
    if config.batch_size < 2:
        raise ValueError(
            "batch size must be at least 2: BatchNorm needs more than one value per channel"
        )
    autocast_dtype = _autocast_dtype(config, env.device)
    loss_fn = _loss_function(config, train_set)
    model = model.to(env.device)
    spatial_dims = getattr(model, "spatial_dims", 2)
    if config.channels_last:
        model = model.to(memory_format=channels_last_format(spatial_dims))
    check_symmetry(config.symmetry)
    offset = None
    if config.learn_offset and spatial_dims != 2:
        raise ValueError("learn_offset learns a 2-D label offset: it takes a 2-D model")
    if config.learn_offset:
        check_transform_keeps_orientation(getattr(train_set, "transform", None))
        offset = LabelOffset(model.num_classes).to(env.device)
    trained = OffsetModel(model, offset)
    optimizer = torch.optim.AdamW(
        trained.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    if config.schedule not in ("plateau", "cosine"):
        raise ValueError(f"schedule must be plateau or cosine, not {config.schedule!r}")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=config.lr_patience
    )
    scaler = torch.amp.GradScaler(env.device.type, enabled=autocast_dtype == torch.float16)
    state = {"epoch": 0, "best": -math.inf, "bad_epochs": 0, "history": [], "seconds": 0.0}
    run = _Training(
        env,
        model,
        offset,
        trained,
        None,
        trained,
        trained,
        optimizer,
        scheduler,
        scaler,
        autocast_dtype,
        loss_fn,
        state,
    )
    saved = _resume(out / "last.pt", run) if config.resume else None
    if config.sync_bn and env.world > 1:
        convert_sync_batchnorm(model)
    if config.ema:
        run.average = WeightAverage(trained, config.ema)
        if saved is not None:
            run.average.model.model.load_state_dict(saved["state_dict"])
            if offset is not None:
                run.average.model.offset.load_state_dict(saved["offset"])
        run.evaluated = run.average.model
    if env.world > 1:
        run.network = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    return run


def _epoch_loader(config: TrainConfig, epoch: int, train_set, env: Distributed) -> DataLoader:
    """This rank's share of the epoch's samples, drawn from (seed, epoch)."""
    generator = _seed_epoch(config, epoch, train_set)
    samples = config.epoch_samples or len(train_set)
    indices = list(RandomSampler(train_set, num_samples=samples, generator=generator))
    shard = indices[env.rank :: env.world]
    loader = DataLoader(
        Subset(train_set, shard),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(generator.initial_seed()),
    )
    if len(loader) == 0:
        raise ValueError(
            f"{len(shard)} training samples per process make no batch of "
            f"{config.batch_size}: lower the batch size or add samples"
        )
    return loader


def _train_epoch(
    run: _Training,
    config: TrainConfig,
    loader: DataLoader,
    epoch: int,
    views,
    budget: float | None,
    clock: _Clock,
) -> torch.Tensor:
    """One pass over `loader`; returns [summed loss, samples] over all ranks. With `views`
    (learn_offset) each sample's view is drawn here."""
    env = run.env
    run.network.train()
    total, seen = 0.0, 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
        disable=not (config.progress and env.main),
    )
    for step, (images, masks) in enumerate(bar):
        if config.schedule == "cosine":
            # the run ends after --epochs or --time-limit, whichever comes first; the
            # time part is the same on every rank (rank 0's clock)
            progress = (epoch - 1 + step / len(loader)) / config.epochs
            if budget is not None:
                progress = max(progress, env.broadcast(clock()) / budget)
            for group in run.optimizer.param_groups:
                group["lr"] = config.lr * cosine_factor(progress, config.warmup)
        images, masks = to_device(images, masks, env.device, config.channels_last)
        drawn = (
            None
            if views is None
            else [views[i] for i in torch.randint(len(views), (len(images),)).tolist()]
        )
        with torch.autocast(
            env.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None
        ):
            logits = run.network(images, drawn)
        loss = run.loss_fn(logits.float(), masks)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"epoch {epoch}: the loss became {loss.item()}; lower "
                "the learning rate or use float32"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.average is not None:
            run.average.update(run.trained, (epoch - 1) * len(loader) + step)
        total, seen = total + loss.item() * len(images), seen + len(images)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return env.sum(torch.tensor([total, seen], dtype=torch.float64, device=env.device))


def _record_epoch(
    run: _Training,
    config: TrainConfig,
    epoch: int,
    train_loss: torch.Tensor,
    scores: tuple,
    binary: bool,
    epoch_start: float,
    clock: _Clock,
) -> bool:
    """Steps the plateau schedule and appends the epoch to the record; True if it is the best."""
    val_loss, dice, iou, error = scores
    score = foreground_mean(dice, binary)
    if config.schedule == "plateau":
        run.scheduler.step(score)
    state = run.state
    improved = score > state["best"]
    state["best"] = max(state["best"], score)
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    state["epoch"] = epoch
    state["seconds"] = clock()
    state["history"].append(
        {
            "epoch": epoch,
            "train_loss": (train_loss[0] / train_loss[1]).item(),
            "val_loss": val_loss,
            "val_dice": score,
            "val_iou": foreground_mean(iou, binary),
            "val_pixel_error": error.item(),
            "lr": run.optimizer.param_groups[0]["lr"],
            "seconds": round(time.monotonic() - epoch_start, 2),
        }
    )
    return improved


def _save_epoch(run: _Training, info: dict, out: Path, improved: bool) -> None:
    """Rank 0: the epoch's line, last.pt (and best.pt when it improved) and the log."""
    row = run.state["history"][-1]
    tqdm.write(
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss "
        f"{row['val_loss']:.4f}, Dice {row['val_dice']:.4f}, pixel error "
        f"{row['val_pixel_error']:.4f}" + (" (best)" if improved else "")
    )
    weights = {"state_dict": run.evaluated.model.state_dict()}
    if run.offset is not None:
        weights["offset"] = run.evaluated.offset.state_dict()
    if run.average is not None:  # what training goes on from when resumed
        weights["train_state_dict"] = run.model.state_dict()
        if run.offset is not None:
            weights["train_offset"] = run.offset.state_dict()
    snapshot = {
        **info,
        **weights,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": checkpoint.rng_state(),
        **run.state,
    }
    if improved:
        checkpoint.save_checkpoint(snapshot, out / "best.pt")
    checkpoint.save_checkpoint(snapshot, out / "last.pt")
    write_log(out, run.state["history"])


def fit(model, train_set, val_set, config: TrainConfig, data_info: dict | None = None) -> list:
    """Trains `model` on `train_set`, validating on `val_set` every epoch; returns the history
    (one dict per epoch). Under torchrun (WORLD_SIZE > 1) every process calls fit with the same
    arguments; rank 0 writes the checkpoints and logs."""
    run = _setup(model, train_set, val_set, config)
    env, out = run.env, Path(config.out)
    # tiled: one sample at a time (volumes differ in shape), its tiles in batches
    val_batch = 1 if config.val_tile else config.batch_size
    val_loader = validation_loader(val_set, env, val_batch, config.workers)
    ignore_index = getattr(val_set, "ignore_index", None)
    clock = _Clock(run.state["seconds"])
    budget = None if config.time_limit is None else 60 * config.time_limit
    info = {
        "config": asdict(config),
        "data": data_info or {},
        "model": checkpoint.model_spec(run.model),
    }
    views = SYMMETRIES[config.symmetry] if config.learn_offset else None  # drawn per sample
    for epoch in range(run.state["epoch"] + 1, config.epochs + 1):
        if budget is not None and clock() > budget:
            break
        loader = _epoch_loader(config, epoch, train_set, env)
        epoch_start = time.monotonic()
        train_loss = _train_epoch(run, config, loader, epoch, views, budget, clock)
        scores = validate(
            run.evaluated,
            val_loader,
            run.loss_fn,
            val_set.num_classes,
            ignore_index,
            run.autocast_dtype,
            env,
            config.channels_last,
            config.tta,
            config.symmetry,
            config.val_tile and {"tile": config.val_tile, "batch_size": config.batch_size},
        )
        improved = _record_epoch(
            run, config, epoch, train_loss, scores, val_set.binary, epoch_start, clock
        )
        if env.main:
            _save_epoch(run, info, out, improved)
        if run.state["bad_epochs"] >= config.patience:
            if env.main:
                tqdm.write(f"early stop: no better validation Dice for {config.patience} epochs")
            break
    if env.main and run.state["history"]:
        plot_curves(run.state["history"], out / "curves.png")
    return run.state["history"]
