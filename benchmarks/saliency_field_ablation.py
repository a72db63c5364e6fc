"""Ablation of the in-graph field-of-view restriction (GraderModel.field_weights): the model's saliency with
forward_heads(field=None), scored by evaluate-saliency like the shipped map.

Usage: python benchmarks/saliency_field_ablation.py CKPT --data phantom:DIR --out DIR [--limit 300]
Prints the edge-ring mass and the pointing game (any lesion); compare with `edgeretina evaluate-saliency CKPT
--methods saliency` on the same images. The report records the machine it ran on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgeretina.evaluation import saliency as S

NAME = "saliency-no-field"


def _unrestricted(context, batch) -> S.Maps:
    import torch

    from edgeretina.preprocess import normalize

    x = torch.from_numpy(normalize(np.ascontiguousarray(batch.prepared), context.preprocess))
    model = context.model.eval()
    with torch.no_grad():
        pooled, tokens, *rest = model.forward_features(x)
        shallow, fine = (rest + [None, None])[:2]
        out = model.forward_heads(pooled, tokens, shallow, field=None, fine=fine)
    return S.Maps(grid=out["saliency"].float().numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()
    S.register_method(S.Method(NAME, "the model's saliency without the field restriction", _unrestricted))
    config = S.SaliencyEvalConfig(target=args.checkpoint, data=(args.data,), out=args.out, methods=(NAME,),
                                  limit=args.limit, examples=2)
    report, _ = S.evaluate_saliency(config, log=print)
    method = report["methods"][NAME]
    print(f"edge-ring mass {method['edge_ring_mass']['estimate']:.3f}, "
          f"pointing (any lesion) {method['types']['any']['pointing']['estimate']:.3f}")


if __name__ == "__main__":
    main()
