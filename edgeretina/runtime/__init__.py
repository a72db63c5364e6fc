"""The on-device runtime: numpy + OpenCV + one inference backend. Never imports torch.

Where each concern lives: grader (a bundle in, records out: decode, quality gate, preprocess, model,
postprocess, KNN), backends/ (one runner per backend; registry: what exists and is installed; selection:
which backend and artifact grade a bundle), postprocess (calibrated grades), knn and knn_scorers (the
feature bank and its exact int8-prefiltered search; onnx_wire serializes that small graph), verify and
device_cache (the export gate re-run on this device, cached), batch (paths in, records out), watch
(a hot folder) and store (the SQLite results store watch and the service share), visuals, overlay and card (the pictures), report (JSON, CSV, the table), info (what a
bundle is and where it was verified).
"""

from edgeretina.runtime.grader import GradedImage, Grader, GradeRecord

__all__ = ["Grader", "GradeRecord", "GradedImage"]
