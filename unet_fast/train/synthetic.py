"""Generated cell images with known classes (the pixels behind `data.SyntheticCells`)."""

import numpy as np

INTERIOR, MEMBRANE, ORGANELLE = 0, 1, 2


def _smooth(image: np.ndarray, passes: int = 2) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur along every axis with replicated borders, `passes` times."""
    axes = range(image.ndim)
    for _ in range(passes):
        for axis in axes:
            padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in axes], mode="edge")
            lo, mid, hi = (
                np.take(padded, range(k, k + image.shape[axis]), axis=axis) for k in range(3)
            )
            image = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return image


def cell_sample(
    rng: np.random.Generator,
    size: tuple[int, int],
    cell_size: float = 24.0,
    noise: float = 0.05,
    membrane_width: float = 2.5,
):
    """One image (H×W float32 in [0, 1]) and its classes (H×W int32: 0 interior, 1 membrane,
    2 organelle).

    Cells are the Voronoi regions of points jittered on a grid of `cell_size` (each pixel then
    only needs the points of its 3×3 grid neighbourhood), seen through a smooth random warp so
    the walls wave like real membranes. A pixel is membrane where its distances to the nearest
    and second-nearest points differ by less than `membrane_width` (about the wall's width in
    pixels). About 40% of cells hold a dark ellipse, a distractor for binary tasks.
    """
    h, w = size
    s = float(cell_size)
    gh, gw = int(np.ceil(h / s)) + 2, int(np.ceil(w / s)) + 2  # a ring of cells beyond the edge
    jitter = rng.uniform(0, 1, (gh, gw, 2))
    py = (np.arange(gh)[:, None] - 1 + jitter[..., 0]) * s
    px = (np.arange(gw)[None, :] - 1 + jitter[..., 1]) * s
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    wy, wx = y.copy(), x.copy()
    for _ in range(3):  # a few low-frequency sinusoids: a smooth warp of about 2 px
        freq, phase = rng.uniform(0.5, 2.0, 2) * 2 * np.pi / s, rng.uniform(0, 2 * np.pi, 2)
        wy += rng.uniform(0.5, 1.0) * np.sin(freq[0] * x + phase[0])
        wx += rng.uniform(0.5, 1.0) * np.sin(freq[1] * y + phase[1])
    cy = np.clip(np.floor(wy / s).astype(np.int64) + 1, 1, gh - 2)
    cx = np.clip(np.floor(wx / s).astype(np.int64) + 1, 1, gw - 2)
    nearest = np.zeros((h, w), np.int64)
    d1 = np.full((h, w), np.inf)
    d2 = np.full((h, w), np.inf)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            iy, ix = cy + oy, cx + ox
            d = np.hypot(wy - py[iy, ix], wx - px[iy, ix])
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            d1 = np.where(closer, d, d1)
            nearest = np.where(closer, iy * gw + ix, nearest)
    classes = np.where(d2 - d1 < membrane_width, MEMBRANE, INTERIOR).astype(np.int32)

    for k in np.flatnonzero(rng.uniform(size=gh * gw) < 0.4):
        a, b = rng.uniform(2.0, 0.25 * s, 2)
        angle = rng.uniform(0, np.pi)
        ky, kx = py.flat[k], px.flat[k]
        r = max(a, b) + 4  # the warp moves pixels by under 3 px: a window around the point
        rows = slice(max(int(ky - r), 0), max(min(int(ky + r) + 1, h), 0))
        cols = slice(max(int(kx - r), 0), max(min(int(kx + r) + 1, w), 0))
        dy, dx = wy[rows, cols] - ky, wx[rows, cols] - kx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        window = classes[rows, cols]
        window[
            ((u / a) ** 2 + (v / b) ** 2 <= 1) & (nearest[rows, cols] == k) & (window == INTERIOR)
        ] = ORGANELLE

    brightness = rng.uniform(0.55, 0.85, gh * gw)[nearest]  # each cell its own shade
    image = np.select([classes == MEMBRANE, classes == ORGANELLE], [0.15, 0.35], brightness)
    image = _smooth(image + 0.03 * rng.standard_normal((h, w)))  # texture, then optics blur
    image = image + noise * rng.standard_normal((h, w))
    return np.clip(image, 0, 1).astype(np.float32), classes


def cell_volume(
    rng: np.random.Generator,
    size: tuple[int, int, int],
    cell_size: float = 16.0,
    noise: float = 0.05,
    membrane_width: float = 1.0,
):
    """One volume (D×H×W float32 in [0, 1]) and its classes (D×H×W int32: 0 interior, 1
    membrane, 2 organelle): `cell_sample` in 3-D. Cells are the Voronoi regions of points
    jittered on a grid of `cell_size` (each voxel needs the points of its 3×3×3 grid
    neighbourhood); membranes where the nearest and second-nearest distances differ by less
    than `membrane_width`; about 40% of cells hold a dark sphere around their point."""
    shape = tuple(size)
    s = float(cell_size)
    grid = tuple(int(np.ceil(n / s)) + 2 for n in shape)  # a shell of cells beyond the edge
    points = (np.indices(grid).transpose(1, 2, 3, 0) - 1 + rng.uniform(0, 1, (*grid, 3))) * s
    voxel = np.indices(shape).transpose(1, 2, 3, 0).astype(np.float64)
    cell = np.floor(voxel / s).astype(np.int64) + 1
    d1, d2 = np.full(shape, np.inf), np.full(shape, np.inf)
    nearest = np.zeros(shape, np.int64)
    for offset in np.ndindex(3, 3, 3):
        index = tuple(cell[..., a] + offset[a] - 1 for a in range(3))
        d = np.linalg.norm(voxel - points[index], axis=-1)
        closer = d < d1
        d2 = np.where(closer, d1, np.minimum(d2, d))
        d1 = np.where(closer, d, d1)
        nearest = np.where(closer, np.ravel_multi_index(index, grid), nearest)
    classes = np.where(d2 - d1 < membrane_width, MEMBRANE, INTERIOR).astype(np.int32)
    radius = rng.uniform(1.5, 0.3 * s, int(np.prod(grid)))[nearest]
    has_organelle = (rng.uniform(size=int(np.prod(grid))) < 0.4)[nearest]
    classes[(classes == INTERIOR) & has_organelle & (d1 < radius)] = ORGANELLE

    brightness = rng.uniform(0.55, 0.85, int(np.prod(grid)))[nearest]
    image = np.select([classes == MEMBRANE, classes == ORGANELLE], [0.15, 0.35], brightness)
    image = _smooth(image + 0.03 * rng.standard_normal(shape), passes=1)
    image = image + noise * rng.standard_normal(shape)
    return np.clip(image, 0, 1).astype(np.float32), classes
