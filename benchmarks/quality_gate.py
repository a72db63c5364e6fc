"""The quality gate on every camera framing and on the faults it must refuse: how often it is wrong, and its cost.

Three measurements (issue 12):

1. False ungradable on framings. Phantom photographs rendered with every framing preset of the camera model
   (`edgeretina.phantom.FRAMINGS`: standard, grey_frame, notch, cut_sides, side_bar, burned_text, small_field,
   export_panel), `--per-framing` seeds each, ordinary camera variation but no strong fault
   (`PhantomConfig(faults="none")`): every one is gradable by construction. Each is written as the camera
   writes it (JPEG at the sampled camera quality), decoded with `decode_image`, then `detect_fov` and
   `assess_quality` judge it. Also recorded: how far the detected circle is from the drawn one (centre
   error and radius error, as a share of the radius) and the largest of those per framing.
2. Missed ungradable on faults. `--per-fault` photographs of each fault preset (`edgeretina.phantom.FAULTS`:
   defocus blur 2.5-4 px per 512 px, under-exposure gain 0.1-0.25, over-exposure gain 2.5-4, heavy haze
   0.6-0.85, strong noise 0.12-0.2, an eyelid hiding 0.12-0.2 of the field), the framing cycling through every
   preset; counted: judged ungradable, and judged ungradable with the fault's own reason; then `--per-bound`
   photographs of each fault at the weak end of its range (blur 2.5, gain 0.25 and 2.5, haze 0.6, noise 0.12,
   lid 0.12), and of the lid below and above its range (0.05; 0.25, 0.3, 0.4: field found or not). Gains are
   relative to a metered exposure (`edgeretina.phantom.framing.metered_gain`). Also the measures and reasons of
   retina.jpg and degradations of it (gain, blur, veil, noise, JPEG q 10).
3. Time per image at the 1411 px photo size, decode excluded: `detect_fov` and `assess_quality` (the
   field of view given) on the decoded retina photograph of scikit-image (1411 x 1411) and on one 1411 px
   phantom of each framing; medians of `--runs` interleaved rounds on one OpenCV thread (the grader's).
   `--compare-with TREE` times TREE's `fov.py` and `quality.py` in the same rounds ("other" beside "this"):
   on a shared machine only times taken together compare.

The script only uses the public functions, so the same file measures any version of the gate: to measure
the code of an older commit, run it from a copy of the tree whose `edgeretina/quality.py` and
`edgeretina/preprocess/fov.py` are that commit's (the phantom framings are needed; `--label` names the run).

Usage: python benchmarks/quality_gate.py OUT.json [--label after] [--per-framing 50] [--per-fault 60]
       [--per-bound 40] [--size 512] [--runs 20] [--cases CASES.json] [--no-timing | --timing-only]
       [--compare-with TREE]
~3 minutes on 2 shared cores at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edgeretina.phantom import FAULTS, FRAMINGS, PhantomConfig, render_case  # noqa: E402
from edgeretina.preprocess import decode_image, detect_fov  # noqa: E402
from edgeretina.quality import assess_quality  # noqa: E402

#: the reason each fault must be refused for
EXPECTED_REASON = {"defocus": "out_of_focus", "under_exposed": "too_dark", "over_exposed": "too_bright",
                   "heavy_haze": "media_opacity", "strong_noise": "too_noisy", "lid_artefact": "lid_or_lash_artefact"}
#: reasons that also count as the right one (the gate before issue 12 reported haze as low_contrast)
ALSO_RIGHT = {"heavy_haze": ("low_contrast",)}


def camera_jpeg(case) -> np.ndarray:
    """The photograph as the camera writes it (JPEG at the sampled quality), decoded as the runtime does."""
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR),
                              [cv2.IMWRITE_JPEG_QUALITY, int(case.camera["jpeg_quality"])])
    assert ok
    return decode_image(buffer.tobytes())


def judge(case) -> dict:
    rgb = camera_jpeg(case)
    fov = detect_fov(rgb)
    report = assess_quality(rgb, fov)
    cx, cy, r = case.fov  # phantom: pixel-centre coordinates; the detector: continuous (+0.5)
    return {
        "gradable": bool(report.gradable), "reasons": list(report.reasons),
        "score": getattr(report, "score", None),
        "fov_found": bool(fov.found),
        "centre_error": float(np.hypot(fov.cx - (cx + 0.5), fov.cy - (cy + 0.5)) / r) if fov.found else None,
        "radius_error": float(abs(fov.radius - r) / r) if fov.found else None,
        "shape": list(rgb.shape[:2]),
        "framing": getattr(case, "framing", None), "strength": getattr(case, "fault_strength", None),
        "measures": {k: round(float(v), 5) for k, v in report.measures.items()},
    }


CASES: list[dict] = []  # every judged photograph, for --cases


def framing_table(per_framing: int, size: int) -> dict:
    rows = {}
    for name in FRAMINGS:
        config = PhantomConfig(size=size, framing=name, faults="none")
        results = [judge(render_case(1000 + seed, config)) for seed in range(per_framing)]
        CASES.extend({"set": "framing", "seed": 1000 + seed, **r} for seed, r in enumerate(results))
        ungradable = [r for r in results if not r["gradable"]]
        found = [r for r in results if r["fov_found"]]
        rows[name] = {
            "n": len(results), "ungradable": len(ungradable),
            "reasons": dict(Counter(reason for r in ungradable for reason in r["reasons"])),
            "fov_found": len(found),
            "max_centre_error": round(max((r["centre_error"] for r in found), default=float("nan")), 4),
            "max_radius_error": round(max((r["radius_error"] for r in found), default=float("nan")), 4),
            "median_score": _median([r["score"] for r in results]),
            "min_score": _min([r["score"] for r in results]),
        }
        print(f"  {name:<13} {rows[name]['ungradable']:>3} / {len(results)} ungradable  {rows[name]['reasons']}",
              flush=True)
    total = sum(r["n"] for r in rows.values())
    bad = sum(r["ungradable"] for r in rows.values())
    return {"rows": rows, "n": total, "ungradable": bad, "false_ungradable_rate": round(bad / total, 4)}


def fault_table(per_fault: int, size: int) -> dict:
    rows = {}
    for fault in FAULTS:
        results = []
        for seed in range(per_fault):
            framing = FRAMINGS[seed % len(FRAMINGS)]
            results.append(judge(render_case(2000 + seed, PhantomConfig(size=size, framing=framing, faults=fault))))
            CASES.append({"set": fault, "seed": 2000 + seed, **results[-1]})
        expected = EXPECTED_REASON[fault]
        refused = [r for r in results if not r["gradable"]]
        accepted = (expected, *ALSO_RIGHT.get(fault, ()))
        right = [r for r in refused if set(accepted) & set(r["reasons"])]
        rows[fault] = {
            "n": len(results), "parameter": FAULTS[fault][0], "range": list(FAULTS[fault][1:]),
            "expected_reason": expected, "ungradable": len(refused), "with_right_reason": len(right),
            "reasons": dict(Counter(reason for r in refused for reason in r["reasons"])),
            "median_score": _median([r["score"] for r in results]),
            "max_score": _max([r["score"] for r in results]),
            # the strengths of the photographs it let through or refused for another reason
            "missed_strengths": sorted(round(r["strength"], 3) for r in results
                                       if r["gradable"] or not set(accepted) & set(r["reasons"])),
        }
        print(f"  {fault:<14} {len(refused):>3} / {len(results)} ungradable, {len(right)} for {expected}  "
              f"{rows[fault]['reasons']}", flush=True)
    return {"rows": rows}


#: the weakest strength of each fault that must still be refused
BOUND = {"defocus": 2.5, "under_exposed": 0.25, "over_exposed": 2.5, "heavy_haze": 0.6, "strong_noise": 0.12,
         "lid_artefact": 0.12}
#: strengths past the range, where the gate may fail in another way: a lid hiding over a fifth of the field
#: keeps the field-of-view detection from accepting the circle (no_field_of_view)
BEYOND = {"lid_artefact": (0.05, 0.25, 0.3, 0.4)}


def bound_table(per_fault: int, size: int) -> dict:
    """Each fault at the weak end of its range only (framings cycling): where the gate is closest to failing."""
    rows = {}
    for fault, strength in BOUND.items():
        results = [judge(render_case(4000 + seed, PhantomConfig(size=size, framing=FRAMINGS[seed % len(FRAMINGS)],
                                                                faults=fault, fault_strength=strength)))
                   for seed in range(per_fault)]
        accepted = (EXPECTED_REASON[fault], *ALSO_RIGHT.get(fault, ()))
        right = [r for r in results if not r["gradable"] and set(accepted) & set(r["reasons"])]
        rows[fault] = {"strength": strength, "n": len(results), "ungradable": sum(not r["gradable"] for r in results),
                       "with_right_reason": len(right)}
        print(f"  {fault:<14} at {strength:<5} {rows[fault]['ungradable']:>3} / {len(results)} ungradable, "
              f"{len(right)} for {EXPECTED_REASON[fault]}", flush=True)
    return {"rows": rows}


def beyond_table(per_fault: int, size: int) -> dict:
    """Faults below and above their range (framings cycling): what the gate says there, field found or not."""
    rows = {}
    for fault, strengths in BEYOND.items():
        for strength in strengths:
            results = [judge(render_case(4000 + seed, PhantomConfig(size=size, framing=FRAMINGS[seed % len(FRAMINGS)],
                                                                    faults=fault, fault_strength=strength)))
                       for seed in range(per_fault)]
            right = [r for r in results if not r["gradable"] and EXPECTED_REASON[fault] in r["reasons"]]
            refused = [r for r in results if not r["gradable"]]
            rows[f"{fault} {strength}"] = {
                "fault": fault, "strength": strength, "n": len(results), "ungradable": len(refused),
                "with_right_reason": len(right), "fov_found": sum(r["fov_found"] for r in results),
                "reasons": dict(Counter(reason for r in refused for reason in r["reasons"]))}
            print(f"  {fault:<14} at {strength:<5} {len(refused):>3} / {len(results)} ungradable, {len(right)} for "
                  f"{EXPECTED_REASON[fault]}, field found in {rows[f'{fault} {strength}']['fov_found']}", flush=True)
    return {"rows": rows}


def retina_table() -> dict:
    """retina.jpg (1411 px) and degradations of it: the public photograph the thresholds were first set on."""
    from skimage import data as skimage_data

    retina = skimage_data.retina()
    inside = retina.max(axis=2, keepdims=True) > 10

    def gain(g):
        return np.clip(np.rint(retina.astype(np.float32) * g), 0, 255).astype(np.uint8)

    def haze(a):
        veiled = np.rint(retina * (1 - a) + a * np.array([230.0, 160.0, 100.0]))
        return np.where(inside, veiled, retina).astype(np.uint8)

    def noise(sd):
        return np.clip(np.rint(retina + np.random.default_rng(0).normal(0, sd, retina.shape) * inside), 0,
                       255).astype(np.uint8)

    yy, xx = np.mgrid[: retina.shape[0], : retina.shape[1]].astype(np.float32)
    field = inside[..., 0]

    def shaded(light):
        return np.where(inside, np.clip(np.rint(retina * light[..., None]), 0, 255), retina).astype(np.uint8)

    def lid(cover, lower=False, transmission=0.15):
        """An eyelid's shadow hiding `cover` of the field from its top (or bottom), its edge soft (sd 2 % of the
        field's diameter), `transmission` of the light left behind it."""
        edge = float(np.quantile(yy[field], 1.0 - cover if lower else cover))
        across = np.clip((edge - yy if lower else yy - edge) / (0.02 * 1394.0), -30, 30)
        return shaded(transmission + (1.0 - transmission) / (1.0 + np.exp(-across)))

    def vignette(loss):
        """The rim of the field `loss` darker than its centre (quadratic falloff): a stronger vignetting than
        retina.jpg's own."""
        rho2 = ((xx - 705.5) ** 2 + (yy - 705.5) ** 2) / 697.0**2
        return shaded(1.0 - loss * np.minimum(rho2, 1.0))

    cases = {"original": retina, **{f"gain {g}": gain(g) for g in (0.25, 0.28, 0.3, 2.0, 2.25, 2.5, 3.0)},
             **{f"blur {s} px": cv2.GaussianBlur(retina, (0, 0), s) for s in (2, 4, 6, 7, 8)},
             **{f"haze {a}": haze(a) for a in (0.2, 0.3, 0.4, 0.5)},
             **{f"noise sd {sd}": noise(sd) for sd in (8, 20, 30)},
             **{f"lid {c}": lid(c) for c in (0.05, 0.08, 0.12, 0.2)}, "lower lid 0.12": lid(0.12, lower=True),
             **{f"vignetting {v}": vignette(v) for v in (0.4, 0.6)}}
    ok, buffer = cv2.imencode(".jpg", retina[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 10])
    cases["JPEG q 10"] = decode_image(buffer.tobytes())
    fov = detect_fov(retina)
    rows = {}
    for name, rgb in cases.items():
        report = assess_quality(rgb, fov)
        keep = ("mean_luminance", "saturated_fraction", "focus", "contrast", "vessel_depth", "noise", "lid_shadow")
        rows[name] = {"reasons": list(report.reasons), "score": getattr(report, "score", None),
                      **{k: round(float(report.measures[k]), 4) for k in keep if k in report.measures}}
    return rows


def _other_gate(tree: Path):
    """detect_fov and assess_quality of another source tree (e.g. a copy of an older commit's two files),
    loaded beside this one under other module names, so that both are timed in one process, interleaved."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("other_fov", tree / "edgeretina/preprocess/fov.py")
    fov = importlib.util.module_from_spec(spec)
    sys.modules["other_fov"] = fov
    spec.loader.exec_module(fov)
    source = (tree / "edgeretina/quality.py").read_text()
    source = source.replace("from edgeretina.preprocess import FieldOfView, detect_fov",
                            "from other_fov import FieldOfView, detect_fov")
    quality = types.ModuleType("other_quality")
    sys.modules["other_quality"] = quality
    exec(compile(source, str(tree / "edgeretina/quality.py"), "exec"), quality.__dict__)
    return fov.detect_fov, quality.assess_quality


def timing(runs: int, other: Path | None = None, size: int = 1411) -> dict:
    from skimage import data as skimage_data

    from edgeretina.timing import interleaved_median_ms

    cv2.setNumThreads(1)  # the grader's IMAGE_THREADS
    photos = {"retina.jpg": skimage_data.retina()}
    for name in FRAMINGS:
        photos[f"phantom {name}"] = camera_jpeg(render_case(7, PhantomConfig(size=size, framing=name, faults="none")))
    gates = {"this": (detect_fov, assess_quality)}
    if other is not None:
        gates["other"] = _other_gate(other)
    calls = {}
    for version, (find, judge_quality) in gates.items():
        for name, rgb in photos.items():
            fov = find(rgb)
            calls[f"{version}|fov|{name}"] = lambda rgb=rgb, find=find: find(rgb)
            calls[f"{version}|quality|{name}"] = lambda rgb=rgb, fov=fov, q=judge_quality: q(rgb, fov)
    medians = interleaved_median_ms(calls, runs)
    result = {"runs": runs, "opencv_threads": 1, "phantom_size": size, "other_tree": str(other) if other else None}
    for version in gates:
        per_photo = {}
        for name, rgb in photos.items():
            fov_ms, quality_ms = medians[f"{version}|fov|{name}"], medians[f"{version}|quality|{name}"]
            per_photo[name] = {"shape": list(rgb.shape[:2]), "fov_ms": round(fov_ms, 2),
                               "quality_ms": round(quality_ms, 2), "gate_ms": round(fov_ms + quality_ms, 2)}
        phantom = [v["gate_ms"] for k, v in per_photo.items() if k.startswith("phantom")]
        result[version] = {"per_photo": per_photo, "retina_gate_ms": per_photo["retina.jpg"]["gate_ms"],
                           "phantom_median_gate_ms": round(statistics.median(phantom), 2)}
    return result


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _min(values):
    values = [v for v in values if v is not None]
    return round(min(values), 4) if values else None


def _max(values):
    values = [v for v in values if v is not None]
    return round(max(values), 4) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--label", default="working tree")
    parser.add_argument("--per-framing", type=int, default=50)
    parser.add_argument("--per-fault", type=int, default=60)
    parser.add_argument("--per-bound", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--timing-size", type=int, default=1411, help="height of the timed phantom photographs")
    parser.add_argument("--cases", type=Path, help="also write every judged photograph (measures, reasons) here")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true", help="only the time per image")
    parser.add_argument("--compare-with", type=Path, help="a source tree whose fov.py and quality.py are timed beside "
                                                          "these, interleaved in the same process")
    args = parser.parse_args(argv)

    from edgeretina.bench import machine_info
    from edgeretina.cpu import cpu_class

    started, load_before = time.perf_counter(), os.getloadavg()
    if args.timing_only:
        times = timing(args.runs, args.compare_with, args.timing_size)
        result = {"label": args.label, "machine": {**machine_info(), "cpu_class": cpu_class()}, "timing": times,
                  "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        for version in ("this", "other"):
            if version in times:
                print(f"{version}: retina gate {times[version]['retina_gate_ms']} ms, phantom median "
                      f"{times[version]['phantom_median_gate_ms']} ms")
        return 0
    print(f"framings ({args.per_framing} each, {args.size} px, no fault):", flush=True)
    framings = framing_table(args.per_framing, args.size)
    print(f"  false ungradable: {framings['ungradable']} / {framings['n']} "
          f"({100 * framings['false_ungradable_rate']:.1f} %)")
    print(f"faults ({args.per_fault} each, {args.size} px, framings cycling):", flush=True)
    faults = fault_table(args.per_fault, args.size)
    print(f"faults at the weak end of their range ({args.per_bound} each):", flush=True)
    faults["at_bound"] = bound_table(args.per_bound, args.size)
    print(f"faults outside their range ({args.per_bound} each):", flush=True)
    faults["outside_range"] = beyond_table(args.per_bound, args.size)
    retina = retina_table()
    print(f"timing (1411 px, decode excluded, {args.runs} rounds, 1 OpenCV thread):", flush=True)
    times = None if args.no_timing else timing(args.runs, args.compare_with, args.timing_size)
    if times:
        for version in ("this", "other"):
            if version in times:
                t = times[version]
                print(f"  {version}: retina.jpg fov {t['per_photo']['retina.jpg']['fov_ms']} ms + quality "
                      f"{t['per_photo']['retina.jpg']['quality_ms']} ms; phantom framings median gate "
                      f"{t['phantom_median_gate_ms']} ms")
    result = {
        "label": args.label,
        "machine": {**machine_info(), "cpu_class": cpu_class()},
        "settings": {"per_framing": args.per_framing, "per_fault": args.per_fault, "size": args.size,
                     "runs": args.runs, "date": time.strftime("%Y-%m-%d"),
                     "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "framings": framings,
        "faults": faults,
        "retina": retina,
        "timing": times,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    if args.cases:
        args.cases.write_text(json.dumps(CASES) + "\n")
    print(f"{result['machine']['cpu']} ({result['machine']['cpu_class']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
