"""Paired training ablations (issue 14): does a training option raise held-out QWK on the phantom?

Usage: python benchmarks/training_ablation.py --study side-connection|lesion-generation --out FILE.json
           [--data DIR] [--heldout DIR] [--seeds 0 1 2 3] [--train-n 680] [--heldout-n 400] [--image-size 96]
           [--epochs 10] [--threads 2]
Studies (STUDIES: the first arm is the reference every other arm is compared with):
- side-connection: the lesion-to-grade side connection (ModelConfig.lesion_to_grade) off vs on: may the lesion
  head's image-level presences move the CORAL logits? The side weight is built last and starts at zero, so
  every other parameter starts the same in both arms.
- lesion-generation: ELLG lesion generation (TrainConfig.lesion_generation) off vs on at probability 0.5
  with the grade raised by what the pasted lesions imply (`paste`) vs with only lesions that imply no higher
  grade (`paste-keep-grade`: no label changes).
Per seed, one tiny-rn model with the lesion head is trained per arm on the same phantom set. The seed fixes
the validation split, the initialisation, the batches and the augmentation: the arms differ only by the
option (lesion generation draws its pastes from the augmentation's random stream, so once it has pasted,
the paste arms' later augmentations differ from `off`'s too: paired by seed, not by every random draw). Each checkpoint is evaluated on the held-out set as `edgeretina evaluate` does (evaluation/run.py);
the CORAL head's QWK and referable AUC are kept, with what the option learned (the side weight per lesion type).
Without --data/--heldout the phantom sets are rendered into --workdir (reused there on a rerun; dataset
seeds 1 and 2, so a --data folder of seed 2 would share cases with the rendered held-out set). OUT holds
the runs, mean ± sd per arm, the paired difference of each arm to the reference (mean ± sd, seeds where it is
positive), the machine and the command line; it is rewritten after every run, so an interrupted ablation
keeps its rows. (The side-connection result of 2026-12-02 was recorded as side_connection_ablation.py, this
script before it took other studies.)
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeretina.atomic import write_json_atomic
from edgeretina.bench import machine_info
from edgeretina.cpu import cpu_class, cpu_info
from edgeretina.errors import EdgeRetinaError
from edgeretina.grades import LESION_CODES
from edgeretina.text_tables import table_lines

ARCH = "edgeretina-tiny-rn"
TRAIN_SEED, HELDOUT_SEED = 1, 2      # phantom dataset seeds, as the demo: the held-out set shares no case
METRICS = ("qwk", "auc")
LESION_GENERATION_PROBABILITY = 0.5   # the share of training images that get pasted lesions in the "paste" arms


@dataclass(frozen=True)
class Study:
    """One ablation: its question, its arms (the first is the reference) and what each arm sets."""
    question: str
    arms: tuple[str, ...]
    options: Callable[[str], tuple[dict[str, Any], dict[str, Any]]]   # arm -> (ModelConfig, TrainConfig) fields


def _side_connection(arm: str) -> tuple[dict, dict]:
    return {"lesion_to_grade": arm == "on"}, {}


def _lesion_generation(arm: str) -> tuple[dict, dict]:
    from edgeretina.training.lesion_generation import LesionGenerationConfig

    if arm == "off":
        return {}, {}
    return {}, {"lesion_generation": LesionGenerationConfig(probability=LESION_GENERATION_PROBABILITY,
                                                            raise_grade=arm == "paste")}


STUDIES = {
    "side-connection": Study("does the lesion-to-grade side connection (ModelConfig.lesion_to_grade) raise held-out QWK?",
                             ("off", "on"), _side_connection),
    "lesion-generation": Study("does ELLG lesion generation (TrainConfig.lesion_generation, probability "
                               f"{LESION_GENERATION_PROBABILITY}) raise held-out QWK, with the grade raised by the "
                               "pasted lesions or kept?", ("off", "paste", "paste-keep-grade"), _lesion_generation),
}


@dataclass(frozen=True)
class AblationConfig:
    study: str                       # a key of STUDIES
    out: Path
    workdir: Path
    data: Path | None                # phantom folder to train on (None: render train_n cases into workdir)
    heldout: Path | None             # phantom folder to evaluate on (None: render heldout_n cases)
    seeds: tuple[int, ...]
    train_n: int
    heldout_n: int
    phantom_size: int
    image_size: int
    epochs: int
    batch_size: int
    val_fraction: float
    threads: int
    precision: str


def parse_args(argv: list[str] | None = None) -> AblationConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), required=True, help="which option to ablate")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="phantom sets, checkpoints and evaluation reports (default: OUT without .json + '-work')")
    parser.add_argument("--data", type=Path, default=None, help="phantom training folder to reuse")
    parser.add_argument("--heldout", type=Path, default=None, help="phantom held-out folder to reuse")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--train-n", type=_positive, default=680)
    parser.add_argument("--heldout-n", type=_positive, default=400)
    parser.add_argument("--phantom-size", type=_positive, default=256, help="height of the rendered photographs")
    parser.add_argument("--image-size", type=_positive, default=96)
    parser.add_argument("--epochs", type=_positive, default=10)
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--threads", type=_positive, default=2, help="torch threads and image worker processes")
    parser.add_argument("--precision", default="auto", help="training precision (auto | fp32 | bf16)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must not repeat a seed (the difference is paired by seed)")
    workdir = args.workdir or args.out.with_name(args.out.stem + "-work")
    return AblationConfig(study=args.study, out=args.out, workdir=workdir, data=args.data, heldout=args.heldout, seeds=tuple(args.seeds),
                          train_n=args.train_n, heldout_n=args.heldout_n, phantom_size=args.phantom_size,
                          image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
                          val_fraction=args.val_fraction, threads=args.threads, precision=args.precision)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def phantom_set(given: Path | None, folder: Path, n: int, seed: int, config: AblationConfig) -> Path:
    """The phantom folder to use: the one given, else `folder`, rendered there unless an earlier run of the
    same size left it (a rerun after an interruption should not render the set again)."""
    from edgeretina.phantom import PhantomConfig, generate_dataset

    if given is not None:
        if not (given / "labels.csv").is_file():
            raise SystemExit(f"{given} has no labels.csv (give a folder written by `edgeretina synth`)")
        return given
    labels = folder / "labels.csv"
    if labels.is_file():
        with open(labels, newline="") as handle:
            rows = sum(1 for _ in csv.DictReader(handle))
        if rows != n:
            raise SystemExit(f"{folder} holds {rows} cases, not {n}: remove it or choose another --workdir")
        print(f"reusing {folder} ({rows} cases)", file=sys.stderr)
        return folder
    begun = time.perf_counter()
    generate_dataset(folder, n=n, seed=seed, config=PhantomConfig(size=config.phantom_size), workers=config.threads)
    print(f"rendered {n} phantom cases into {folder} in {time.perf_counter() - begun:.0f} s", file=sys.stderr)
    return folder


def train_arm(config: AblationConfig, train_dir: Path, seed: int, arm: str) -> Path:
    """Train one arm; the checkpoint path. Everything but what the study's arm sets is the same in every arm."""
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.model import ModelConfig

    model_options, train_options = STUDIES[config.study].options(arm)
    model = ModelConfig(backbone=BackboneConfig(name=ARCH, image_size=config.image_size), lesion_head=True,
                        **model_options)
    out = config.workdir / "checkpoints" / f"seed{seed}-{arm}.pt"
    prefix = f"[seed {seed} {arm}] "
    result = train(TrainConfig(data=(f"phantom:{train_dir}",), out=out, model=model, val_fraction=config.val_fraction,
                               epochs=config.epochs, batch_size=config.batch_size, seed=seed, threads=config.threads,
                               workers=config.threads, precision=config.precision, **train_options),
                   log=lambda line: print(prefix + line, file=sys.stderr, flush=True), show_progress=False)
    return result.checkpoint


def evaluate_arm(config: AblationConfig, checkpoint: Path, heldout_dir: Path) -> dict:
    """Held-out QWK and referable AUC of the CORAL head (mode "head" of `edgeretina evaluate`), with the
    report's 95 % bootstrap intervals; the full report stays under workdir/evaluation/."""
    from edgeretina.evaluation.run import evaluate

    report, _ = evaluate(checkpoint, [f"phantom:{heldout_dir}"], config.workdir / "evaluation" / checkpoint.stem,
                         workers=config.threads, log=lambda line: print(f"[evaluate {checkpoint.stem}] {line}",
                                                                       file=sys.stderr, flush=True))
    head = report["modes"]["head"]
    qwk, auc = head["qwk"], head["referable"]["auc"]
    return {"qwk": qwk["estimate"], "qwk_ci": [qwk["low"], qwk["high"]],
            "auc": auc["estimate"], "auc_ci": [auc["low"], auc["high"]], "heldout_n": head["n"]}


def checkpoint_facts(checkpoint: Path) -> dict:
    """What training left in the checkpoint: epochs run, the best epoch, validation QWK, precision, and the
    learned side weight per lesion type (None without the connection) and what lesion generation pasted (None
    when it was off)."""
    from edgeretina.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    side = ckpt.model.lesion_side
    summary = ckpt.summary
    weights = None if side is None else dict(zip(LESION_CODES, (float(w) for w in side.weight.detach()[0])))
    return {"epochs": summary["schedule"]["epochs_run"], "best_epoch": summary.get("best_epoch"),
            "val_qwk": summary.get("val_metrics", {}).get("qwk"), "precision": summary["schedule"]["precision"],
            "side_weights": weights, "lesion_generation": summary["schedule"].get("lesion_generation")}


def run_one(config: AblationConfig, train_dir: Path, heldout_dir: Path, seed: int, arm: str) -> dict:
    begun = time.perf_counter()
    checkpoint = train_arm(config, train_dir, seed, arm)
    trained = time.perf_counter()
    scores = evaluate_arm(config, checkpoint, heldout_dir)
    return {"seed": seed, "arm": arm, **scores, **checkpoint_facts(checkpoint),
            "seconds": round(trained - begun, 1), "eval_seconds": round(time.perf_counter() - trained, 1),
            "checkpoint": str(checkpoint)}


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (None from fewer than two values)."""
    return {"mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def summarise(rows: list[dict], arms: tuple[str, ...]) -> dict:
    """Per arm mean ± sd of each metric; per arm after the first (the reference), the paired difference arm −
    reference over the seeds both finished."""
    reference = arms[0]
    per_arm = {arm: {m: mean_sd([r[m] for r in rows if r["arm"] == arm]) for m in METRICS} for arm in arms}
    by_seed = {(r["seed"], r["arm"]): r for r in rows}
    differences = {}
    for arm in arms[1:]:
        paired = sorted(seed for seed, name in by_seed if name == arm and (seed, reference) in by_seed)
        difference: dict[str, Any] = {"paired_seeds": paired}
        for metric in METRICS:
            deltas = [by_seed[(s, arm)][metric] - by_seed[(s, reference)][metric] for s in paired]
            difference[metric] = {**mean_sd(deltas), "per_seed": dict(zip(map(str, paired), deltas)),
                                  "positive": sum(d > 0 for d in deltas)}
        differences[f"{arm} - {reference}"] = difference
    weights = [r["side_weights"] for r in rows if r.get("side_weights")]
    side_weights = {code: mean_sd([w[code] for w in weights]) for code in LESION_CODES} if weights else None
    return {"arms": per_arm, "reference": reference, "differences": differences, "side_weights": side_weights}


@dataclass(frozen=True)
class Session:
    """What one invocation works on and when it began (the machine is shared: its load is recorded)."""
    train_dir: Path
    heldout_dir: Path
    started: float                   # time.perf_counter()
    load_at_start: tuple[float, ...]
    source: dict                     # source_state() at the start


def result_document(config: AblationConfig, session: Session, rows: list[dict], complete: bool) -> dict:
    train_dir, heldout_dir = session.train_dir, session.heldout_dir
    return {
        "benchmark": "training_ablation", "study": config.study, "issue": 14, "complete": complete,
        "question": STUDIES[config.study].question,
        "arms": {arm: _described(STUDIES[config.study].options(arm)) for arm in STUDIES[config.study].arms},
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "settings": {"arch": ARCH, "lesion_head": True, "image_size": config.image_size, "epochs": config.epochs,
                     "batch_size": config.batch_size, "val_fraction": config.val_fraction, "seeds": list(config.seeds),
                     "threads": config.threads, "precision": config.precision, "phantom_size": config.phantom_size,
                     "train_data": str(train_dir), "heldout_data": str(heldout_dir),
                     "train_n": _count(train_dir), "heldout_n": _count(heldout_dir),
                     "phantom_seeds": {"train": None if config.data else TRAIN_SEED,          # None: given
                                       "heldout": None if config.heldout else HELDOUT_SEED}},
        "source": session.source,
        "cpu": cpu_info()[0], "cpu_class": cpu_class(), "machine": machine_info(),
        "load_average_at_start": list(session.load_at_start), "load_average_now": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - session.started, 1),
        "runs": rows, "summary": summarise(rows, STUDIES[config.study].arms),
    }


def source_state() -> dict:
    """The commit the code came from and the files under edgeretina/ that differ from it: on a tree other
    work edits, the numbers belong to that state, not to the commit alone. None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--", "edgeretina"], cwd=root, capture_output=True,
                                 text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "changed": None}
    return {"commit": commit.stdout.strip(), "changed": [line[3:] for line in changed.stdout.splitlines()]}


def _described(options: tuple[dict, dict]) -> dict:
    """An arm's (ModelConfig, TrainConfig) fields as JSON (dataclass values as their fields)."""
    from dataclasses import asdict, is_dataclass

    model_options, train_options = options
    return {name: asdict(value) if is_dataclass(value) else value
            for name, value in {**model_options, **train_options}.items()}


def _count(folder: Path) -> int:
    with open(folder / "labels.csv", newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def table(document: dict) -> list[str]:
    """Per run, per arm and the difference as plain-text rich tables."""
    def num(value, signed=False):
        return "-" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"

    runs = [[str(r["seed"]), r["arm"], num(r["qwk"]), num(r["auc"]), str(r["epochs"]), f"{r['seconds']:.0f}",
             " ".join(f"{c} {w:+.3f}" for c, w in r["side_weights"].items()) if r.get("side_weights") else ""]
            for r in document["runs"]]
    summary = document["summary"]
    arms = [[arm, *(f"{num(s[m]['mean'])} ± {num(s[m]['sd'])}" for m in METRICS), str(s["qwk"]["n"])]
            for arm, s in summary["arms"].items()]
    for name, diff in summary["differences"].items():
        arms.append([name, *(f"{num(diff[m]['mean'], True)} ± {num(diff[m]['sd'])} "
                             f"({diff[m]['positive']}/{diff[m]['n']} > 0)" for m in METRICS), str(diff["qwk"]["n"])])
    return (table_lines(runs, ["right", "left", "right", "right", "right", "right", "left"],
                        ["seed", "arm", "QWK", "AUC", "epochs", "s", "side weights"])
            + [""] + table_lines(arms, ["left", "left", "left", "right"], ["arm", "QWK", "referable AUC", "seeds"]))


def main(argv: list[str] | None = None) -> None:
    import torch

    config = parse_args(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(config.threads)            # evaluation's predictions; train() sets and restores its own
    try:
        train_dir = phantom_set(config.data, config.workdir / "train", config.train_n, TRAIN_SEED, config)
        heldout_dir = phantom_set(config.heldout, config.workdir / "heldout", config.heldout_n, HELDOUT_SEED, config)
        session = Session(train_dir, heldout_dir, started, load_at_start, source_state())
        rows: list[dict] = []
        for seed in config.seeds:
            for arm in STUDIES[config.study].arms:
                rows.append(run_one(config, train_dir, heldout_dir, seed, arm))
                write_json_atomic(config.out, result_document(config, session, rows, False))
    except EdgeRetinaError as exc:
        raise SystemExit(f"error: {exc}") from None
    document = result_document(config, session, rows, True)
    write_json_atomic(config.out, document)
    print("\n".join(table(document)))
    print(f"{config.out} ({document['cpu_class']}, {document['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
