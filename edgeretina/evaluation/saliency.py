"""`edgeretina evaluate-saliency CKPT|BUNDLE --data phantom:DIR`: do the explanation maps point at lesions?

Every method's map of every gradable image is brought onto the original photograph (bilinear, through the
preprocessing geometry: `map_to_original`, the way the overlay draws it) and scored against the
dataset's per-lesion masks (masks/<CODE>/<case_id>.png beside labels.csv, the phantom's layout) with
`saliency_metrics`: pointing game, average precision, mass inside the lesions, mass on the field's edge.

Methods are a small registry (`METHODS`, `register_method`): a name -> a callable that makes maps for one
batch of prepared images. Built in:

- "saliency": the graph's own saliency output, the map that ships (checkpoint: torch; bundle: what
  `Grader.grade` returns, so an INT8 bundle is scored on its INT8 map);
- "lesion": sigmoid(lesion_logits) per lesion type, each type scored with its own map; class-agnostic
  = the max over types (models with a lesion head only);
- "gradcam", "gradcam++": training/gradcam.py's Grad-CAM of the referable score (checkpoints: autograd);
- "counterfactual": runtime/counterfactual.py's removal map (bundles: it re-grades on the runtime), with the
  evidence `explain` uses (the lesion map where the bundle has a lesion head); "counterfactual-saliency": the
  same driven by the saliency map, for comparison.
Other modules add theirs with `register_method`; maps computed elsewhere in the photo's frame come in
through `precomputed_method`.

Checkpoints and bundles both pass the runtime's quality gate (decode, field of view, `assess_quality`), so
the FP32 and INT8 tables score the same images; refused and unreadable images are counted, not scored.
torch is imported only for a checkpoint, the runtime only for a bundle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np

from edgeretina.dataset import LabeledImage
from edgeretina.errors import ConfigError, DatasetError, EdgeRetinaError, MissingDependencyError
from edgeretina.evaluation.saliency_metrics import (DEFAULT_RING_FRACTION, DEFAULT_TOLERANCE, field_masks,
                                                    image_scores)
from edgeretina.evaluation.saliency_report import (Example, LesionStats, MethodScores, saliency_report,
                                                   write_saliency_report)
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import Geometry, PreprocessConfig, decode_image, map_to_original

Logger = Callable[[str], None]
LESION_OUTPUT = "lesion_logits"
CHECKPOINT, BUNDLE = "checkpoint", "bundle"
UNREADABLE, UNGRADABLE, INFERENCE_FAILED = "unreadable", "ungradable (quality gate)", "inference failed"
EXAMPLE_SIDE = 320     # the examples figure shows photos and maps at most this size


# --- what a method sees and gives -----------------------------------------------------------------

@dataclass
class ModelContext:
    """The model under evaluation: a checkpoint's torch model or a bundle's runtime Grader."""

    kind: str                               # CHECKPOINT | BUNDLE
    preprocess: PreprocessConfig
    output_names: tuple[str, ...]
    model: Any = None                       # GraderModel (checkpoint)
    grader: Any = None                      # runtime Grader (bundle)
    meta: dict = field(default_factory=dict)
    counterfactual_grow: float = 0.0         # SaliencyEvalConfig.counterfactual_grow, for the counterfactual methods


@dataclass
class MapBatch:
    """One batch of gradable images, as the model sees them and as they were photographed."""

    context: ModelContext
    items: list[LabeledImage]
    prepared: np.ndarray                    # uint8 [B, S, S, 3]: the model-input squares
    geometries: list[Geometry]              # model input -> photo, per image
    photos: list[np.ndarray]                # decoded RGB photos
    graded: list | None = None              # bundle: the Grader's GradedImage per image (record, saliency)
    _outputs: dict | None = None

    def outputs(self) -> dict[str, np.ndarray]:
        """The graph's outputs on `prepared` (one forward pass per batch, shared by every method)."""
        if self._outputs is None:
            if self.context.kind == CHECKPOINT:
                from edgeretina.training.loop import predict
                self._outputs = predict(self.context.model, self.prepared, self.context.preprocess,
                                        batch_size=len(self.prepared))
            else:
                self._outputs = self.context.grader.infer_prepared(self.prepared)
        return self._outputs


@dataclass
class Maps:
    """A method's maps for one batch: grids over the model input (`grid` [B, h, w] class-agnostic and/or
    `per_type` [B, L, h, w] in LESION_CODES order; without `grid` the agnostic map is the max over types),
    or `original`: one class-agnostic map per image already in its photo's frame ([H, W] each)."""

    grid: np.ndarray | None = None
    per_type: np.ndarray | None = None
    original: list[np.ndarray] | None = None


@dataclass(frozen=True)
class Method:
    """name -> maps. `unavailable(context)` gives the reason the method cannot run on this model (None: it
    can): a report lists the reason instead of failing."""

    name: str
    description: str
    produce: Callable[[ModelContext, MapBatch], Maps]
    unavailable: Callable[[ModelContext], str | None] = lambda context: None


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry. Raises ConfigError for a name already taken (unless replace)."""
    if method.name in METHODS and not replace:
        raise ConfigError(f"saliency method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def precomputed_method(name: str, maps: Mapping[str, np.ndarray], description: str = "precomputed maps") -> Method:
    """A method whose maps were made elsewhere: case_id -> float [H, W] in the photo's decoded frame.
    Scoring raises ConfigError for an image it holds no map for, or a map of another size."""
    def produce(context: ModelContext, batch: MapBatch) -> Maps:
        out = []
        for item in batch.items:
            if item.case_id not in maps:
                raise ConfigError(f"method {name!r} has no map for case {item.case_id!r}")
            out.append(np.asarray(maps[item.case_id], np.float32))
        return Maps(original=out)

    return Method(name, description, produce)


# --- the built-in methods -------------------------------------------------------------------------

def _saliency(context: ModelContext, batch: MapBatch) -> Maps:
    if batch.graded is not None:                # exactly the map `grade` returns
        return Maps(grid=np.stack([g.saliency for g in batch.graded]))
    return Maps(grid=batch.outputs()["saliency"])


def _saliency_deep(context: ModelContext, batch: MapBatch) -> Maps:
    """A gated model's deep map alone (the fusion's input; not exported): what the gate adds, measured."""
    import torch

    from edgeretina.preprocess import normalize

    images = torch.from_numpy(normalize(np.ascontiguousarray(batch.prepared), context.preprocess))
    context.model.eval()
    with torch.no_grad():
        return Maps(grid=context.model(images)["saliency_deep"].float().numpy())


def _not_gated(context: ModelContext) -> str | None:
    if context.kind != CHECKPOINT:
        return "the deep map alone is not exported: evaluate the checkpoint"
    if getattr(context.model, "shallow_head", None) is None:
        return "the model's saliency is the deep map already (saliency 'deep')"
    return None


def _lesion(context: ModelContext, batch: MapBatch) -> Maps:
    logits = batch.outputs()[LESION_OUTPUT].astype(np.float64)
    return Maps(per_type=(1.0 / (1.0 + np.exp(-logits))).astype(np.float32))


def _no_lesion_head(context: ModelContext) -> str | None:
    return None if LESION_OUTPUT in context.output_names else "the model has no lesion head (no lesion_logits output)"


def _gradcam(kind: str) -> Callable[[ModelContext, MapBatch], Maps]:
    def produce(context: ModelContext, batch: MapBatch) -> Maps:
        import torch

        from edgeretina.preprocess import normalize
        from edgeretina.training.gradcam import grad_cam

        images = torch.from_numpy(normalize(np.ascontiguousarray(batch.prepared), context.preprocess))
        return Maps(grid=grad_cam(context.model, images, target="referable", method=kind))
    return produce


def _gradcam_unavailable(context: ModelContext) -> str | None:
    if context.kind != CHECKPOINT:
        return "needs autograd: evaluate the checkpoint (torch), not a bundle"
    return _missing_module("edgeretina.training.gradcam", "grad_cam")


def _counterfactual(evidence: str) -> Callable[[ModelContext, MapBatch], Maps]:
    def produce(context: ModelContext, batch: MapBatch) -> Maps:
        from edgeretina.runtime.counterfactual import CounterfactualConfig, counterfactual_from, removed_region_map

        config = CounterfactualConfig(evidence=evidence, grow_cells=context.counterfactual_grow)
        return Maps(original=[removed_region_map(counterfactual_from(context.grader, graded, config))
                              for graded in batch.graded])
    return produce


def _counterfactual_unavailable(context: ModelContext) -> str | None:
    if context.kind != BUNDLE:
        return "re-grades on the runtime: evaluate the exported bundle"
    return _missing_module("edgeretina.runtime.counterfactual", "counterfactual_from", "removed_region_map")


def _missing_module(module: str, *names: str) -> str | None:
    """None when `module` imports and holds `names`, else why not (the module may not be written yet)."""
    import importlib

    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not available ({exc})"
    missing = [name for name in names if not hasattr(loaded, name)]
    return f"{module} has no {', '.join(missing)}" if missing else None


for _method in (
    Method("saliency", "the graph's saliency output (the map that ships)", _saliency),
    Method("saliency-deep", "a gated model's deep patch-prototype map alone (checkpoint only)", _saliency_deep,
           _not_gated),
    Method("lesion", "sigmoid(lesion_logits) per lesion type; class-agnostic: max over types", _lesion,
           _no_lesion_head),
    Method("gradcam", "Grad-CAM of the referable ordinal logit (torch autograd)", _gradcam("gradcam"),
           _gradcam_unavailable),
    Method("gradcam++", "Grad-CAM++ of the referable ordinal logit (torch autograd)", _gradcam("gradcam++"),
           _gradcam_unavailable),
    Method("counterfactual", "regions inpainted until grade 0, earlier removals stronger (runtime; what `explain` "
           "removes: the lesion map's cells with a lesion head, else the saliency's)", _counterfactual("auto"),
           _counterfactual_unavailable),
    Method("counterfactual-saliency", "the counterfactual driven by the graph's saliency map whatever the bundle has "
           "(runtime)", _counterfactual("saliency"), _counterfactual_unavailable),
):
    register_method(_method)


# --- the evaluation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SaliencyEvalConfig:
    """target: checkpoint (.pt) or bundle (folder with manifest.json, or .zip); data: FORMAT:PATH specs
    whose labels.csv has masks/<CODE>/ beside it; methods: names from METHODS (None: all of them);
    limit: score the first N images only; tolerance: pointing-game tolerance as a fraction of the field
    diameter; ring_fraction: the outer share of the field's radius counted as its edge; examples: rows of
    the examples figure; counterfactual_grow: the counterfactual methods' CounterfactualConfig.grow_cells.
    Raises ConfigError on values out of range."""

    target: Path
    data: tuple[str, ...]
    out: Path
    methods: tuple[str, ...] | None = None
    backend: str | None = None
    limit: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    ring_fraction: float = DEFAULT_RING_FRACTION
    n_bootstrap: int = 1000
    seed: int = 0
    examples: int = 4
    batch_size: int = 8
    counterfactual_grow: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", Path(self.target))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        if not 0.0 <= float(self.tolerance) <= 0.5:
            raise ConfigError(f"tolerance is a fraction of the field diameter in 0..0.5, got {self.tolerance!r}")
        if not 0.0 <= float(self.counterfactual_grow) <= 4.0:      # (false for nan)
            raise ConfigError(f"counterfactual_grow must be in [0, 4] cells, got {self.counterfactual_grow!r}")
        if not 0.0 < float(self.ring_fraction) < 1.0:
            raise ConfigError(f"ring_fraction must be in (0, 1), got {self.ring_fraction!r}")
        for name, low in (("limit", 1), ("n_bootstrap", 1), ("examples", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if value is None and name == "limit":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def evaluate_saliency(config: SaliencyEvalConfig, log: Logger = print) -> tuple[dict, dict[str, Path]]:
    """Score every requested method's maps against the lesion masks; write report.json, report.md and
    examples.png under config.out. Returns (report, {file name: path}).

    Raises ConfigError for an unknown method (listing the known ones) or when no requested method can
    run on this model; DatasetError when the data has no masks/<CODE>/ folder (naming it), loads no image,
    or none is left to score; what loading the checkpoint or bundle raises."""
    from edgeretina.cpu import cpu_class, cpu_info
    from edgeretina.layouts import load_data

    started = time.perf_counter()
    loaded = load_data(config.data)
    for line in loaded.summary.lines():
        log(line)
    items = list(loaded.items[:config.limit] if config.limit else loaded.items)
    check_masks(items)
    check_known(config.methods)
    context = open_model(config.target, config.backend, log)
    context.counterfactual_grow = config.counterfactual_grow
    methods, skipped = resolve_methods(config.methods, context)
    for name, reason in skipped.items():
        log(f"method {name} skipped: {reason}")
    scores = {m.name: MethodScores(m.name, m.description) for m in methods}
    lesions, examples, excluded = LesionStats(), [], {}
    tolerances = []
    images = _gradable_images(context, items, config.batch_size, excluded, log)
    for batch in _batches(context, images, config.batch_size):
        masks = [load_masks(item, photo.shape[:2]) for item, photo in zip(batch.items, batch.photos)]
        fields = [_field(geometry, photo.shape[:2], config.ring_fraction)
                  for geometry, photo in zip(batch.geometries, batch.photos)]
        tolerances += [config.tolerance * 2.0 * g.fov.radius for g in batch.geometries]
        new_examples = _pick_examples(batch, masks, config.examples - len(examples))
        for (fov, ring), image_masks in zip(fields, masks):
            lesions.add(image_masks, fov, ring)
        for method in methods:
            _score_batch(method, context, batch, masks, fields, tolerances[-len(batch.items):], scores[method.name],
                         new_examples)
        examples += new_examples.values()
    if not tolerances:
        raise DatasetError(f"no image left to score (excluded: {excluded or 'none'})")
    meta = {**context.meta, "data": list(config.data), "counterfactual_grow_cells": config.counterfactual_grow,
            "data_summary": loaded.summary.to_dict(),
            "cpu": cpu_info()[0], "cpu_class": cpu_class(), "seconds": round(time.perf_counter() - started, 1)}
    report = saliency_report(scores, skipped, lesions, n_images=len(tolerances), excluded=excluded,
                             tolerance={"fraction_of_field_diameter": config.tolerance,
                                        "mean_px": float(np.mean(tolerances))},
                             ring_fraction=config.ring_fraction, n_bootstrap=config.n_bootstrap, seed=config.seed,
                             meta=meta, order=requested_order(config.methods, scores, skipped))
    try:
        files = write_saliency_report(report, examples, config.out)
    except MissingDependencyError as exc:        # report.json and report.md are written before the figure
        log(f"examples figure skipped: {exc}")
        files = {name: config.out / name for name in ("report.json", "report.md")}
    log(f"saliency evaluation of {len(tolerances)} images, methods {', '.join(scores) or 'none'}, written to "
        f"{config.out} in {time.perf_counter() - started:.1f} s")
    return report, files


def resolve_methods(names: Sequence[str] | None, context: ModelContext) -> tuple[list[Method], dict[str, str]]:
    """(the methods that run, {name: why not} for those that cannot on this model). Raises ConfigError for
    an unknown name, listing the known ones, and when none of the requested methods can run."""
    check_known(names)
    requested = list(METHODS) if names is None else list(dict.fromkeys(names))
    runnable, skipped = [], {}
    for name in requested:
        reason = METHODS[name].unavailable(context)
        if reason is None:
            runnable.append(METHODS[name])
        else:
            skipped[name] = reason
    if not runnable:
        raise ConfigError("none of the requested methods can run on this model: "
                          + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()))
    return runnable, skipped


def requested_order(names: Sequence[str] | None, scores: Mapping, skipped: Mapping) -> list[str]:
    """The methods of a report in the order they were asked for (the registry's order by default)."""
    asked = list(METHODS) if names is None else list(dict.fromkeys(names))
    return [name for name in asked if name in scores or name in skipped]


def check_known(names: Sequence[str] | None) -> None:
    """Raises ConfigError for a method name the registry does not hold (or an empty list), listing the known."""
    if names is None:
        return
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ConfigError(f"unknown saliency method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"known: {', '.join(METHODS)}")


def open_model(target: Path, backend: str | None = None, log: Logger = print) -> ModelContext:
    """A checkpoint (torch) or a bundle (the runtime Grader, verified and trusted as `grade` does)."""
    from edgeretina.evaluation.sources import is_bundle

    if is_bundle(target):
        from edgeretina.runtime.grader import Grader

        grader = Grader(target, backend=backend)
        manifest = grader.bundle.manifest
        return ModelContext(BUNDLE, grader.preprocess, tuple(manifest.outputs.get("names", ())), grader=grader,
                            meta={"bundle": str(target), "backend": grader.backend, "precision": grader.precision,
                                  "model": manifest.model})
    if backend is not None:
        log(f"--backend {backend} ignored: {target} is a checkpoint (torch)")
    from edgeretina.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(target)
    return ModelContext(CHECKPOINT, ckpt.preprocess, tuple(ckpt.model.output_names), model=ckpt.model.eval(),
                        meta={"checkpoint": str(target), "model": ckpt.model_config.to_dict(), "precision": "fp32"})


def mask_paths(item: LabeledImage) -> dict[str, Path]:
    """masks/<CODE>/<case_id>.png beside the folder of the image (the phantom's layout; the same rule as
    training/data.py's lesion_mask_paths, restated here so a bundle's evaluation needs no torch)."""
    root = item.path.parent.parent
    return {code: root / "masks" / code / f"{item.case_id}.png" for code in LESION_CODES}


def check_masks(items: Sequence[LabeledImage]) -> None:
    """Raises DatasetError naming the first masks/<CODE> folder or mask file the data lacks."""
    if not items:
        raise DatasetError("no images to evaluate")
    seen: set[Path] = set()
    for item in items:
        for code, path in mask_paths(item).items():
            if path.parent not in seen:
                if not path.parent.is_dir():
                    raise DatasetError(f"saliency evaluation needs per-lesion masks: {path.parent} does not exist "
                                       f"(expected masks/<CODE>/<case_id>.png for {', '.join(LESION_CODES)} beside "
                                       "the images folder, as the phantom writes them)")
                seen.add(path.parent)
            if not path.is_file():
                raise DatasetError(f"saliency evaluation needs per-lesion masks: {path} does not exist")


def load_masks(item: LabeledImage, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """bool [H, W] per lesion code at the decoded photo's size (a scaled decode shrinks the masks too; a
    pixel is lesion when any lesion pixel falls in it)."""
    masks = {}
    for code, path in mask_paths(item).items():
        mask = decode_image(path)[..., 0] > 0
        if mask.shape != tuple(size):
            mask = cv2.resize(mask.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA) > 0
        masks[code] = mask
    return masks


# --- the pipeline's steps -------------------------------------------------------------------------

@dataclass
class _Image:
    item: LabeledImage
    photo: np.ndarray
    prepared: np.ndarray
    geometry: Geometry
    graded: Any = None


def _gradable_images(context: ModelContext, items: Sequence[LabeledImage], batch_size: int,
                     excluded: dict[str, int], log: Logger) -> Iterator[_Image]:
    source = _bundle_images if context.kind == BUNDLE else _checkpoint_images
    yield from source(context, items, batch_size, excluded, log)


def _checkpoint_images(context: ModelContext, items, batch_size, excluded, log) -> Iterator[_Image]:
    """The runtime's own steps (decode, field of view, quality gate, prepare), without its model."""
    from edgeretina.preprocess import detect_fov, prepare
    from edgeretina.quality import assess_quality

    for item in items:
        try:
            photo = decode_image(item.path, context.preprocess.decode_max_side, frame=item.frame)
        except EdgeRetinaError as exc:
            _exclude(excluded, UNREADABLE, log, f"skipped {item.path}: {exc}")
            continue
        fov = detect_fov(photo)
        if not assess_quality(photo, fov).gradable:
            _exclude(excluded, UNGRADABLE, log)
            continue
        prepared, geometry = prepare(photo, context.preprocess, fov)
        yield _Image(item, photo, prepared, geometry)


def _bundle_images(context: ModelContext, items, batch_size, excluded, log) -> Iterator[_Image]:
    """`Grader.grade_iter` exactly as `grade` runs it; the prepared input is rebuilt from its photo and
    field (prepare is deterministic), for the methods that need the graph's other outputs."""
    from edgeretina.preprocess import ImageRef, prepare

    grader = context.grader
    refs = [ImageRef(str(it.path), it.frame) for it in items]
    count = 0
    for count, graded in enumerate(grader.grade_iter(refs, batch_size=batch_size), start=1):
        if count > len(items):
            break
        item, record = items[count - 1], graded.record
        if record.gradable is None:
            _exclude(excluded, UNREADABLE, log, f"skipped {item.path}: {record.error}")
        elif not record.gradable:
            _exclude(excluded, UNGRADABLE, log)
        elif record.error or graded.saliency is None:
            _exclude(excluded, INFERENCE_FAILED, log, f"skipped {item.path}: {record.error}")
        else:
            prepared, _ = prepare(graded.image, grader.preprocess, graded.geometry.fov)
            yield _Image(item, graded.image, prepared, graded.geometry, graded)
    if count != len(items):     # one record per ImageRef with a frame or a single-image file
        raise DatasetError(f"{len(items)} images gave {count} records or more: give multi-frame DICOM files a frame")


def _exclude(excluded: dict[str, int], reason: str, log: Logger, line: str | None = None) -> None:
    excluded[reason] = excluded.get(reason, 0) + 1
    if line:
        log(line)


def _batches(context: ModelContext, images: Iterable[_Image], size: int) -> Iterator[MapBatch]:
    chunk: list[_Image] = []
    for image in images:
        chunk.append(image)
        if len(chunk) == size:
            yield _batch(context, chunk)
            chunk = []
    if chunk:
        yield _batch(context, chunk)


def _batch(context: ModelContext, chunk: list[_Image]) -> MapBatch:
    graded = [im.graded for im in chunk] if chunk[0].graded is not None else None
    return MapBatch(context=context, items=[im.item for im in chunk],
                    prepared=np.stack([im.prepared for im in chunk]), geometries=[im.geometry for im in chunk],
                    photos=[im.photo for im in chunk], graded=graded)


def _field(geometry: Geometry, size: tuple[int, int], ring_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    fov = geometry.fov
    return field_masks(size, fov.cx, fov.cy, fov.radius, ring_fraction)


def _score_batch(method: Method, context: ModelContext, batch: MapBatch, masks: list[dict], fields: list[tuple],
                 tolerances: list[float], scores: MethodScores, examples: dict[int, Example]) -> None:
    started = time.perf_counter()
    maps = method.produce(context, batch)
    for i, (image_masks, (fov, ring), tolerance) in enumerate(zip(masks, fields, tolerances)):
        agnostic, per_type = _maps_on_photo(maps, i, batch, method.name)
        scores.add(image_scores(agnostic, per_type, image_masks, fov, ring, tolerance), per_type is not None)
        if i in examples:
            examples[i].maps[method.name] = _small(agnostic, examples[i].photo.shape[:2])
    scores.seconds += time.perf_counter() - started


def _maps_on_photo(maps: Maps, i: int, batch: MapBatch, name: str) -> tuple[np.ndarray, dict | None]:
    """Image i's class-agnostic map and per-type maps (or None) on its photo."""
    size = batch.photos[i].shape[:2]
    if maps.original is not None:
        agnostic = np.asarray(maps.original[i], np.float32)
        if agnostic.shape != size:
            raise ConfigError(f"method {name!r} gave a {agnostic.shape} map for a {size} photo "
                              f"({batch.items[i].case_id})")
        return agnostic, None
    geometry = batch.geometries[i]
    per_type = None
    if maps.per_type is not None:
        per_type = {code: map_to_original(grid, geometry) for code, grid in zip(LESION_CODES, maps.per_type[i])}
    if maps.grid is not None:
        agnostic = map_to_original(np.asarray(maps.grid[i], np.float32), geometry)
    elif per_type is not None:
        agnostic = map_to_original(np.asarray(maps.per_type[i], np.float32).max(axis=0), geometry)
    else:
        raise ConfigError(f"method {name!r} gave no map")
    return agnostic, per_type


def _pick_examples(batch: MapBatch, masks: list[dict], wanted: int) -> dict[int, Example]:
    """The first `wanted` images of the batch with any lesion: their photo and masks, small."""
    picked: dict[int, Example] = {}
    for i, image_masks in enumerate(masks):
        if len(picked) >= wanted:
            break
        if any(mask.any() for mask in image_masks.values()):
            photo = batch.photos[i]
            scale = min(1.0, EXAMPLE_SIDE / max(photo.shape[:2]))
            size = (max(1, round(photo.shape[0] * scale)), max(1, round(photo.shape[1] * scale)))
            small_photo = cv2.resize(photo, (size[1], size[0]), interpolation=cv2.INTER_AREA) if scale < 1 else photo
            picked[i] = Example(case_id=batch.items[i].case_id, grade=batch.items[i].grade, photo=small_photo,
                                masks={code: _small(m.astype(np.float32), size) > 0 for code, m in image_masks.items()})
    return picked


def _small(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
