"""Cold-start latency of `edgeretina grade`: what a camera operator waits for after pressing the button.

Measures, each in a fresh process (so nothing is cached in the interpreter; the OS page cache is warm
after the first run, which is what a device that grades several patients sees):
- wall time of `edgeretina grade IMAGE --bundle B --json` (median of N runs, plus min/max) and the
  peak resident memory of those grading processes (the largest VmHWM among them, from getrusage);
- `python -X importtime -c "import edgeretina.runtime"`: total import time and the slowest top-level
  packages (cumulative microseconds), to tell where a slow start comes from.

Usage: python benchmarks/cold_start.py IMAGE BUNDLE OUT.json [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgeretina.atomic import write_text_atomic


def time_grade_runs(image: Path, bundle: Path, runs: int) -> list[float]:
    command = _grade_command(image, bundle)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"grade failed (exit {done.returncode}): {done.stderr.strip()}")
    return seconds


def _grade_command(image: Path, bundle: Path) -> list[str]:
    """The installed console script next to this interpreter (what a user runs)."""
    script = Path(sys.executable).with_name("edgeretina")
    if not script.exists():
        raise SystemExit(f"no edgeretina console script at {script}: pip install -e . first")
    return [str(script), "grade", str(image), "--bundle", str(bundle), "--json"]


def runtime_import_profile(top: int = 8) -> dict:
    """Parse `-X importtime` (stderr lines `import time: self | cumulative | name`)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import edgeretina.runtime"],
                          capture_output=True, text=True, check=True)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        rows.append((parts[2].strip(), int(parts[1])))
    total_us = next(us for name, us in rows if name == "edgeretina.runtime")
    # Top-level packages (numpy, cv2, PIL, onnxruntime ...): their cumulative time is what each costs,
    # wherever in the tree it was first imported.
    packages = sorted(((n, us) for n, us in rows if "." not in n and n != "edgeretina"), key=lambda r: -r[1])
    return {"total_ms": round(total_us / 1000, 1),
            "slowest_ms": {name: round(us / 1000, 1) for name, us in packages[:top]},
            "torch_imported": any(name == "torch" for name, _ in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    seconds = time_grade_runs(args.image, args.bundle, args.runs)
    result = {
        "grade_wall_s": {"median": round(statistics.median(seconds), 3), "min": round(min(seconds), 3),
                         "max": round(max(seconds), 3), "runs": [round(s, 3) for s in seconds]},
        # ru_maxrss of waited-for children: KiB on Linux, the largest of the grade processes above
        "grade_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "runtime_import": runtime_import_profile(),
        "image": str(args.image), "bundle": str(args.bundle),
        "python": platform.python_version(), "machine": platform.machine(),
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
