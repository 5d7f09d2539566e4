"""Plotly figures for the page; pure functions of numbers, so they are testable without a browser."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from .logic import per_image_scores, sweep_rows

MODEL_COLOURS = {"Baseline": "#64748b", "EGT": "#ea580c"}
FALLBACK_COLOURS = ("#2563eb", "#9333ea", "#0891b2", "#ca8a04")
ANSWER = "#16a34a"
PASSED = "#94a3b8"
SKIPPED = "#e2e8f0"
EXIT_COLOURS = ("#1d4ed8", "#0ea5e9", "#a855f7", "#f59e0b", "#64748b")


def colour_for(label: str, i: int = 0) -> str:
    """Baseline grey, EGT orange on every chart, so a reader learns the code once."""
    for name, colour in MODEL_COLOURS.items():
        if label.startswith(name):
            return colour
    return FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)]


def _layout(fig: go.Figure, height: int, **kw: Any) -> go.Figure:
    fig.update_layout(
        height=height,
        margin=dict(l=10, r=10, t=40 if kw.get("title") else 10, b=10),
        plot_bgcolor="white",
        # below the x-axis title: on top it collides with the chart title in narrow columns
        legend=dict(orientation="h", yanchor="top", y=-0.32, xanchor="left", x=0),
        **kw,
    )
    fig.update_xaxes(showline=True, linecolor="#cbd5e1", gridcolor="#f1f5f9")
    fig.update_yaxes(showline=True, linecolor="#cbd5e1", gridcolor="#f1f5f9")
    return fig


def confidence_chart(
    confidences: Sequence[float], threshold: float, answering: int, labels: Sequence[str]
) -> go.Figure:
    """Each exit's max softmax, the threshold as a line, and which exit answers."""
    colours, hover = [], []
    for k in range(len(confidences)):
        if k == answering:
            colours.append(ANSWER)
            hover.append("answers here")
        elif k < answering:
            colours.append(PASSED)
            hover.append("ran, below the threshold")
        else:
            colours.append(SKIPPED)
            hover.append("not run at this threshold (shown for reference)")
    fig = go.Figure(
        go.Bar(
            x=list(labels),
            y=list(confidences),
            marker_color=colours,
            marker_line_color="#475569",
            marker_line_width=[1.5 if k == answering else 0 for k in range(len(confidences))],
            text=[f"{c:.0%}" for c in confidences],
            textposition="outside",
            customdata=hover,
            hovertemplate="%{x}: confidence %{y:.3f}<br>%{customdata}<extra></extra>",
        )
    )
    fig.add_hline(
        y=threshold,
        line_dash="dash",
        line_color="#dc2626",
        annotation_text=f"threshold {threshold:.2f}",
        annotation_position="top left",
        annotation_font_color="#dc2626",
    )
    _layout(fig, 230, showlegend=False)
    fig.update_yaxes(range=[0, 1.15], tickformat=".0%", title="confidence (max softmax)")
    return fig


def accuracy_chart(reports: dict[str, dict]) -> go.Figure:
    """Accuracy against the exit threshold; dotted: the full path (no early exit)."""
    fig = go.Figure()
    for i, (label, rep) in enumerate(reports.items()):
        rows = sweep_rows(rep)
        colour = colour_for(label, i)
        fig.add_scatter(
            x=[r["threshold"] for r in rows],
            y=[r["accuracy"] for r in rows],
            mode="lines+markers",
            name=label,
            line_color=colour,
            hovertemplate="threshold %{x}<br>accuracy %{y:.2%}<extra>" + label + "</extra>",
        )
        if rep.get("accuracy"):
            fig.add_hline(y=rep["accuracy"][-1], line_dash="dot", line_color=colour, opacity=0.6)
    _layout(fig, 360, title="Accuracy vs exit threshold (dotted: final exit only)")
    fig.update_xaxes(title="exit threshold")
    fig.update_yaxes(title="test accuracy", tickformat=".1%")
    return fig


def speedup_chart(reports: dict[str, dict]) -> go.Figure:
    """Measured batch-1 wall-time speedup (solid) and FLOP-ideal speedup (dashed)."""
    fig = go.Figure()
    for i, (label, rep) in enumerate(reports.items()):
        rows = sweep_rows(rep)
        colour = colour_for(label, i)
        timed = [r for r in rows if "batch1" in r]
        if timed:
            fig.add_scatter(
                x=[r["threshold"] for r in timed],
                y=[r["batch1"]["speedup"] for r in timed],
                mode="lines+markers",
                name=f"{label}: measured",
                line_color=colour,
                hovertemplate="threshold %{x}<br>speedup %{y:.2f}x<extra>measured</extra>",
            )
        fig.add_scatter(
            x=[r["threshold"] for r in rows],
            y=[r.get("flop_ideal_speedup") for r in rows],
            mode="lines",
            name=f"{label}: FLOP-ideal",
            line=dict(color=colour, dash="dash"),
            opacity=0.6,
            hovertemplate="threshold %{x}<br>%{y:.2f}x<extra>FLOP-ideal</extra>",
        )
    fig.add_hline(y=1.0, line_color="#94a3b8", line_width=1)
    _layout(fig, 360, title="Speedup vs exit threshold (solid: measured at batch 1)")
    fig.update_xaxes(title="exit threshold")
    fig.update_yaxes(title="speedup over the full path (x)")
    return fig


def exit_mix_chart(report: dict, label: str) -> go.Figure:
    """Share of test images answered by each exit, per threshold (stacked)."""
    rows = sweep_rows(report)
    n_exits = max((len(r.get("exit_fraction", [])) for r in rows), default=0)
    x = [f"{r['threshold']:g}" for r in rows]
    fig = go.Figure()
    for k in range(n_exits):
        name = "final exit" if k == n_exits - 1 else f"exit {k + 1}"
        colour = EXIT_COLOURS[-1] if k == n_exits - 1 else EXIT_COLOURS[k % 4]
        fig.add_bar(
            x=x,
            y=[r["exit_fraction"][k] for r in rows],
            name=name,
            marker_color=colour,
            hovertemplate="threshold %{x}<br>%{y:.1%} of images<extra>" + name + "</extra>",
        )
    _layout(fig, 340, title=f"{label}: which exit answers", barmode="stack")
    fig.update_xaxes(title="exit threshold", type="category")
    fig.update_yaxes(title="share of test images", tickformat=".0%", range=[0, 1])
    return fig


def consistency_histogram(
    reports: dict[str, dict], exit_index: int, source: str = "trained", metric: str = "pearson"
) -> go.Figure:
    """Per-image agreement of one early exit with the final exit, baseline vs EGT overlaid."""
    fig = go.Figure()
    for i, (label, rep) in enumerate(reports.items()):
        scores = per_image_scores(rep, source, metric)
        if exit_index < len(scores) and scores[exit_index]:
            fig.add_histogram(
                x=scores[exit_index],
                name=label,
                marker_color=colour_for(label, i),
                opacity=0.6,
                xbins=dict(start=-1.0 if metric == "pearson" else 0.0, end=1.0, size=0.05),
                hovertemplate="%{x}: %{y} images<extra>" + label + "</extra>",
            )
    _layout(fig, 320, title=f"Exit {exit_index + 1} vs final exit", barmode="overlay")
    fig.update_xaxes(title=f"{metric} per image", range=[-1 if metric == "pearson" else 0, 1])
    fig.update_yaxes(title="images")
    return fig
