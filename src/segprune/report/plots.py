"""The report's images as PNG bytes: accuracy vs cost (Pareto), channel widths, prediction overlays, training
curves.

matplotlib is optional (the `report` extra), so it is imported inside each function: without it a plot raises
ImportError, which the report turns into a note instead of failing the run. Figures are drawn with the Agg
canvas directly (no pyplot), so no global backend is switched and nothing opens a window.

Figures are about as wide (at 100 dpi) as the page's content column (see ``html.STYLE``), where they are shown at
full width, so a 12-point font is 12 points on screen: the fonts below are chosen for that.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from segprune._utils import IGNORE_INDEX

# Fixed class colours (RGB): the same class has the same colour in every report. Classes past the list get
# colours from a seeded generator; ignored pixels are black.
PALETTE = np.array([
    (128, 64, 128), (70, 130, 180), (107, 142, 35), (220, 20, 60), (250, 170, 30), (190, 153, 153),
    (0, 0, 142), (220, 220, 0), (152, 251, 152), (255, 127, 14), (148, 103, 189), (23, 190, 207),
    (227, 119, 194), (188, 189, 34), (140, 86, 75), (0, 80, 100), (119, 11, 32), (255, 255, 255),
    (102, 102, 156), (0, 255, 127)], dtype=np.uint8)
IGNORE_COLOUR = np.zeros(3, dtype=np.uint8)
WIDTH = 11.0  # inches at 100 dpi: the page's content column (html.STYLE: max-width 1100 px)
FONT = {"font.size": 13, "axes.titlesize": 14, "axes.labelsize": 13, "legend.fontsize": 12,
        "xtick.labelsize": 12, "ytick.labelsize": 12}


def readable(draw: Callable[..., bytes]) -> Callable[..., bytes]:
    """Run a plotting function with the report's font sizes (``FONT``): matplotlib reads them from its rcParams
    while artists are made and drawn, so the whole call, savefig included, runs inside the context."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(FONT):
            return draw(*args, **kwargs)
    return wrapper


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: PALETTE first, then seeded random colours."""
    extra = max(num_classes - len(PALETTE), 0)
    more = np.random.default_rng(12345).integers(40, 256, size=(extra, 3)).astype(np.uint8)
    return np.concatenate([PALETTE, more])[:num_classes]


def colourise(labels: np.ndarray, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) class labels as an (H, W, 3) uint8 image; `ignore_index` and out-of-range labels are black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[valid] = palette(num_classes)[labels[valid]]
    return rgb


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, *, ignore_index: int = IGNORE_INDEX,
            alpha: float = 0.6) -> np.ndarray:
    """Class colours blended over an (H, W, 3) uint8 image; ignored pixels black (not blended)."""
    colours = colourise(labels, num_classes, ignore_index=ignore_index).astype(np.float32)
    mixed = (alpha * colours + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)
    mixed[np.asarray(labels) == ignore_index] = IGNORE_COLOUR
    return mixed


def displayable(image: np.ndarray) -> np.ndarray:
    """A normalised (3, H, W) float image as (H, W, 3) uint8, stretched between its 1st and 99th percentiles
    (the report does not know the dataset's normalisation)."""
    image = np.asarray(image, dtype=np.float32).transpose(1, 2, 0)
    low, high = np.percentile(image, 1), np.percentile(image, 99)
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return (255 * scaled.clip(0, 1)).round().astype(np.uint8)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) no other point beats (cost <=, accuracy >=, one strictly), by cost."""
    def beaten(i):
        ci, ai = points[i]
        return any(c <= ci and a >= ai and (c < ci or a > ai) for c, a in points)
    return sorted((i for i in range(len(points)) if not beaten(i)), key=lambda i: points[i][0])


@readable
def pareto(points: Sequence[dict], *, cost: str, xlabel: str, title: str, unit: float = 1.0,
           accuracy: str = "miou", ylabel: str = "mIoU (%)") -> bytes:
    """Accuracy (`accuracy`, a fraction drawn as %) against `cost` / `unit` for points {"label", "run", cost,
    accuracy}; the Pareto front dashed.

    Points of one run (`run`) share a colour and are joined by an arrow from the first (before) to the last
    (after).
    """
    fig, ax = _figure(WIDTH, 5.0)
    runs = list(dict.fromkeys(p["run"] for p in points))
    colours = _cycle(len(runs))
    for run, colour in zip(runs, colours):
        mine = [p for p in points if p["run"] == run]
        xs, ys = [p[cost] / unit for p in mine], [100 * p[accuracy] for p in mine]
        ax.scatter(xs, ys, color=colour, zorder=3, label=_literal(run) if len(runs) > 1 else None)
        for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
            ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color=colour, alpha=0.6))
        for p, x, y in zip(mine, xs, ys):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=12,
                        parse_math=False)
    front = pareto_front([(p[cost], 100 * p[accuracy]) for p in points])
    ax.plot([points[i][cost] / unit for i in front], [100 * points[i][accuracy] for i in front], "k--", lw=1,
            alpha=0.5, label="Pareto front", zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, parse_math=False)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    ax.legend(loc="best")
    return _png(fig)


@readable
def widths(layers: dict[str, Sequence[int]], *, title: str = "channel widths per prunable layer") -> bytes:
    """Horizontal bars per layer: output channels before (light) and after (dark) pruning."""
    if not layers:
        raise ValueError("no prunable layers recorded")
    names = list(layers)
    before = np.array([layers[n][0] for n in names])
    after = np.array([layers[n][1] for n in names])
    pos = np.arange(len(names))
    fig, ax = _figure(WIDTH, min(2.0 + 0.3 * len(names), 80.0))
    ax.barh(pos, before, color="#c6dbef", label="before")
    ax.barh(pos, after, color="#2171b5", height=0.5, label="after")
    ax.set_yticks(pos, names, fontsize=11, parse_math=False)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_title(title, parse_math=False)
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


@readable
def prediction_panel(image: np.ndarray, target: np.ndarray, before: np.ndarray, after: np.ndarray, *,
                     num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] = ()) -> bytes:
    """One validation image: input | ground truth | unpruned prediction | pruned prediction, with a legend of the
    classes present."""
    rgb = displayable(image)
    panels = [("input", rgb)] + [(name, overlay(rgb, labels, num_classes, ignore_index=ignore_index))
                                 for name, labels in (("ground truth", target), ("unpruned", before),
                                                      ("pruned", after))]
    height, width = rgb.shape[:2]
    fig, axes = _figure(WIDTH, WIDTH / 4 * height / width + 1.2, ncols=4)
    for ax, (name, picture) in zip(axes, panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    _legend(fig, np.unique(np.concatenate([np.ravel(a) for a in (target, before, after)])), num_classes,
            ignore_index, class_names)
    return _png(fig)


def _legend(fig, present, num_classes, ignore_index, class_names) -> None:
    from matplotlib.patches import Patch

    colours = palette(num_classes) / 255
    handles = [Patch(color=colours[k], label=_literal(_class_name(k, class_names))) for k in present
               if 0 <= k < num_classes]
    if ignore_index in present:
        handles.append(Patch(color="black", label=f"ignored ({ignore_index})"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6) or 1, frameon=False)


@readable
def curves(stages: dict[str, dict]) -> bytes:
    """Training curves per epoch: the loss (left) and, where recorded, validation mIoU (right), one line per stage.

    Args:
        stages: {stage name (e.g. "train", "fine-tune"): {"epoch": [...], "loss": [...], optional "val_miou":
            [...] (fractions, None for an epoch without one)}}.
    """
    stages = {name: c for name, c in stages.items() if c and c.get("epoch")}
    if not stages:
        raise ValueError("no training curves recorded")
    with_miou = {n: c for n, c in stages.items() if any(v is not None for v in c.get("val_miou") or ())}
    fig, axes = _figure(WIDTH, 4.6, ncols=2 if with_miou else 1)
    loss_ax, miou_ax = (axes[0], axes[1]) if with_miou else (axes, None)
    for (name, c), colour in zip(stages.items(), _cycle(len(stages))):
        loss_ax.plot(c["epoch"], c["loss"], "o-", color=colour, label=_literal(name))
        if name in with_miou:
            points = [(e, 100 * v) for e, v in zip(c["epoch"], c["val_miou"]) if v is not None]
            miou_ax.plot(*zip(*points), "o-", color=colour, label=_literal(name))
    from matplotlib.ticker import MaxNLocator

    for ax, label in ((loss_ax, "training loss"), (miou_ax, "validation mIoU (%)")):
        if ax is not None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
    return _png(fig)


def _class_name(k: int, class_names: Sequence[str]) -> str:
    return f"{k} {class_names[k]}" if k < len(class_names) else str(k)


def _literal(text: str) -> str:
    """`text` shown as is where matplotlib has no parse_math switch (legend labels): `$` would start mathtext."""
    return str(text).replace("$", r"\$")


def _cycle(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string or URL inside the image
    return buf.getvalue()


def plot_path(path, file: str | Path, *, selected: int | None = None) -> bool:
    """mIoU against MACs along a post-pruning path (:class:`segprune.prune.PruningPath`), the selected step marked;
    False (with a warning) without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (optional: the report extra)
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'segprune[report]'): path plot skipped", stacklevel=2)
        return False
    base = max(path.steps[0].macs, 1)
    macs = [s.macs / base for s in path.steps]
    miou = [100 * s.miou for s in path.steps]
    fig, ax = _figure(6, 4)
    ax.plot(macs, miou, "o-", ms=3, label="path")
    if selected is not None:
        ax.plot(macs[selected], miou[selected], "r*", ms=14, label=f"selected (step {selected})")
    ax.set(xlabel="MACs (fraction of the unpruned model)", ylabel="validation mIoU (%)",
           title=f"post-pruning path ({path.criterion}, {path.selector})")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    file = Path(file)
    tmp = file.with_name(file.stem + ".tmp" + file.suffix)
    tmp.write_bytes(_png(fig))
    tmp.replace(file)
    return True
