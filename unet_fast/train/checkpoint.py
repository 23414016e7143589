"""Training checkpoints: written atomically, read back with a clear error for anything else.

A checkpoint is a dict: {"format", "version", "model": {"class", "kwargs"}, "state_dict",
"data": how inputs were prepared and what the classes mean, and for resuming "optimizer",
"scheduler", "epoch", "best", "bad_epochs", "seconds", "rng", "history", and with a weight
average (which "state_dict" then holds) "train_state_dict"}.
"""

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..models.registry import MODELS

FORMAT, VERSION = "unet_fast.checkpoint", 1
MODEL_CLASSES = {cls.__name__: cls for cls in MODELS.values()}  # a checkpoint names the class


class CheckpointError(ValueError):
    """A file that is not a readable unet_fast checkpoint."""


def save_checkpoint(state: dict, path) -> Path:
    """Writes `state` to `path` atomically: a temporary file in the same folder, flushed to disk,
    then renamed over the old one, so a run killed while saving leaves the previous checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save({"format": FORMAT, "version": VERSION, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint's dict; CheckpointError if the file is missing, corrupted or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle of something else, plain text...
        details = str(error).splitlines()[0] if str(error) else "no details"
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {details})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a unet_fast training checkpoint (saved by "
            "`unet-fast train` or unet_fast.train.fit)"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')}; this "
            f"unet_fast reads version {VERSION}"
        )
    return state


def model_spec(model) -> dict:
    """How to rebuild `model`: its class name and constructor arguments."""
    name = type(model).__name__
    if name not in MODEL_CLASSES or not hasattr(model, "init_kwargs"):
        raise TypeError(f"cannot checkpoint a {name}: expected one of {sorted(MODEL_CLASSES)}")
    return {"class": name, "kwargs": dict(model.init_kwargs)}


def build_model(spec: dict):
    cls = MODEL_CLASSES.get(spec.get("class"))
    if cls is None:
        raise CheckpointError(f"unknown model class {spec.get('class')!r} in checkpoint")
    return cls(**spec["kwargs"])


def load_model(path, map_location="cpu"):
    """(model in eval mode with the checkpoint's weights, the checkpoint dict)."""
    state = load_checkpoint(path, map_location)
    model = build_model(state["model"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit {state['model']['class']} ({str(error).splitlines()[0]})"
        ) from None
    return model.to(map_location).eval(), state


def rng_state() -> dict:
    """Every generator's state, in types a weights_only load accepts."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
