"""The sweep plot: latency percentiles and goodput against request rate (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

PANELS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2E latency", "e2el_ms"))
PCTS = (("p50", "-"), ("p90", "--"), ("p99", ":"))


def _x_positions(rates: list[float]) -> tuple[list[float], list[str]]:
    finite = [r for r in rates if math.isfinite(r)]
    inf_x = 2 * max(finite) if finite else 1.0  # "all at once" drawn past the largest rate
    return [r if math.isfinite(r) else inf_x for r in rates], [f"{r:g}" if math.isfinite(r) else "inf" for r in rates]


def plot_sweep(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Write a 2x2 PNG: TTFT, TPOT and E2E (p50/p90/p99, ms) and goodput (with achieved
    request throughput), each against the offered request rate, one colour per target."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    targets = list(dict.fromkeys(r["target"]["name"] for r in records))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for t_idx, name in enumerate(targets):
        recs = sorted((r for r in records if r["target"]["name"] == name), key=lambda r: r["arrivals"]["rate"])
        xs, labels = _x_positions([r["arrivals"]["rate"] for r in recs])
        colour = colours[t_idx % len(colours)]
        for ax, (label, key) in zip(axes.flat, PANELS, strict=False):
            for pct, style in PCTS:
                ys = [r["metrics"][key][pct] for r in recs]
                ax.plot(xs, ys, style, marker="o", color=colour, label=f"{name} {pct}")
            ax.set_title(f"{label} (ms)")
            ax.set_xticks(xs, labels)
        ax = axes.flat[3]
        has_slo = any("goodput" in r["metrics"] for r in recs)
        if has_slo:
            ax.plot(xs, [r["metrics"].get("goodput") for r in recs], "-", marker="o", color=colour,
                    label=f"{name} goodput")
        ax.plot(xs, [r["metrics"]["request_throughput"] for r in recs], "--", marker="s", color=colour,
                label=f"{name} completed req/s")
        ax.set_xticks(xs, labels)
    slos = next((r["metrics"].get("slos_ms") for r in records if r["metrics"].get("slos_ms")), None)
    slo_text = ", ".join(f"{k} <= {v:g} ms" for k, v in slos.items()) if slos else "no SLO given"
    axes.flat[3].set_title(f"goodput and completed requests (req/s)\nSLO: {slo_text}", fontsize=10)
    for ax in axes.flat:
        ax.set_xlabel("offered request rate (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
