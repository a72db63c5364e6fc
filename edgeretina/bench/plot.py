"""The latency vs fidelity plot (bench.png), drawn with matplotlib: the optional `plot` extra, imported
only when a plot is drawn."""

from __future__ import annotations

import io

from edgeretina.errors import MissingDependencyError


def scatter_png(rows: list[dict]) -> bytes:
    """PNG bytes: x = p50 latency per call (log scale), y = grade agreement with the reference, one
    numbered point per measured row, coloured by bundle; rows without a reference sit at 1.0, hollow.
    Raises MissingDependencyError without matplotlib."""
    points = [r for r in rows if "skipped" not in r]
    figure = _figure(legend_lines=len(points))
    axes = figure.subplots()
    colours = _bundle_colours(points)
    for number, row in enumerate(points, start=1):
        agreement = row.get("agreement")
        y = 1.0 if agreement is None else agreement
        colour = colours[row["bundle"]]
        axes.scatter([row["p50_ms"]], [y], s=60, color=colour, facecolors=colour if agreement is not None else "none",
                     label=_legend(number, row))
        # Numbers beside the dots and names in the legend: points of one artifact often overlap.
        axes.annotate(str(number), (row["p50_ms"], y), textcoords="offset points", xytext=(5, 5 + 8 * (number % 2)),
                      color=colour, fontsize=8)
    axes.set_xscale("log")
    _plain_numbers(axes.xaxis)
    axes.margins(x=0.1, y=0.15)      # perfect agreement is common and should not sit on the frame
    axes.set_xlabel("p50 ms per call (log)")
    axes.set_ylabel("grade agreement with the reference")
    axes.set_title("latency vs fidelity (vs reference)")
    axes.grid(True, which="both", alpha=0.3)
    if points:
        # Below the axes: inside, it would hide points.
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.12), frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _figure(legend_lines: int):
    try:
        from matplotlib.figure import Figure      # no pyplot: no global state, no GUI backend
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", "the latency vs fidelity plot") from None
    return Figure(figsize=(9.6, 5.6 + 0.18 * legend_lines), dpi=100, layout="tight")


def _plain_numbers(axis) -> None:
    """Log-scale ticks as 8, 20, 30 rather than 8x10^0, 2x10^1."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _bundle_colours(points: list[dict]) -> dict[str, str]:
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    bundles = list(dict.fromkeys(r["bundle"] for r in points))
    return {bundle: palette[i % len(palette)] for i, bundle in enumerate(bundles)}


def _legend(number: int, row: dict) -> str:
    name = f"{number}: {row['bundle']}/{row['backend']} t{row['threads']} b{row['batch']}  p50 {row['p50_ms']:.1f} ms"
    if row.get("agreement") is None:
        return name + "  (no reference)"
    return name + f"  agree {row['agreement']:.3f}  cos {row['cosine']:.4f}"
