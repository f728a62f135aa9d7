"""Inference variants of one trained detector, compared on the same weights: flip test-time augmentation and the
number of top voxels behind an image's evidence.

    python benchmarks/classification.py --minutes 15 --conf cls_network detector --extra-train 200 \\
        --extra-heldout 56 --save-model detector.pt
    python benchmarks/detector_variants.py --model detector.pt --extra-heldout 56

The held-out set is the classification benchmark's (the sample data's ``classification_heldout`` plus
``--extra-heldout`` generated cases). Every image goes through the ``classification`` infer task's transforms and
patch windows, once as it is and once per flip of its axes (7 flips). Each variant ranks the images by their
evidence: the mean lesion probability of their ``k`` most probable voxels, from the plain map, the map averaged
with its x-flip, or the average of all 8 maps (probabilities, or logits before the softmax). The evidence
calibration is monotonic and leaves every AUC unchanged, so it is left out. ``plain, top 8`` is what the server
computes and reproduces the benchmark's AUC for the same weights.

Writes ``detector_variants.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from classification import heldout_cases, pair_auc
from common import command, machine
from monai.transforms import Compose
from tqdm import tqdm

from labelloop_app.conf import ClassificationConf
from labelloop_app.detector import PatchWindowInferer, detector_input_transforms
from labelloop_app.networks import classification_network
from labelloop_app.transforms import volume_transforms

HERE = Path(__file__).resolve().parent
TOP_KS = (1, 4, 8, 16, 32, 64)
FLIPS = [f for r in range(4) for f in itertools.combinations((2, 3, 4), r)]
"""The identity and the 7 flips of a (batch, channel, x, y, z) volume's spatial axes."""


def load_detector(path: Path) -> torch.nn.Module:
    network = classification_network("detector", 2)
    state = torch.load(path, map_location="cpu")
    network.load_state_dict(state.get("model", state))
    return network.eval()


def lesion_maps(network: torch.nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Voxel lesion probability maps (flattened) of one image: plain, x-flip averaged, all 8 flips averaged (as
    probabilities and as logits)."""
    inferer = PatchWindowInferer()
    logits = []
    with torch.inference_mode():
        for flip in FLIPS:
            out = inferer(torch.flip(image, flip) if flip else image, network).float()
            logits.append(torch.flip(out, flip) if flip else out)
    probs = [torch.softmax(x, 1)[0, 1].flatten() for x in logits]
    return {
        "plain": probs[0],
        "x-flip": torch.stack(probs[:2]).mean(0),
        "8 flips": torch.stack(probs).mean(0),
        "8 flips, logits": torch.softmax(torch.stack(logits).mean(0), 1)[0, 1].flatten(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a detector saved by classification.py --save-model")
    ap.add_argument("--sample-data", type=Path, default=HERE.parent / "sample-data")
    ap.add_argument("--extra-heldout", type=int, default=56)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    conf = ClassificationConf(network="detector")
    transforms = Compose([*volume_transforms(conf), *detector_input_transforms(conf)])
    network = load_detector(args.model)
    evidence: Dict[str, List[float]] = {}
    truth, near = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for path, info in tqdm(heldout_cases(args.sample_data, Path(tmp), args.extra_heldout), desc="held-out"):
            maps = lesion_maps(network, transforms({"image": str(path)})["image"][None])
            for (name, m), k in itertools.product(maps.items(), TOP_KS):
                evidence.setdefault(f"{name}, top {k}", []).append(float(m.topk(k).values.mean()))
            truth.append(info["class"] == "lesion")
            near.append(bool(info.get("near_limit")))
    y, rare = np.array(truth), np.array(near)
    rows = []
    for name, scores in evidence.items():
        s = np.array(scores)
        rows.append(
            {
                "variant": name,
                "auc": pair_auc(s[y], s[~y]),
                "auc_plain_lesions": pair_auc(s[y & ~rare], s[~y]),
                "auc_near_limit": pair_auc(s[y & rare], s[~y]),
            }
        )
    result = {
        "command": command("detector_variants.py", argv),
        "machine": machine(),
        "seconds": time.time() - start,
        "cases": len(y),
        "rows": rows,
    }
    lines = [
        "# Detector inference variants on one set of weights",
        "",
        f"`{result['command']}` on {result['machine']}, {result['seconds']:.0f} s, {len(y)} held-out cases.",
        "",
        "| variant | ROC AUC | plain lesions | near the limit |",
        "|---|---|---|---|",
        *(
            f"| {r['variant']} | {r['auc']:.3f} | {r['auc_plain_lesions']:.3f} | {r['auc_near_limit']:.3f} |"
            for r in rows
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detector_variants.json").write_text(json.dumps(result, indent=1))
    (args.out / "detector_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
