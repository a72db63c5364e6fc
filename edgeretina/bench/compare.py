"""A candidate's fidelity to the reference bundle, over the images both graded (the rules are the
core's, edgeretina/fidelity.py: the same cosine and QWK proxy as the export gate)."""

from __future__ import annotations

import numpy as np

from edgeretina.fidelity import agreement_kappa, cosine


def fidelity_vs_reference(reference: dict, candidate: dict) -> dict:
    """Grade agreement, 1 - QWK and mean embedding cosine over the images both graded.

    reference, candidate: a worker's fidelity reply, {"files", "grades", "embeddings"}."""
    ref_index = {f: i for i, f in enumerate(reference["files"])}
    pairs = [(ref_index[f], i) for i, f in enumerate(candidate["files"]) if f in ref_index]
    if not pairs:
        return {"agreement": None, "qwk_proxy_delta": None, "cosine": None}
    ref_grades = np.array([reference["grades"][r] for r, _ in pairs])
    grades = np.array([candidate["grades"][c] for _, c in pairs])
    a = np.array([reference["embeddings"][r] for r, _ in pairs], dtype=np.float64)
    b = np.array([candidate["embeddings"][c] for _, c in pairs], dtype=np.float64)
    return {"agreement": round(float((ref_grades == grades).mean()), 4),
            "qwk_proxy_delta": round(1.0 - agreement_kappa(ref_grades, grades), 4),
            "cosine": round(float(cosine(a, b).mean()), 6),
            "fidelity_images": len(pairs)}
