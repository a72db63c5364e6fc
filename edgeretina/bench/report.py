"""What a benchmark run prints and writes: the rich text tables, bench.json and bench.png."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rich import box
from rich.table import Table

from edgeretina.atomic import write_bytes_atomic, write_json_atomic
from edgeretina.bench.config import STAGES
from edgeretina.bench.results import BenchResult
from edgeretina.errors import MissingDependencyError
from edgeretina.text_tables import plain_text

# row key, column title, format
_COLUMNS = (("bundle", "bundle", "{}"), ("backend", "backend", "{}"), ("precision", "prec", "{}"),
            ("scheme", "scheme", "{}"), ("compute_precision", "computes", "{}"),
            ("threads", "thr", "{}"), ("batch", "batch", "{}"), ("size_mb", "MB", "{:.2f}"),
            ("load_s", "load s", "{:.2f}"), ("cold_ms", "cold ms", "{:.1f}"), ("p50_ms", "p50 ms", "{:.2f}"),
            ("p90_ms", "p90 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
            ("p50_with_overlay_ms", "+overlay", "{:.2f}"), ("throughput_ips", "img/s", "{:.1f}"),
            ("peak_rss_mb", "RSS MB", "{:.0f}"), ("speedup_vs_reference", "speedup", "{:.2f}x"),
            ("agreement", "agree", "{:.3f}"), ("qwk_proxy_delta", "1-QWK", "{:.3f}"), ("cosine", "cosine", "{:.5f}"))
_TEXT_COLUMNS = 5    # bundle .. computes: left-aligned; the numbers right-aligned


def format_table(result: BenchResult) -> str:
    """The rows table, the per-image stage medians, the skipped rows and the machine, as plain text
    (wide enough never to wrap, so it reads the same in a terminal and in a redirected file)."""
    measured = [row for row in result.rows if "skipped" not in row]
    skipped = [f"skipped {_name(row)}: {row['skipped']}" for row in result.rows if "skipped" in row]
    m = result.machine
    machine = (f"machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['cpu_flags']) or '-'}; "
               + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()))
    return "\n".join(plain_text(_rows_table(measured), "", _stages_table(measured), *skipped, machine))


def _rows_table(rows: list[dict]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for index, (_, title, _) in enumerate(_COLUMNS):
        table.add_column(title, justify="left" if index < _TEXT_COLUMNS else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for key, _, fmt in _COLUMNS))
    return table


def _stages_table(rows: list[dict]) -> Table:
    table = Table(title="per-image stage medians, ms", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("configuration", no_wrap=True)
    for stage in STAGES:
        table.add_column(stage, justify="right", no_wrap=True)
    table.add_column("knn scorer", no_wrap=True)
    for row in rows:
        stages = row["stages_ms"]
        table.add_row(_name(row), *(f"{stages[s]:.2f}" if s in stages else "-" for s in STAGES),
                      row.get("knn_scorer") or "-")
    return table


def _name(row: dict) -> str:
    return f"{row['bundle']}/{row['backend']} t{row['threads']} b{row['batch']}"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def write_results(result: BenchResult, out: Path, log: Callable[[str], None] = lambda _: None) -> tuple[Path, Path | None]:
    """bench.json and bench.png (latency vs fidelity, one point per row) into out, each written atomically.

    Returns (json path, png path); the png path is None when the plot was skipped (no matplotlib:
    `pip install 'edgeretina[plot]'`), and `log` says why."""
    from edgeretina.bench.plot import scatter_png

    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out / "bench.json", result.to_dict())
    try:
        png = scatter_png(result.rows)
    except MissingDependencyError as exc:
        log(f"plot skipped: {exc}")
        return json_path, None
    return json_path, write_bytes_atomic(out / "bench.png", png)
