"""The projection's picture: predicted step time against N per strategy, log axes,
its range shaded, with the crossovers (where one strategy overtakes another) marked."""
from __future__ import annotations

import io
import itertools
import math


def crossovers(series: dict[str, list[tuple[int, float]]]) -> list[tuple[float, float, str, str]]:
    """(N, step s, a, b) where strategy b overtakes a between two measured N (log-linear interpolation)."""
    out = []
    names = sorted(series)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = dict(series[a]), dict(series[b])
            ns = sorted(set(pa) & set(pb))
            for n0, n1 in itertools.pairwise(ns):
                d0, d1 = math.log(pa[n0] / pb[n0]), math.log(pa[n1] / pb[n1])
                if d0 * d1 < 0:
                    f = d0 / (d0 - d1)
                    n = math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))
                    t = math.exp(math.log(pa[n0]) + f * (math.log(pa[n1]) - math.log(pa[n0])))
                    out.append((n, t, a, b) if d0 > 0 else (n, t, b, a))
    return out


def plot(series: dict[str, list[tuple[int, float]]], ranges: dict[str, list[tuple[int, float, float]]],
         title: str) -> bytes:
    """PNG: predicted step time against N (log axes), each strategy's range shaded, crossovers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(series.items()):
        (line,) = ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o", ms=3, label=name)
        band = ranges.get(name, [])
        ax.fill_between([n for n, _, _ in band], [lo for _, lo, _ in band], [hi for _, _, hi in band],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    placed: list[tuple[float, float]] = []
    for n, t, winner, loser in crossovers(series):
        ax.plot([n], [t], "kx", ms=8)
        near = sum(1 for m, u in placed if max(n / m, m / n) < 2 and max(t / u, u / t) < 1.5)
        placed.append((n, t))  # labels of crossovers close together stack downwards instead of overprinting
        ax.annotate(f"{winner}<{loser}", (n, t), fontsize=6, xytext=(3, -9 - 8 * near), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers N")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
