"""PNG plots of a ``bench cl`` result: an accuracy-matrix heatmap per method, and one chart of the
average accuracy over seen tasks after each task for all methods."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen needed
    import matplotlib.pyplot as plt

    return plt


def _matrix(m) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)


def write_plots(result: dict, folder: Path) -> list[Path]:
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entry in result["methods"].items():
        a = 100 * _matrix(entry["accuracy_matrix"])
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * a.shape[1], 0.8 + 0.6 * a.shape[0]))
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(a):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after learning task")
        ax.set_title(f"{name}: accuracy (%)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = folder / f"matrix_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in result["methods"].items():
        a = _matrix(entry["accuracy_matrix"])
        ax.plot(range(len(a)), [100 * np.nanmean(a[i, : i + 1]) for i in range(len(a))], marker="o", label=name)
    ax.set_xlabel("after learning task")
    ax.set_ylabel("average accuracy on tasks seen (%)")
    ax.set_title(f"{result.get('scenario')}: accuracy after each task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = folder / "accuracy_after_each_task.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
