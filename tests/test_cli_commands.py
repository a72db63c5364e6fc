"""`synth`, `train` and `demo` run once each through the command line: `edgeretina.cli.main`, the function
the installed `edgeretina` script calls, with its real argument parsing, lazy imports, error-to-exit-code
mapping and output. The shared synth output comes from the installed script in a subprocess (that the
entry point itself works); the other runs call main() in this process with sys.argv set, so they do not
pay torch's and open_clip's import again (~8 CPU-s per process on x86-avx2). Export and build-engine are
tested elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeretina.dataset import read_labels
from edgeretina.demo import format_summary
from edgeretina.preprocess import decode_image

ROOT = Path(__file__).resolve().parents[1]
N, SEED, SIZE = 24, 5, 64


def _installed_edgeretina(*args) -> subprocess.CompletedProcess:
    """The installed console script, importing the package beside these tests (PYTHONPATH is this
    checkout's root), so it runs the code pytest imported."""
    script = Path(sys.executable).with_name("edgeretina")
    command = [str(script)] if script.is_file() else [
        sys.executable, "-c", "import sys; from edgeretina.cli import main; sys.argv[0] = 'edgeretina'; main()"]
    env = {k: v for k, v in os.environ.items() if k != "EDGERETINA_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_synth") / "train"
    done = _installed_edgeretina("synth", "--out", out, "--n", N, "--seed", SEED, "--size", SIZE, "--workers", 1)
    return out, done


def test_synth_writes_the_asked_photographs_and_labels(synth_run, tmp_path):
    out, done = synth_run
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(out / "labels.csv")]             # prints the labels.csv it wrote
    assert f"synth: {N}/{N}" in done.stderr
    items = read_labels(out / "labels.csv")
    assert len(items) == N
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(item.path.name for item in items)
    assert all(item.case_id.startswith(f"phantom_s{SEED}_") for item in items)   # the asked seed
    assert decode_image(items[0].path).shape[0] == SIZE                           # the asked height
    # the command is the library's generate_dataset with the same arguments, byte for byte
    from edgeretina.phantom import PhantomConfig, generate_dataset

    reference = generate_dataset(tmp_path / "ref", n=N, seed=SEED, config=PhantomConfig(size=SIZE), workers=1)
    assert (out / "labels.csv").read_text() == reference.read_text()
    assert all(item.path.read_bytes() == (tmp_path / "ref" / "images" / item.path.name).read_bytes() for item in items)


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n"),
    (["--size", "32"], "--size"),
    (["--n", "many"], "--n"),
    (["--workers", "0"], "--workers"),
    ([], "--out"),                                    # --out is required
], ids=["n-zero", "size-below-64", "n-not-a-number", "workers-zero", "no-out"])
def test_synth_refuses_bad_arguments_with_exit_code_2(cli, tmp_path, args, message):
    out = tmp_path / "never"
    code, _, err = cli("synth", *(["--out", out] if args else []), *args)
    assert code == 2, err
    assert message in err
    assert not out.exists()


def test_library_error_is_one_line_and_exit_code_1(cli, tmp_path):
    """A value the parser lets through and the library refuses (a negative seed): cli.main prints one
    `error:` line, no traceback, and exits 1."""
    code, out, err = cli("synth", "--out", tmp_path / "s", "--n", 1, "--seed", -1)
    assert code == 1
    assert err.strip().splitlines() == ["error: phantom dataset seed must be an integer >= 0, got -1"]
    assert out == "" and not (tmp_path / "s").exists()         # refused before anything is written


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("cli_val"), n=8, seed=SEED + 1, config=PhantomConfig(size=SIZE),
                            workers=1)


def test_train_writes_a_checkpoint_with_the_asked_configuration(cli, synth_run, val_set, tmp_path):
    from edgeretina.training.checkpoint import load_checkpoint

    labels = synth_run[0] / "labels.csv"
    out = tmp_path / "model.pt"
    code, stdout, err = cli("train", labels, "--out", out, "--arch", "edgeretina-tiny-rn", "--image-size", 64,
                            "--val", val_set, "--epochs", 1, "--batch-size", 8, "--lr", "5e-4", "--ben-graham",
                            "--lesion-head", "--precision", "fp32", "--threads", 1, "--seed", 3)
    assert code == 0, err
    printed = json.loads(stdout)
    assert printed["checkpoint"] == str(out)
    ckpt = load_checkpoint(out)
    backbone = ckpt.model_config.backbone
    assert (backbone.name, backbone.pretrained, backbone.image_size) == ("edgeretina-tiny-rn", None, 64)
    assert ckpt.model_config.lesion_head is True and ckpt.model.lesion_head is not None
    assert ckpt.preprocess.image_size == 64 and ckpt.preprocess.ben_graham is True
    schedule = ckpt.summary["schedule"]
    assert {k: schedule[k] for k in ("epochs_run", "batch_size", "lr", "seed", "precision", "precision_reason")} == {
        "epochs_run": 1, "batch_size": 8, "lr": 5e-4, "seed": 3, "precision": "fp32",
        "precision_reason": "requested"}                  # not "auto: ..." (which is fp32 too on CPUs without bf16)
    assert ckpt.summary["train"]["data"] == [f"csv:{labels}"]
    assert ckpt.summary["train"]["n"] == N                                  # all of labels trains: --val validates
    assert ckpt.summary["val"]["n"] == 8 == printed["val"]["n"]
    assert printed["val"]["qwk"] == ckpt.summary["val_metrics"]["qwk"]
    assert printed["val"]["accuracy"] == ckpt.summary["val_metrics"]["accuracy"]


@pytest.mark.parametrize("args, message", [
    (["--n-train", "49", "--n-test", "20"], "--n-train"),
    (["--n-train", "50", "--n-test", "19"], "--n-test"),
], ids=["n-train-below-50", "n-test-below-20"])
def test_demo_refuses_sizes_below_its_minimums(cli, tmp_path, args, message):
    # one size below its minimum, the rest smallest: a demo that wrongly starts stays short
    code, _, err = cli("demo", "--workdir", tmp_path / "w", *args, "--train-minutes", 0.01, "--threads", 1)
    assert code == 2 and message in err
    assert not (tmp_path / "w").exists()


def test_demo_with_its_smallest_options_prints_the_summary_and_writes_metrics(cli, tmp_path):
    """The smallest demo the command allows: 50 + 20 photographs (384 px, the demo's fixed size) and a
    time budget of 0.6 s, which the first epoch outlasts on any CPU, so one epoch trains."""
    workdir = tmp_path / "demo"
    code, out, err = cli("demo", "--workdir", workdir, "--n-train", 50, "--n-test", 20, "--train-minutes", 0.01,
                         "--precision", "fp32", "--threads", 1)
    assert code == 0, err
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert out == f"{format_summary(metrics)}\nmetrics: {workdir / 'metrics.json'}\n"
    assert metrics["n_total"] == 20 and metrics["n"] + metrics["n_ungradable"] + metrics["n_errors"] == 20
    assert len(read_labels(workdir / "train" / "labels.csv")) == 50
    from edgeretina.training.checkpoint import load_checkpoint

    schedule = load_checkpoint(workdir / "checkpoint.pt").summary["schedule"]
    assert (schedule["precision"], schedule["precision_reason"], schedule["epochs_run"]) == ("fp32", "requested", 1)
    assert "[demo] train:" in err                   # the progress log goes to stderr, not stdout
