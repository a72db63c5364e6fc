"""Options with a fixed set of values: one list (edgeretina.choices) that the CLI shows and checks and the
libraries act on."""

import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from edgeretina import choices

COMMANDS = ("synth", "train", "export", "grade", "watch", "verify", "info", "keygen", "sign", "demo", "bench",
            "build-engine", "check-engine", "serve", "grade-archive", "explain", "evaluate-saliency")


def _cli(*args):
    exe = Path(sys.executable).with_name("edgeretina")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_the_libraries_accept_exactly_the_listed_values():
    from edgeretina.export.openvino_steps import PRECISIONS as OPENVINO_PRECISIONS
    from edgeretina.export.quantize_ort import PRECISION_SCHEMES
    from edgeretina.export.steps import GateMode
    from edgeretina.export.targets import TARGETS
    from edgeretina.bank_storage import stored_embeddings
    from edgeretina.runtime.backends import registered_backends
    from edgeretina.training.precision import PRECISIONS

    assert set(TARGETS) == set(choices.EXPORT_TARGETS)
    assert tuple(PRECISION_SCHEMES) == choices.TARGET_PRECISIONS["cpu"]
    assert tuple(OPENVINO_PRECISIONS) == choices.TARGET_PRECISIONS["openvino"]
    assert get_args(GateMode) == choices.GATE_MODES
    assert PRECISIONS == choices.TRAINING_PRECISIONS
    assert tuple(registered_backends()) == choices.BACKENDS
    assert stored_embeddings(np.ones((2, 3), np.float32), choices.BANK_DTYPES[-1])["embeddings"].dtype == np.int8


def test_the_cli_starts_without_numpy_torch_or_a_backend():
    """`edgeretina --help` on a camera: the option lists come from edgeretina.choices, nothing heavy."""
    code = ("import sys, edgeretina.cli; edgeretina.cli._register(); "
            "print(sorted(m for m in ('numpy', 'torch', 'onnxruntime', 'openvino', 'cv2') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("target, precision", [("onnx", "int8"), ("cpu", "fp16"), ("openvino", "int8-static")])
def test_a_precision_the_target_does_not_make_is_refused_before_any_step(target, precision):
    from edgeretina.errors import ConfigError
    from edgeretina.export.targets import check_precision

    with pytest.raises(ConfigError, match=f"the {target} target makes .*, not '{precision}'"):
        check_precision(target, precision)
    check_precision(target, None)
    check_precision(target, choices.TARGET_PRECISIONS[target][0])


def test_help_lists_the_choices_and_a_typo_fails_at_parse_time(tmp_path):
    help_text = _cli("export", "--help").stdout
    assert "onnx|cpu|openvino|jetson" in help_text and "fail|warn|off" in help_text and "float16|int8" in help_text
    assert "auto|fp32|bf16|fp16" in _cli("train", "--help").stdout
    assert "onnxruntime" in _cli("grade", "--help").stdout
    typo = _cli("export", tmp_path / "model.pt", "--out", tmp_path / "b", "--target", "cpuu")
    assert typo.returncode == 2 and "cpuu" in typo.stderr and "Traceback" not in typo.stderr
    assert not (tmp_path / "b").exists()
    missing = _cli("grade")                  # a usage error is a message and exit code 2, never a traceback
    assert missing.returncode == 2 and "Missing argument" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(command):
    result = _cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Example: edgeretina {command}" in result.stdout
