"""benchmarks/quality_gate.py (issue 12's false-/missed-ungradable tables and the gate's time per image) runs and
writes every table; at this size it measures nothing worth keeping: the recorded run is in benchmarks/results/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_gate.py"


def test_quality_gate_benchmark_writes_every_table(tmp_path):
    pytest.importorskip("skimage")
    out, cases = tmp_path / "gate.json", tmp_path / "cases.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--per-framing", "1", "--per-fault", "2",
                           "--per-bound", "1", "--size", "160", "--runs", "1", "--timing-size", "160",
                           "--cases", str(cases), "--compare-with", str(SCRIPT.parents[1])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    from edgeretina.phantom import FAULTS, FRAMINGS

    assert result["machine"]["cpu_class"] and result["settings"]["size"] == 160
    assert set(result["framings"]["rows"]) == set(FRAMINGS) and result["framings"]["n"] == len(FRAMINGS)
    assert set(result["faults"]["rows"]) == set(FAULTS) and set(result["faults"]["at_bound"]["rows"]) == set(FAULTS)
    for row in result["faults"]["rows"].values():
        assert row["n"] == 2 and 0 <= row["with_right_reason"] <= row["ungradable"] <= 2
    outside = result["faults"]["outside_range"]["rows"]   # the lid below and above its range
    assert outside and all(row["fault"] in FAULTS and row["n"] == 1 and 0 <= row["fov_found"] <= 1
                           for row in outside.values())
    assert result["retina"]["lid 0.12"]["reasons"] == ["lid_or_lash_artefact"]
    assert result["retina"]["vignetting 0.6"]["reasons"] == [] and result["retina"]["original"]["lid_shadow"] == 0
    assert result["retina"]["original"]["reasons"] == [] and "too_dark" in result["retina"]["gain 0.25"]["reasons"]
    for version in ("this", "other"):    # the same tree twice: both timed, every photo
        per_photo = result["timing"][version]["per_photo"]
        assert len(per_photo) == 1 + len(FRAMINGS) and all(p["gate_ms"] > 0 for p in per_photo.values())
    judged = json.loads(cases.read_text())
    assert len(judged) == len(FRAMINGS) + 2 * len(FAULTS) and all("measures" in c for c in judged)
