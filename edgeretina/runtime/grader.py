"""Grader: fundus photographs in, one record per image out — on the device, without torch.

Per image: decode -> field of view + quality gate -> shared preprocessing -> one forward pass of the
exported graph (grade logits, embedding, saliency in one go) -> calibrated post-processing from the
manifest -> nearest training cases from the bank. A file that fails gets an error record; the batch
goes on. Rendering, reports and folder watching live beside this class, not inside it.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np

from edgeretina.bundle import Bundle, load_bundle
from edgeretina.errors import EdgeRetinaError
from edgeretina.grades import grade_name
from edgeretina.preprocess import Geometry, ImageRef, ImageSource, detect_fov, iter_sources, normalize, prepare
from edgeretina.quality import assess_quality
from edgeretina.runtime.backends import create_runner, model_artifact, pick_backend
from edgeretina.runtime.knn import FeatureBank
from edgeretina.runtime.lesions import DEFAULT_THRESHOLD, find_lesions, lesion_overlay_map
from edgeretina.runtime.lesions import lesion_presence  # noqa: F401  (re-export)
from edgeretina.runtime.postprocess import grade_results
from edgeretina.runtime.verify import ensure_verified
from edgeretina.signing import TrustList, enforce_trust, resolve_trust


@dataclass
class GradeRecord:
    file: str
    # DICOM only: {frame, frames, laterality, study/series/sop_instance_uid, sop_class_uid}; a multi-frame
    # file gives one record per frame, in frame order. Never patient data (preprocess/dicom.py).
    dicom: dict | None = None
    gradable: bool | None = None
    quality: dict | None = None
    grade: int | None = None
    grade_name: str | None = None
    probabilities: list[float] | None = None
    referable_probability: float | None = None
    referable: bool | None = None
    screening: str | None = None            # "negative" | "referable" | "ungradable"; None on error
    neighbors: list[dict] = field(default_factory=list)
    knn_grade: int | None = None            # similarity-weighted vote of the neighbours: a second opinion
    lesions: list[dict] | None = None       # per lesion type: presence, count, regions (lesion head only; lesions.py)
    timings_ms: dict[str, float] = field(default_factory=dict)
    overlay: str | None = None              # path of the saliency overlay, when one was written
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class GradedImage:
    """A record plus what an overlay needs (kept out of the JSON record)."""

    record: GradeRecord
    image: np.ndarray | None = None          # decoded RGB photo
    geometry: Geometry | None = None
    saliency: np.ndarray | None = None       # [h, w] grid over the model input
    lesion_logits: np.ndarray | None = None  # [L, h', w'] the lesion head's grid (graphs with one), as `lesions` saw it
    lesion_thresholds: float | Sequence[float] = DEFAULT_THRESHOLD   # what `lesions` was decided with

    @property
    def overlay_map(self) -> np.ndarray | None:
        """The map the overlay draws, made when asked (not on the grading path): the lesion map relative to
        each type's threshold where the graph has a lesion head (it points at lesions; the class-agnostic
        saliency saturates over lesion-rich fields: benchmarks/results/2026-12-03-*/explanations, pointing
        0.995 vs 0.338), else the saliency."""
        if self.lesion_logits is None:
            return self.saliency
        return lesion_overlay_map(self.lesion_logits, self.lesion_thresholds)


@dataclass
class _Pending:
    graded: GradedImage
    prepared: np.ndarray


# OpenCV's own thread pool for decoding, the quality check and preprocessing. One thread: the images are
# at most ~1024 px after the scaled decode, and waking a pool costs more than it saves. On the project
# machine (2 cores), 768 px photo: decode 5.1 -> 2.2 ms, FOV + quality 6.2 -> 4.3 ms with 1 thread instead of
# OpenCV's default 2; it also keeps `--threads 1` to one thread and leaves `--threads N` to the model.
IMAGE_THREADS = 1


class Grader:
    def __init__(self, bundle: Bundle | str | os.PathLike, backend: str | None = None,
                 threads: int | None = None, device: str | None = None,
                 trust: "TrustList | str | os.PathLike | None" = "environment", verify: str = "cached"):
        """trust: the trust list a signed bundle must verify against before its model is loaded;
        "environment" (the default) reads $EDGERETINA_TRUST or the config location, a path loads that
        trust list, None requires no signature. Raises SignatureError for a bundle it does not trust.
        verify: "cached" (default) re-runs the export gate on this device once per bundle x backend x
        device x CPU and remembers the result, "always" re-runs it now, "off" skips it (runtime/verify.py).
        Raises VerificationError when this device does not reproduce the bundle's reference outputs."""
        cv2.setNumThreads(IMAGE_THREADS)   # process-wide: the grader owns the process on a device
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        name = None if isinstance(bundle, Bundle) else str(bundle)    # how messages call it: the user's path
        self.signature = enforce_trust(self.bundle, resolve_trust(trust), name=name)
        manifest = self.bundle.manifest
        self.preprocess = manifest.preprocess_config
        self.grading = manifest.grading_config
        self.backend = backend or pick_backend(manifest)
        artifact = model_artifact(manifest, self.backend)
        self.precision = artifact.precision
        self.runner = create_runner(self.backend, self.bundle.path(artifact), threads=threads, device=device,
                                    settings=manifest.export.get("runtime", {}).get(self.backend))
        _return_freed_heap()   # before the bank arrives on top of what the session load left behind
        self.bank = FeatureBank.load(self.bundle.root / manifest.bank["file"], threads) if manifest.bank else None
        self.k = int(manifest.bank.get("k", 5)) if manifest.bank else 0
        self.verification = ensure_verified(self.bundle, self.runner, self.backend, self.bank, verify, name=name)
        _return_freed_heap()

    def grades_and_embeddings(self, paths: Iterable[str | os.PathLike | ImageRef],
                              batch_size: int = 8) -> tuple[list[str], list[int], np.ndarray]:
        """(files, grades, embeddings [N, D] float32) of the gradable images among `paths`, through the
        same pipeline as `grade_iter`: what comparing two artifacts needs (records carry no embedding).
        Files that fail to decode or are ungradable are left out; a frame of a multi-frame DICOM is named
        `path#frame=N`."""
        files, prepared = [], []
        for source in iter_sources(paths):
            graded, image = self._load(source)
            if image is not None:
                files.append(source.label)
                prepared.append(image)
        grades, embeddings = [], []
        for start in range(0, len(prepared), batch_size):
            outputs = self.runner.run(normalize(np.stack(prepared[start:start + batch_size]), self.preprocess))
            grades += [r.grade for r in grade_results(outputs["ordinal_logits"], self.grading)]
            embeddings.append(outputs["embedding"].astype(np.float32))
        dim = int(self.bundle.manifest.model.get("embed_dim", 0))
        return files, grades, np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)

    def infer_prepared(self, prepared: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's raw outputs (by name, batch first) for images already in the model-input frame:
        uint8 [S, S, 3] or [N, S, S, 3] as `prepare` gives them. For edits of a prepared photo (the
        counterfactual's inpainting) that need a re-grade without decoding or detecting the field again;
        grade them with postprocess.grade_results(outputs["ordinal_logits"], self.grading)."""
        batch = prepared[None] if prepared.ndim == 3 else prepared
        return self.runner.run(normalize(np.ascontiguousarray(batch), self.preprocess))

    def grade(self, paths: Iterable[str | os.PathLike | ImageRef], batch_size: int = 8) -> list[GradeRecord]:
        return [graded.record for graded in self.grade_iter(paths, batch_size)]

    def grade_iter(self, paths: Iterable[str | os.PathLike | ImageRef], batch_size: int = 8) -> Iterator[GradedImage]:
        """Grade images in batches, yielding each as soon as its batch is done, in input order.

        One record per image: a photograph file is one, a DICOM file one per frame (its `dicom.frame`), an
        ImageRef with a frame only that frame; a file that cannot be read is one error record."""
        batch: list[ImageSource] = []
        for source in iter_sources(paths):
            batch.append(source)
            if len(batch) == batch_size:
                yield from self._grade_batch(batch)
                batch = []
        if batch:
            yield from self._grade_batch(batch)

    def _grade_batch(self, sources: list[ImageSource]) -> list[GradedImage]:
        pending, done = [], []
        for source in sources:
            graded, prepared = self._load(source)
            done.append(graded)
            if prepared is not None:
                pending.append(_Pending(graded, prepared))
        if pending:
            try:
                self._infer(pending)
            except EdgeRetinaError as exc:
                for item in pending:
                    item.graded.record.error = f"inference failed: {exc}"
        return done

    def _load(self, source: ImageSource) -> tuple[GradedImage, np.ndarray | None]:
        record = GradeRecord(file=source.ref.path, dicom=source.dicom)
        graded = GradedImage(record=record)
        started = time.perf_counter()
        try:
            rgb = source.decode(self.preprocess.decode_max_side)
        except EdgeRetinaError as exc:
            record.error = str(exc)
            return graded, None
        decoded = time.perf_counter()
        fov = detect_fov(rgb)
        quality = assess_quality(rgb, fov)
        record.gradable = quality.gradable
        record.quality = quality.to_dict()
        checked = time.perf_counter()
        record.timings_ms.update(decode=_ms(decoded - started), quality=_ms(checked - decoded))
        graded.image = rgb
        if not quality.gradable:
            record.screening = "ungradable"
            return graded, None
        prepared, graded.geometry = prepare(rgb, self.preprocess, fov)
        record.timings_ms["preprocess"] = _ms(time.perf_counter() - checked)
        return graded, prepared

    def _infer(self, pending: list[_Pending]) -> None:
        started = time.perf_counter()
        inputs = normalize(np.stack([p.prepared for p in pending]), self.preprocess)
        outputs = self.runner.run(inputs)
        inferred = time.perf_counter()
        results = grade_results(outputs["ordinal_logits"], self.grading)
        graded = time.perf_counter()
        neighbors = self.bank.search(outputs["embedding"], self.k) if self.bank is not None else [[]] * len(pending)
        finished = time.perf_counter()
        per_image = 1.0 / len(pending)
        for i, (item, result) in enumerate(zip(pending, results)):
            record = item.graded.record
            record.grade = result.grade
            record.grade_name = grade_name(result.grade)
            record.probabilities = result.probabilities
            record.referable_probability = result.referable_probability
            record.referable = result.referable
            record.screening = "referable" if result.referable else "negative"
            record.neighbors = [n.to_dict() for n in neighbors[i]]
            record.knn_grade = self.bank.vote(neighbors[i]) if neighbors[i] else None
            if "lesion_logits" in outputs:
                record.lesions = find_lesions(outputs["lesion_logits"][i], item.graded.geometry,
                                              self.grading.lesion_thresholds or DEFAULT_THRESHOLD)
            record.timings_ms.update(inference=_ms((inferred - started) * per_image),
                                     postprocess=_ms((graded - inferred) * per_image),
                                     knn=_ms((finished - graded) * per_image))
            item.graded.saliency = outputs["saliency"][i]
            if "lesion_logits" in outputs:
                item.graded.lesion_logits = outputs["lesion_logits"][i]
                item.graded.lesion_thresholds = self.grading.lesion_thresholds or DEFAULT_THRESHOLD


def _return_freed_heap() -> None:
    """Give the heap that loading freed back to the OS (glibc malloc_trim; a no-op elsewhere).

    ONNX Runtime's session creation parses the whole graph and frees most of it again, but glibc keeps the
    freed pages, and later allocations do not always reuse them. ViT-B-16 INT8 on ONNX Runtime, cold
    `edgeretina grade` of one photo: peak RSS 301 MB without this, 251 MB with it (OpenVINO: no change)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc (musl, macOS, Windows)
        pass


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
