"""What a training run writes beside its checkpoints: the output folder's checks, the epoch log
(CSV and JSON) and the curves."""

import json
import os
from pathlib import Path


def check_output_folder(out: Path, resume: bool) -> None:
    """Refuse an output folder that cannot be written, or whose checkpoints a new run would
    overwrite: before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"cannot write to output folder {out}: {error.strerror or error}"
        ) from None
    if not resume and (out / "last.pt").exists():
        raise ValueError(
            f"{out / 'last.pt'} exists: pass --resume to continue that run, or "
            "choose another output folder"
        )
    if resume and not (out / "last.pt").exists():
        raise ValueError(f"nothing to resume: {out / 'last.pt'} does not exist")


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_log(out: Path, history: list) -> None:
    """Every epoch so far, as CSV and JSON (rewritten whole: a resumed run has one row per
    epoch)."""
    if not history:
        return
    lines = [",".join(history[0])] + [
        ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values())
        for row in history
    ]
    _write_atomic(out / "log.csv", "\n".join(lines) + "\n")
    _write_atomic(out / "log.json", json.dumps(history, indent=1))


def plot_curves(history: list, path: Path) -> None:
    """Loss, Dice, pixel error and learning rate per epoch, one panel each (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("Dice", ["val_dice"]),
        ("pixel error", ["val_pixel_error"]),
        ("learning rate", ["lr"]),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (title, keys) in zip(axes, panels, strict=True):
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
