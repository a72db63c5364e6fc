"""The benchmark harness: how fast and how faithful each exported artifact is, measured the same way
for all of them. Built on the runtime (it grades through `Grader`), never imported by it.

Per row: model file size, load time, cold first image, latency p50/p90/p99 of one `grade_iter` call on
`batch` images from decode to records (for batch 1 that is the end-to-end time per image), throughput,
peak RSS (VmHWM of the worker), a per-image stage breakdown (decode, quality, preprocess, inference,
postprocess incl. KNN, overlay = saliency rendering timed separately), and with a reference:
speedup, grade agreement, 1 - QWK between reference and candidate grades, embedding cosine.

One file per concern: config (what to measure), images (what it grades), run (the orchestration),
process and worker (the two ends of a configuration's process), artifacts (what the manifest says),
rows and compare (numbers per row, fidelity), machine, report and plot (what it prints and writes).
"""

from edgeretina.bench.compare import fidelity_vs_reference
from edgeretina.bench.config import BenchConfig
from edgeretina.bench.machine import machine_info
from edgeretina.bench.report import format_table, write_results
from edgeretina.bench.results import BenchResult
from edgeretina.bench.run import run_bench

__all__ = ["BenchConfig", "BenchResult", "fidelity_vs_reference", "format_table", "machine_info", "run_bench",
           "write_results"]
