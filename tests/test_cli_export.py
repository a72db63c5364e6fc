"""`edgeretina export` through the installed command: what each option does, and its exit codes.

The library's export is tested in test_export*.py and test_gate.py; here the options are shown to reach
it (--overwrite, --zip, --gate, --prune) and errors to end as one line and exit code 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgeretina.bundle import load_bundle
from edgeretina.export.prune import PruneConfig


ROOT = Path(__file__).resolve().parents[1]


def _edgeretina(*args) -> subprocess.CompletedProcess:
    """The installed console script, importing the package beside these tests (a copy under test too)."""
    exe = Path(sys.executable).with_name("edgeretina")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def _export(checkpoint, out, reference, *options) -> subprocess.CompletedProcess:
    return _edgeretina("export", checkpoint, "--out", out, "--reference", reference, "--reference-count", 8,
                       *options)


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _digest(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cli_bundle(tiny_checkpoint, phantom_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    result = _export(tiny_checkpoint.checkpoint, out, phantom_test)
    assert result.returncode == 0, result.stderr
    return out, result


def test_export_prints_the_bundle_path_and_gates_in_fail_mode(cli_bundle):
    bundle, result = cli_bundle
    assert result.stdout.strip() == str(bundle)
    gate = _manifest(bundle)["export"]["gate"]["onnx-fp32"]
    assert gate["mode"] == "fail" and gate["passed"] is True
    load_bundle(bundle)


def test_an_existing_bundle_is_kept_without_overwrite_and_replaced_with_it(cli_bundle, tiny_checkpoint,
                                                                           phantom_test, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(cli_bundle[0], bundle)
    before = _digest(bundle)

    again = _export(tiny_checkpoint.checkpoint, bundle, phantom_test, "--gate", "warn")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == f"error: {bundle} already exists (--overwrite replaces it)"
    assert _digest(bundle) == before and "Traceback" not in again.stderr

    replaced = _export(tiny_checkpoint.checkpoint, bundle, phantom_test, "--gate", "warn", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert _manifest(bundle)["export"]["gate"]["onnx-fp32"]["mode"] == "warn"   # the new export, not the old
    assert not list(tmp_path.glob(".export-*"))                                    # no staging left behind
    load_bundle(bundle)


def test_zip_writes_one_file_that_loads_as_the_same_bundle(cli_bundle, tiny_checkpoint, phantom_test, tmp_path):
    out = tmp_path / "bundle.zip"
    result = _export(tiny_checkpoint.checkpoint, out, phantom_test, "--zip")
    assert result.returncode == 0, result.stderr
    assert out.is_file() and zipfile.is_zipfile(out)
    loaded = load_bundle(out)
    directory = load_bundle(cli_bundle[0])
    assert {a.file: a.sha256 for a in loaded.manifest.artifacts} == {a.file: a.sha256 for a in directory.manifest.artifacts}


def test_gate_off_skips_the_comparison_and_records_that_it_did(tiny_checkpoint, phantom_test, tmp_path):
    out = tmp_path / "ungated"
    result = _export(tiny_checkpoint.checkpoint, out, phantom_test, "--gate", "off")
    assert result.returncode == 0, result.stderr
    assert _manifest(out)["export"]["gate"] == {"onnx-fp32": {"mode": "off", "passed": None}}
    assert "gate for onnx-fp32 skipped (--gate off)" in result.stderr


def test_prune_runs_the_shipped_pruning_step_and_gates_it(tiny_checkpoint, phantom_test, tmp_path):
    """`--prune` is target_steps(prune=True): the pruning step right after the reference, with the default
    options, its fidelity to the unpruned model gated in fail mode. The tiny ViT passes it clearly here
    (measured on x86-avx2: embedding cosine 0.996 vs 0.9 needed, saliency 0.999 vs 0.7, knn 0.8 vs 0.5)."""
    out = tmp_path / "pruned"
    result = _export(tiny_checkpoint.checkpoint, out, phantom_test, "--prune")
    assert result.returncode == 0, result.stderr
    export_info = _manifest(out)["export"]
    steps = export_info["steps"]
    assert steps[:3] == ["load_reference", "prune_model", "export_onnx_fp32"]
    assert export_info["gate"]["pruned"]["mode"] == "fail" and export_info["gate"]["pruned"]["passed"] is True
    assert export_info["gate"]["onnx-fp32"]["passed"] is True
    pruning = export_info["pruning"]
    assert pruning["config"] == PruneConfig().to_dict()
    assert pruning["params"]["after"] < pruning["params"]["before"]
    assert pruning["recovery"]["steps"] == PruneConfig().recovery_steps
    assert "pruned: params" in result.stderr


def test_a_missing_checkpoint_is_one_line_and_exit_code_1(phantom_test, tmp_path):
    result = _export(tmp_path / "nothing.pt", tmp_path / "out", phantom_test)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "nothing.pt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
