"""A picture of a calibration's choice: the pattern family per (layer, head), each cell labelled with its density."""
from __future__ import annotations

import torch

from ..config import NAME_OF
from .calibrate_candidates import FAMILIES


def plot_choices(result, path) -> None:
    """PNG of the chosen pattern family per (layer, head), each cell labelled with its density in percent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names = [NAME_OF[type(c)] for c in result.candidates]
    family = torch.tensor([[FAMILIES.index(names[i]) for i in row] for row in result.choice.tolist()])
    n_layers, n_heads = family.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * n_heads, 24), min(1.5 + 0.35 * n_layers, 24)))
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8c8c8c", "#8172b2", "#ccb974", "#64b5cd"]
    ax.imshow(family.numpy(), cmap=ListedColormap(colors), vmin=-0.5, vmax=len(FAMILIES) - 0.5, aspect="auto")
    if n_layers * n_heads <= 1200:
        for (i, h), d in zip(torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_heads)).tolist(),
                             result.chosen_cost.flatten().tolist()):
            ax.text(h, i, f"{100 * d:.0f}", ha="center", va="center", fontsize=6, color="white")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"chosen patterns (cell: density %), target recall {result.target}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    shown = result.families()
    handles = [handles[FAMILIES.index(n)] for n in shown]
    ax.legend(handles, shown, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
