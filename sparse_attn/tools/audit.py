"""`python -m sparse_attn bench --audit`: per head, the attention mass a pattern keeps, its density, the row-wise
optimum density (the fewest keys per query row that hold ``gamma`` of its mass) and, for `Auto`, the layout kind
it chose; a summary against the accuracy promise, and a plot of the per-head layouts."""
from __future__ import annotations

import torch

from ..layout import SparseLayout
from .metrics import attention_recall_per_head
from ..patterns import Auto
from ..patterns.auto import CHOICE_NAMES, choose_per_head
from ..patterns.base import computed_share
from ..prefill import estimate
from ..errors import InvalidArgumentError


def optimum_density(q, k, gamma: float, *, rows: int = 256, causal: bool = True, scale=None,
                    chunk: int = 16) -> torch.Tensor:
    """Row-wise optimum density per query head ``[Hq]``: for ``rows`` query rows spread evenly over the queries,
    the fewest keys holding ``gamma`` of the row's attention (its top keys), summed, over the keys dense attention
    uses for those rows (so it estimates the same ratio as `SparseLayout.density`); mean over the batch."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    picked = torch.linspace(0, Lq - 1, min(rows, Lq)).round().long().unique()
    need = torch.zeros(B, Hq, dtype=torch.float64)
    seen = 0.0
    for i in range(0, picked.shape[0], chunk):
        r = picked[i:i + chunk]
        qs = q[:, :, r].float().reshape(B, Hkv, Hq // Hkv, r.shape[0], D)
        logits = torch.einsum("bhgnd,bhkd->bhgnk", qs, k.float()).reshape(B, Hq, r.shape[0], Lk) * scale
        pos = r + (Lk - Lq)
        if causal:
            logits.masked_fill_(torch.arange(Lk) > pos[:, None], float("-inf"))
        mass = logits.softmax(-1).sort(-1, descending=True).values.cumsum(-1)
        need += ((mass < gamma).sum(-1) + 1).double().sum(-1)
        seen += float((pos + 1).clamp(max=Lk).sum()) if causal else Lk * r.shape[0]
    return (need / seen).mean(0).float()


def audit(q, k, patterns: dict, *, gamma: float = 0.95, causal: bool = True, rows: int = 256):
    """For each named pattern: per head kept mass (exact, every query row), density and the optimum, and the
    `Auto` choice; returns ``{name: dict(layout=..., kept=[Hq], density=[Hq], choice=[Hq] names or None)}`` and
    the optimum ``[Hq]``.  Batch rows are averaged."""
    layouts = {name: estimate(q, k, p, causal=causal) for name, p in patterns.items()}
    kept = attention_recall_per_head(q, k, list(layouts.values()), causal=causal)            # [P, Hq]
    result = {}
    for i, (name, lay) in enumerate(layouts.items()):
        p = patterns[name]
        choice = None
        if isinstance(p, Auto):
            choice = [CHOICE_NAMES[c] for c in choose_per_head(q, k, p, causal=causal)[0].tolist()]
        result[name] = dict(layout=lay, kept=kept[i], density=computed_share(lay, causal).mean(0), choice=choice)
    return result, optimum_density(q, k, gamma, rows=rows, causal=causal)


def report(result: dict, optimum: torch.Tensor, *, gamma: float, out=print, min_head: float = 0.93):
    """Print the per-head table and one summary line per pattern: mean / min kept mass, mean density, the
    optimum and the bound ``1.5 x optimum + 0.03``, and whether the promise (mean >= gamma, every head >=
    ``min_head``, density within the bound) holds."""
    names = list(result)
    out(f"{'head':>4} {'optimum':>8} " + " ".join(f"{n + ' kept':>14} {'density':>8}" for n in names)
        + ("   choice" if any(r["choice"] for r in result.values()) else ""))
    for h in range(optimum.shape[0]):
        cells = " ".join(f"{float(result[n]['kept'][h]):>14.3f} {float(result[n]['density'][h]):>8.3f}" for n in names)
        choices = [r["choice"][h] for r in result.values() if r["choice"]]
        out(f"{h:>4} {float(optimum[h]):>8.3f} {cells}   {' '.join(choices)}")
    opt = float(optimum.mean())
    bound = 1.5 * opt + 0.03
    for n in names:
        kept, dens = result[n]["kept"], float(result[n]["density"].mean())
        ok = float(kept.mean()) >= gamma and float(kept.min()) >= min_head and dens <= bound
        out(f"{n}: mean kept {float(kept.mean()):.3f}, min head {float(kept.min()):.3f}, mean density {dens:.3f}, "
            f"optimum {opt:.3f}, bound 1.5 x optimum + 0.03 = {bound:.3f}: {'MEETS' if ok else 'MISSES'} the promise")


def plot_layouts(layouts: dict, path, *, title: str = "") -> None:
    """One row of per-head block masks (query block x key block, batch row 0) per named layout, saved to
    ``path`` (matplotlib, imported here only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(layouts)
    heads = next(iter(layouts.values())).heads
    fig, axes = plt.subplots(len(names), heads, figsize=(1.8 * heads, 1.9 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        lay: SparseLayout = layouts[name]
        blocks = lay.to_block_mask(causal=True)[0].float()                              # [H, nQb, nKb]
        for h in range(heads):
            ax = axes[r][h]
            ax.imshow(blocks[h].numpy(), cmap="Greys", interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} h{h}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_audit(lengths, pattern_names, heads, kv_heads, head_dim, workload, plot=None, *, inputs, gamma=0.95,
              out=print):
    """The ``bench --audit`` command: `audit` + `report` per length (and `plot_layouts` of the last length)."""
    import platform

    from .bench import PATTERNS

    out(f"# sparse_attn audit: B=1 Hq={heads} Hkv={kv_heads} D={head_dim} fp32, workload {workload}, "
        f"{platform.processor() or 'cpu'}, torch {torch.__version__}; gamma {gamma}")
    for L in lengths:
        q, k, _, spans = inputs(workload, L, heads, kv_heads, head_dim)
        if spans is not None:
            raise InvalidArgumentError("--audit takes the text, hard or diffuse workloads")
        result, optimum = audit(q, k, {n: PATTERNS[n]() for n in pattern_names}, gamma=gamma)
        out(f"## L={L}")
        report(result, optimum, gamma=gamma, out=out)
        if plot:
            plot_layouts({n: r["layout"] for n, r in result.items()}, plot, title=f"{workload} L={L}")
    out("kept = dense attention mass on the layout's keys (every query row); density = computed (query, key) pairs "
        "over dense causal ones; optimum = fewest keys per row holding gamma of its mass (256 rows spread evenly)")
