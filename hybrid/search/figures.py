"""The Pareto-front figures logged on a study's parent run: a PNG (matplotlib) and a
self-contained interactive HTML (plotly, its JavaScript inlined), on the first two
objectives; every feasible trial is a point, the front is highlighted and labelled."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

LABEL_LIMIT = 40  # label at most this many front points in the PNG


def _label(row: dict[str, Any], sep: str) -> str:
    """A point's name: trial, pattern and the sampled values the pattern does not show
    (two points of one pattern differ there, e.g. in mimo_rank)."""
    return sep.join(part for part in (f"#{row['trial']}", row["pattern"], row["point"]) if part)


def pareto_png(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str], directions: Sequence[str], title: str
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = metrics[0], metrics[1]
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    rest = [r for r in rows if r["pareto_rank"] != 0]
    front = sorted((r for r in rows if r["pareto_rank"] == 0), key=lambda r: r[x_name])
    ax.scatter(
        [r[x_name] for r in rest], [r[y_name] for r in rest], c="0.65", s=22, label="dominated"
    )
    ax.plot(
        [r[x_name] for r in front],
        [r[y_name] for r in front],
        "o-" if len(metrics) == 2 else "o",  # with more objectives a 2-D staircase misleads
        c="tab:red",
        ms=6,
        lw=1.2,
        label="Pareto front",
    )
    for r in front[:LABEL_LIMIT]:
        ax.annotate(
            _label(r, " "),
            (r[x_name], r[y_name]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel(f"{x_name} ({directions[0]})")
    ax.set_ylabel(f"{y_name} ({directions[1]})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def pareto_html(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str], directions: Sequence[str], title: str
) -> bytes:
    import plotly.graph_objects as go

    x_name, y_name = metrics[0], metrics[1]
    fig = go.Figure()
    for name, subset, color in (
        ("dominated", [r for r in rows if r["pareto_rank"] != 0], "#a0a0a0"),
        (
            "Pareto front",
            sorted((r for r in rows if r["pareto_rank"] == 0), key=lambda r: r[x_name]),
            "#d62728",
        ),
    ):
        fig.add_trace(
            go.Scatter(
                x=[r[x_name] for r in subset],
                y=[r[y_name] for r in subset],
                name=name,
                mode="markers+lines" if name == "Pareto front" and len(metrics) == 2 else "markers",
                marker={"color": color, "size": 9},
                text=[f"{_label(r, '<br>')}<br>params {r['params']:,}" for r in subset],
                hovertemplate="%{text}<br>%{x}<br>%{y}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title=f"{x_name} ({directions[0]})",
        yaxis_title=f"{y_name} ({directions[1]})",
        template="plotly_white",
    )
    return fig.to_html(include_plotlyjs="inline", full_html=True).encode()
