"""The training loop: the tutorial's AdamW + ReduceLROnPlateau on validation Dice, early stopping
and best-checkpoint saving, plus autocast, channels_last, progress bars, an epoch log (CSV and
JSON), per-epoch seeds (a resumed run continues exactly as an uninterrupted one), atomic
checkpoints, resuming, loss and metric curves, and DistributedDataParallel under torchrun.
"""
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm import tqdm

from . import checkpoint, losses, metrics
from .data import seed_transform
from .offset import LabelOffset, OffsetModel, check_transform_keeps_orientation
from .predict import SYMMETRIES, check_symmetry

LOSSES = {"bce": losses.bce_loss, "dice": losses.dice_loss, "bce_dice": losses.bce_dice_loss,
          "ce": losses.cross_entropy_loss}
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
    progress: bool = True


class Distributed:
    """Rank, world size and device; started from torchrun's environment when WORLD_SIZE > 1."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast(self, value: float) -> float:
        """Rank 0's value on every rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return t.item()


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
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        floating = [pair for pair in pairs if pair[0].is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floating], [b for _, b in floating], 1 - decay)
        for mine, theirs in pairs:
            if not mine.is_floating_point():  # BatchNorm's batch counts
                mine.copy_(theirs)


def check_output_folder(out: Path, resume: bool) -> None:
    """Refuse an output folder that cannot be written, or whose checkpoints a new run would
    overwrite: before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to output folder {out}: {error.strerror or error}") from None
    if not resume and (out / "last.pt").exists():
        raise ValueError(f"{out / 'last.pt'} exists: pass --resume to continue that run, or "
                         "choose another output folder")
    if resume and not (out / "last.pt").exists():
        raise ValueError(f"nothing to resume: {out / 'last.pt'} does not exist")


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_log(out: Path, history: list) -> None:
    """Every epoch so far, as CSV and JSON (rewritten whole: a resumed run has one row per epoch)."""
    if not history:
        return
    lines = [",".join(history[0])] + [",".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                               for v in row.values()) for row in history]
    _write_atomic(out / "log.csv", "\n".join(lines) + "\n")
    _write_atomic(out / "log.json", json.dumps(history, indent=1))


def plot_curves(history: list, path: Path) -> None:
    """Loss, Dice, pixel error and learning rate per epoch, one panel each (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    panels = [("loss", ["train_loss", "val_loss"]), ("Dice", ["val_dice"]),
              ("pixel error", ["val_pixel_error"]), ("learning rate", ["lr"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (title, keys) in zip(axes, panels):
        for key in keys:
            axis.plot(epochs, [row[key] for row in history], marker=".", label=key)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if len(keys) > 1:
            axis.legend()
    axes[-1].set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _loss_function(config: TrainConfig, train_set):
    name = config.loss or ("bce_dice" if train_set.binary else "ce")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose from {sorted(LOSSES)}")
    if train_set.binary == (name == "ce"):
        raise ValueError(f"loss {name!r} does not fit a {'binary' if train_set.binary else 'multi-class'} task")
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


def validate(model: OffsetModel, loader, loss_fn, num_classes, ignore_index, autocast_dtype,
             env: Distributed, channels_last: bool, tta: bool = False, symmetry: str = "dihedral"):
    """(loss, per-class Dice, IoU, pixel error) over the whole validation set (all ranks); with
    `tta` of the logits averaged over the images' views under `symmetry` (all 8 flips and
    90-degree rotations for "dihedral")."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=env.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)
    with torch.inference_mode():
        for images, masks in loader:
            images, masks = _to_device(images, masks, env.device, channels_last)
            with torch.autocast(env.device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = model.predict(images, tta, symmetry)
            logits = logits.float()
            loss_sum += torch.stack([loss_fn(logits, masks).double() * len(images),
                                     torch.tensor(float(len(images)), device=env.device)])
            confusion += metrics.confusion_matrix(metrics.labels_from_logits(logits), masks,
                                                  num_classes, ignore_index).double()
    env.sum(confusion)
    env.sum(loss_sum)
    return ((loss_sum[0] / loss_sum[1].clamp_min(1)).item(),
            metrics.dice_from_confusion(confusion), metrics.iou_from_confusion(confusion),
            metrics.pixel_error_from_confusion(confusion, per_class=False))


def _to_device(images, masks, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks.to(device, non_blocking=True)


def _foreground_mean(per_class: torch.Tensor, binary: bool) -> float:
    """The score that drives scheduling: the positive class's (binary), else the mean over the
    classes other than 0."""
    return per_class[1].item() if binary else per_class[1:].mean().item()


def fit(model, train_set, val_set, config: TrainConfig, data_info: dict | None = None) -> list:
    """Trains `model` on `train_set`, validating on `val_set` every epoch; returns the history
    (one dict per epoch). Under torchrun (WORLD_SIZE > 1) every process calls fit with the same
    arguments; rank 0 writes the checkpoints and logs."""
    env = Distributed(config.device)
    out = Path(config.out)
    if env.main:
        check_output_folder(out, config.resume)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"empty data set: {len(train_set)} training, {len(val_set)} validation samples")
    if config.batch_size < 2:
        raise ValueError("batch size must be at least 2: BatchNorm needs more than one value per channel")
    autocast_dtype = _autocast_dtype(config, env.device)
    loss_fn = _loss_function(config, train_set)
    model = model.to(env.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_symmetry(config.symmetry)
    offset = None
    if config.learn_offset:
        check_transform_keeps_orientation(getattr(train_set, "transform", None))
        offset = LabelOffset(model.num_classes).to(env.device)
    trained = OffsetModel(model, offset)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    if config.schedule not in ("plateau", "cosine"):
        raise ValueError(f"schedule must be plateau or cosine, not {config.schedule!r}")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                           patience=config.lr_patience)
    scaler = torch.amp.GradScaler(env.device.type, enabled=autocast_dtype == torch.float16)
    state = {"epoch": 0, "best": -math.inf, "bad_epochs": 0, "history": [], "seconds": 0.0}
    if config.resume:
        saved = checkpoint.load_checkpoint(out / "last.pt", env.device)
        model.load_state_dict(saved.get("train_state_dict", saved["state_dict"]))
        if (offset is None) != ("offset" not in saved):
            raise ValueError(f"{out / 'last.pt'} was trained with{'' if offset is None else 'out'}"
                             " --learn-offset: resume it as it was started")
        if offset is not None:
            offset.load_state_dict(saved.get("train_offset", saved["offset"]))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = {key: saved.get(key, state[key]) for key in state}
        checkpoint.set_rng_state(saved["rng"])
    if config.sync_bn and env.world > 1:
        from ..nn import convert_sync_batchnorm
        convert_sync_batchnorm(model)
    average = WeightAverage(trained, config.ema) if config.ema else None
    if average is not None and config.resume:
        average.model.model.load_state_dict(saved["state_dict"])
        if offset is not None:
            average.model.offset.load_state_dict(saved["offset"])
    evaluated = average.model if average is not None else trained  # validated and saved
    network = trained
    if env.world > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    val_loader = DataLoader(Subset(val_set, range(env.rank, len(val_set), env.world)),
                            batch_size=config.batch_size, num_workers=config.workers)
    num_classes = val_set.num_classes
    ignore_index = getattr(val_set, "ignore_index", None)
    started, before = time.monotonic(), state["seconds"]
    budget = None if config.time_limit is None else 60 * config.time_limit

    def elapsed() -> float:  # seconds of this run so far, the runs it resumes included
        return before + time.monotonic() - started
    info = {"config": asdict(config), "data": data_info or {}, "model": checkpoint.model_spec(model)}
    views = SYMMETRIES[config.symmetry] if config.learn_offset else None  # drawn per sample
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if budget is not None and elapsed() > budget:
            break
        generator = _seed_epoch(config, epoch, train_set)
        samples = config.epoch_samples or len(train_set)
        indices = list(RandomSampler(train_set, num_samples=samples, generator=generator))
        shard = indices[env.rank::env.world]
        loader = DataLoader(Subset(train_set, shard), batch_size=config.batch_size, shuffle=False,
                            num_workers=config.workers, drop_last=True,
                            generator=torch.Generator().manual_seed(generator.initial_seed()))
        if len(loader) == 0:
            raise ValueError(f"{len(shard)} training samples per process make no batch of "
                             f"{config.batch_size}: lower the batch size or add samples")
        network.train()
        epoch_start, total, seen = time.monotonic(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                   disable=not (config.progress and env.main))
        for step, (images, masks) in enumerate(bar):
            if config.schedule == "cosine":
                # the run ends after --epochs or --time-limit, whichever comes first; the
                # time part is the same on every rank (rank 0's clock)
                progress = (epoch - 1 + step / len(loader)) / config.epochs
                if budget is not None:
                    progress = max(progress, env.broadcast(elapsed()) / budget)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * cosine_factor(progress, config.warmup)
            images, masks = _to_device(images, masks, env.device, config.channels_last)
            drawn = None if views is None else [views[i] for i in
                                                torch.randint(len(views), (len(images),)).tolist()]
            with torch.autocast(env.device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = network(images, drawn)
            loss = loss_fn(logits.float(), masks)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: the loss became {loss.item()}; lower "
                                         "the learning rate or use float32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update(trained, (epoch - 1) * len(loader) + step)
            total, seen = total + loss.item() * len(images), seen + len(images)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_loss = env.sum(torch.tensor([total, seen], dtype=torch.float64, device=env.device))
        val_loss, dice, iou, error = validate(evaluated, val_loader, loss_fn, num_classes,
                                              ignore_index, autocast_dtype, env,
                                              config.channels_last, config.tta,
                                              config.symmetry)
        score = _foreground_mean(dice, val_set.binary)
        if config.schedule == "plateau":
            scheduler.step(score)
        improved = score > state["best"]
        state["best"] = max(state["best"], score)
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        state["seconds"] = elapsed()
        state["history"].append({
            "epoch": epoch, "train_loss": (train_loss[0] / train_loss[1]).item(), "val_loss": val_loss,
            "val_dice": score, "val_iou": _foreground_mean(iou, val_set.binary),
            "val_pixel_error": error.item(), "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.monotonic() - epoch_start, 2)})
        if env.main:
            row = state["history"][-1]
            tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss "
                       f"{row['val_loss']:.4f}, Dice {score:.4f}, pixel error {row['val_pixel_error']:.4f}"
                       + (" (best)" if improved else ""))
            weights = {"state_dict": evaluated.model.state_dict()}
            if offset is not None:
                weights["offset"] = evaluated.offset.state_dict()
            if average is not None:  # what training goes on from when resumed
                weights["train_state_dict"] = model.state_dict()
                if offset is not None:
                    weights["train_offset"] = offset.state_dict()
            snapshot = {**info, **weights, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "rng": checkpoint.rng_state(), **state}
            if improved:
                checkpoint.save_checkpoint(snapshot, out / "best.pt")
            checkpoint.save_checkpoint(snapshot, out / "last.pt")
            write_log(out, state["history"])
        if state["bad_epochs"] >= config.patience:
            if env.main:
                tqdm.write(f"early stop: no better validation Dice for {config.patience} epochs")
            break
    if env.main and state["history"]:
        plot_curves(state["history"], out / "curves.png")
    return state["history"]
