"""Segmentation scores for active learning: MC-dropout entropy, test-time-augmentation disagreement and a
bottleneck embedding, computed on a downsampled copy of each image with a private copy of the served network.

The same :class:`SegmentationScorer` runs in the server (:class:`SegmentationScoring`, MONAI Label's scoring
interface) and in ``benchmarks/active_learning.py``, so the study measures the code that annotators get.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Compose,
    EnsureTyped,
    Flip,
    Orientationd,
    ScaleIntensity,
    ShiftIntensity,
    Spacingd,
    Transform,
)
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from labelloop_app.activelearning.config import FEATURE_KEYS
from labelloop_app.activelearning.records import read_records, store_record
from labelloop_app.conf import SegmentationConf
from labelloop_app.networks import segmentation_network
from labelloop_app.transforms import LoadSITKd, intensity_transforms, plain_tensor
from labelloop_app.uncertainty import (
    disagreement,
    entropy,
    expected_dice_loss,
    mutual_information,
    sample_dice_loss,
)

logger = logging.getLogger(__name__)

TASK = "segmentation"
SCORES = ("entropy", "mutual_information", "expected_dice_loss", "sample_dice_loss", "tta")

# Test-time augmentations: (transform of the image, transform that puts the prediction back). After RAS
# orientation the spatial axes are (left-right, anterior-posterior, superior-inferior). Left-right flips are left
# out: the network would call the mirrored right kidney "kidney_left", which is disagreement about the label
# names, not about the image. Intensity changes stay within the training augmentation's range.
TTA: Dict[str, Tuple[Transform, Optional[Transform]]] = {
    "flip_ap": (Flip(spatial_axis=1), Flip(spatial_axis=1)),
    "flip_si": (Flip(spatial_axis=2), Flip(spatial_axis=2)),
    "brighter": (Compose([ScaleIntensity(minv=None, maxv=None, factor=0.1), ShiftIntensity(0.05)]), None),
    "darker": (Compose([ScaleIntensity(minv=None, maxv=None, factor=-0.1), ShiftIntensity(-0.05)]), None),
}


def enable_mc_dropout(network: torch.nn.Module) -> int:
    """Eval mode everywhere except dropout layers, which keep sampling: normalisation layers must use their
    inference behaviour, or the passes would differ for reasons unrelated to the model's uncertainty."""
    network.eval()
    n = 0
    for module in network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.train()
            n += 1
    return n


def find_bottleneck(network: torch.nn.Module, in_channels: int = 1, size: int = 32) -> Tuple[str, torch.nn.Module]:
    """The module whose output is the network's deepest representation: the lowest spatial resolution, and at that
    resolution the most channels (the outermost such module). Found with one small forward pass, so it works for
    every network of :mod:`labelloop_app.networks` without naming their layers."""
    outputs: Dict[str, Tuple[int, int]] = {}
    handles = []
    for name, module in network.named_modules():
        if not name:
            continue

        def hook(mod, args, out, name=name):
            if torch.is_tensor(out) and out.dim() == 5 and name not in outputs:
                outputs[name] = (int(np.prod(out.shape[2:])), int(out.shape[1]))

        handles.append(module.register_forward_hook(hook))
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            network(torch.zeros(1, in_channels, size, size, size, device=next(network.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)
    smallest = min(v[0] for v in outputs.values())
    widest = max(v[1] for v in outputs.values() if v[0] == smallest)
    modules = dict(network.named_modules())
    name = next(n for n in modules if outputs.get(n) == (smallest, widest))
    return name, modules[name]


class BottleneckEmbedding:
    """Forward hook that averages the bottleneck output over space and over every sliding window."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.total: Optional[torch.Tensor] = None
        self.count = 0
        self._handle = None

    def _hook(self, module, args, out) -> None:
        pooled = out.detach().float().mean(dim=tuple(range(2, out.dim()))).sum(dim=0)
        self.total = pooled if self.total is None else self.total + pooled
        self.count += out.shape[0]

    def __enter__(self) -> BottleneckEmbedding:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def vector(self) -> List[float]:
        if self.total is None:
            return []
        return [float(f"{v:.4g}") for v in (self.total / self.count).tolist()]


def appearance(image: np.ndarray, probabilities: np.ndarray, body: np.ndarray) -> List[float]:
    """How each structure looks in one scan: per foreground label, the mean and standard deviation of the
    normalised intensity weighted by the model's probability of that label, and the label's share of the body.

    The bottleneck of a network with instance normalisation is built to ignore a scan's overall intensities; these
    features keep them, per structure: what a contrast phase, a protocol or a scanner changes. A structure the
    model does not find gets zeros. ``image`` (D, H, W), ``probabilities`` (labels, D, H, W), ``body`` a mask."""
    out: List[float] = []
    volume = max(float(body.sum()), 1.0)
    for p in probabilities[1:]:
        mass = float(p.sum())
        if mass < 1.0:
            out += [0.0, 0.0, 0.0]
            continue
        mean = float((p * image).sum() / mass)
        std = math.sqrt(max(float((p * (image - mean) ** 2).sum() / mass), 0.0))
        out += [round(mean, 5), round(std, 5), round(mass / volume, 5)]
    return out


def layout(probabilities: np.ndarray, body: np.ndarray) -> List[float]:
    """Where each structure lies in one scan: per foreground label, the centre of the model's probability of that
    label as a fraction of the body's bounding box along each axis, and the label's share of the body.

    The bottleneck embedding is averaged over space, so a scan with its organs on the other side (situs inversus)
    or out of their usual order looks like any other; these features keep where each structure is. The axes are
    those of the RAS-oriented scoring input, so the first is always left-right. A structure the model does not
    find gets the box's centre and share 0. ``probabilities`` (labels, D, H, W), ``body`` a mask."""
    points = np.argwhere(body)
    low = points.min(axis=0) if len(points) else np.zeros(3)
    extent = np.maximum(points.max(axis=0) - low, 1) if len(points) else np.array(body.shape, dtype=float)
    volume = max(float(body.sum()), 1.0)
    out: List[float] = []
    for p in probabilities[1:]:
        p = np.asarray(p, dtype=np.float64)
        mass = float(p.sum())
        if mass < 1.0:
            out += [0.5, 0.5, 0.5, 0.0]
            continue
        # the centre along each axis from the marginal sums: no grid of coordinates as large as the image
        centre = [p.sum(axis=tuple(a for a in range(3) if a != axis)) @ np.arange(p.shape[axis]) for axis in range(3)]
        out += [round(float(v), 4) for v in (np.asarray(centre) / mass - low) / extent] + [round(mass / volume, 5)]
    return out


def window_size(shape: Sequence[int], roi: Sequence[int], multiple: int = 16) -> Tuple[int, ...]:
    """Sliding-window size for the downsampled image: the whole image when it is at most twice the training patch
    (overlapping windows would cost more than the padding), a multiple of 16 for the networks' downsamplings."""
    return tuple(min(2 * int(r), max(multiple, int(math.ceil(s / multiple)) * multiple)) for s, r in zip(shape, roi))


class SegmentationScorer:
    """Scores of one image for the segmentation strategies.

    - ``entropy``: predictive entropy of the mean of ``mc_samples`` MC-dropout passes (normalised to [0, 1]),
      averaged over the patient's body; ``mutual_information`` is its epistemic part (BALD, for ``bald``).
    - ``expected_dice_loss``: one minus the Dice the model expects of its prediction, per structure, from the mean
      MC-dropout probabilities; ``sample_dice_loss``: one minus the Dice agreement between the MC passes' masks.
      Both are in the units of the metric annotators care about, averaged over structures; stored for the queue
      and the benchmarks, no strategy ranks by them (``benchmarks/active_learning.py``: ranking by the first needs
      more labels than random).
    - ``tta``: fraction of the body's voxels whose label changes under a test-time augmentation (AP/SI flips,
      brighter, darker), averaged over the augmentations.

    The average runs over the body (CT: above the window's lower end; MR: non-zero), not over the voxels the
    model calls foreground: a model that fails on a case tends to spill low-confidence foreground over it, which
    dilutes a foreground average exactly on the cases it should rank first (``benchmarks/active_learning.py``
    measured the foreground average ranking hard cases *below* easy ones).
    - ``embedding``: the bottleneck features of the plain pass, averaged over space (for ``diversity``).
    - ``appearance``: how each structure looks in the scan, from the plain pass (:func:`appearance`; for
      ``diversity`` with ``--conf diversity_features appearance``).
    - ``layout``: where each structure lies in the body, from the plain pass (:func:`layout`; for ``diversity``
      with ``--conf diversity_features layout``).

    Images are resampled to ``spacing_factor`` times the inference spacing (2: eight times fewer voxels).
    """

    def __init__(
        self,
        conf: SegmentationConf,
        mc_samples: int = 8,
        tta: Sequence[str] = tuple(TTA),
        spacing_factor: float = 2.0,
        device: str = "cpu",
    ):
        unknown = [t for t in tta if t not in TTA]
        if unknown:
            raise ValueError(f"unknown test-time augmentations {unknown}; available: {', '.join(TTA)}")
        self.conf = conf
        self.mc_samples = int(mc_samples)
        self.tta = list(tta)
        self.spacing = tuple(float(s) * float(spacing_factor) for s in conf.target_spacing)
        self.device = torch.device(device)
        self._transforms = Compose(
            [
                LoadSITKd(keys="image"),
                Orientationd(keys="image", axcodes="RAS"),
                Spacingd(keys="image", pixdim=self.spacing, mode="bilinear"),
                *intensity_transforms("image", conf.modality, conf.ct_window),
                EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            ]
        )
        self._bottlenecks: Dict[type, str] = {}

    def load_image(self, path: str) -> torch.Tensor:
        """The image as the network sees it when scoring: ``(1, 1, X, Y, Z)`` at the scoring spacing."""
        return self._transforms({"image": path})["image"][None].to(self.device)

    def load_network(self, model_path: str) -> torch.nn.Module:
        """A private copy of the published model (inference keeps using its own)."""
        network = segmentation_network(self.conf.network, self.conf.out_channels).to(self.device)
        checkpoint = torch.load(model_path, map_location=self.device)
        network.load_state_dict(checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint)
        return network.eval()

    def body_mask(self, image: np.ndarray) -> np.ndarray:
        """Voxels inside the patient in the normalised image: CT above 0.05 (about 20 HU above the window's lower
        end, so fat counts and air does not); MR non-zero (the z-score leaves the background at 0)."""
        return image != 0 if self.conf.modality == "MR" else image > 0.05

    def bottleneck(self, network: torch.nn.Module) -> torch.nn.Module:
        """The bottleneck module of ``network``. Its name is found once per network class (the scorer's networks
        share one architecture) and looked up in each network: a module cached by ``id(network)`` could belong to
        a freed network whose id a new one reuses, and its hook would never fire."""
        key = type(network)
        if key not in self._bottlenecks:
            name, _ = find_bottleneck(network)
            logger.info("Embedding from the bottleneck %r of %s", name, key.__name__)
            self._bottlenecks[key] = name
        return network.get_submodule(self._bottlenecks[key])

    def score(
        self,
        network: torch.nn.Module,
        image: torch.Tensor,
        embedding_only: bool = False,
        wait: Optional[Callable[[], Any]] = None,
    ) -> Dict[str, Any]:
        """Scores of ``image`` (from :meth:`load_image`). ``wait`` is called before every network call, so that
        the caller can pause scoring while something more urgent (an annotator's inference) runs."""
        calls = 0

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            if wait is not None:
                wait()
            calls += 1
            return network(batch)

        inferer = SlidingWindowInferer(
            roi_size=window_size(image.shape[2:], self.conf.roi_size),
            sw_batch_size=max(1, int(self.conf.sw_batch_size)),
            overlap=0.25,
            mode="gaussian",
            padding_mode="constant",
        )
        network.eval()
        with torch.inference_mode():
            with BottleneckEmbedding(self.bottleneck(network)) as embedding:
                plain = torch.softmax(inferer(image, predictor), dim=1)[0]
            record: Dict[str, Any] = {"embedding": embedding.vector()}
            normalised = image[0, 0].cpu().numpy()
            body = self.body_mask(normalised)
            probabilities = plain.cpu().numpy()
            record["appearance"] = appearance(normalised, probabilities, body)
            record["layout"] = layout(probabilities, body)
            if embedding_only:
                record["network_calls"] = calls
                return record
            reference = plain.argmax(0)

            augmented = torch.stack([plain_tensor(TTA[name][0](image[0])) for name in self.tta])
            aug_probs = torch.softmax(inferer(augmented, predictor), dim=1)
            aug_labels = []
            for name, probs in zip(self.tta, aug_probs):
                inverse = TTA[name][1]
                aug_labels.append(plain_tensor(inverse(probs) if inverse is not None else probs).argmax(0))
            aug_labels = torch.stack(aug_labels)

            enable_mc_dropout(network)
            try:
                batch = image.expand(self.mc_samples, *image.shape[1:])
                mc_probs = torch.softmax(inferer(batch, predictor), dim=1)
            finally:
                network.eval()

        ref = reference.cpu().numpy()
        mc = mc_probs.cpu().numpy()
        aug = aug_labels.cpu().numpy()
        foreground = (mc.argmax(1) != 0).any(0) | (ref != 0)
        voxel_entropy = entropy(mc.mean(0))
        voxel_mi = mutual_information(mc)
        voxel_disagreement = disagreement(aug, ref)
        structures = range(1, mc.shape[1])

        def region_mean(values: np.ndarray, region: np.ndarray) -> float:
            return float(values[region].mean()) if region.any() else float(values.mean())

        record.update(
            {
                "entropy": round(region_mean(voxel_entropy, body), 6),
                "mutual_information": round(region_mean(voxel_mi, body), 6),
                "tta": round(region_mean(voxel_disagreement, body), 6),
                "expected_dice_loss": round(expected_dice_loss(mc.mean(0), structures), 6),
                "sample_dice_loss": round(sample_dice_loss(mc, structures), 6),
                "foreground_fraction": round(float(foreground[body].mean() if body.any() else foreground.mean()), 6),
                "mc_samples": self.mc_samples,
                "tta_transforms": list(self.tta),
                "network_calls": calls,
            }
        )
        return record


class SegmentationScoring(ScoringMethod):
    """Scores every image that lacks scores from the current model: full scores for unlabeled images, the
    feature vectors alone for labeled ones (they are the centres ``diversity`` measures distance from).

    At most ``max_images`` images per run; unscored images first, then those scored by an older model. Each
    record carries the model version, the seconds it took and when it was made; the run result has the totals.
    Request options: ``max_images``, ``force`` (re-score images already scored by the current model).
    """

    def __init__(
        self,
        scorer: SegmentationScorer,
        model_path: str,
        model_version: Callable[[], str],
        max_images: int,
        wait: Optional[Callable[[], Any]] = None,
        stop: Optional[threading.Event] = None,
    ):
        super().__init__(
            "MC-dropout entropy, test-time-augmentation disagreement and the bottleneck, appearance and layout "
            "features of each image, for the entropy, bald, tta, diversity and hybrid strategies"
        )
        self.scorer = scorer
        self.model_path = model_path
        self.model_version = model_version
        self.max_images = int(max_images)
        self.wait = wait
        self.stop = stop or threading.Event()
        self._network: Tuple[str, Optional[torch.nn.Module]] = ("", None)
        self._lock = threading.Lock()
        self._paused = 0.0

    def _pause(self) -> None:
        """Before each network call: wait while an annotator's inference runs, and count the time given up."""
        if self.wait is not None:
            waited = self.wait()
            if isinstance(waited, (int, float)):
                self._paused += float(waited)

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info.update(
            {
                "task": TASK,
                "scores": [*SCORES, *FEATURE_KEYS],
                "max_images": self.max_images,
                "spacing": list(self.scorer.spacing),
                "mc_samples": self.scorer.mc_samples,
                "tta": self.scorer.tta,
            }
        )
        return info

    def network(self, version: str) -> torch.nn.Module:
        if self._network[0] != version or self._network[1] is None:
            self._network = (version, self.scorer.load_network(self.model_path))
        return self._network[1]

    def plan(self, datastore: Datastore, version: str, force: bool = False) -> Tuple[List[Tuple[str, bool]], int]:
        """(image id, embedding only) in the order they should be scored, and how many are already up to date."""
        records = read_records(datastore, TASK)
        unlabeled = set(datastore.get_unlabeled_images())
        todo: List[Tuple[int, str, bool]] = []
        current = 0
        for image_id in sorted(datastore.list_images()):
            record = records.get(image_id, {})
            labeled = image_id not in unlabeled
            up_to_date = record.get("model_version") == version and (labeled or "entropy" in record)
            if up_to_date and not force:
                current += 1
                continue
            priority = (2 if labeled else 0) + (1 if record else 0)
            todo.append((priority, image_id, labeled))
        todo.sort()
        return [(image_id, labeled) for _, image_id, labeled in todo], current

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        with self._lock:
            start = time.time()
            version = self.model_version()
            if not version:
                return {"method": TASK, "model_version": None, "scored": 0, "reason": "no trained model yet"}
            network = self.network(version)
            todo, current = self.plan(datastore, version, bool(request.get("force", False)))
            limit = int(request.get("max_images", self.max_images))
            per_image: Dict[str, float] = {}
            self.stop.clear()
            self._paused = 0.0
            for image_id, labeled in todo[:limit]:
                if self.stop.is_set():
                    break
                t0 = time.time()
                path = datastore.get_image_uri(image_id)
                if not path:
                    continue
                try:
                    record = self.scorer.score(network, self.scorer.load_image(path), labeled, self._pause)
                except Exception as e:  # one unreadable image must not stop the run
                    logger.warning("Scoring %s failed: %s", image_id, e)
                    continue
                seconds = round(time.time() - t0, 3)
                record.update(
                    {
                        "model_version": version,
                        "seconds": seconds,
                        "ts": int(time.time()),
                        "labeled": labeled,
                        "spacing": list(self.scorer.spacing),
                    }
                )
                if store_record(datastore, image_id, TASK, record):
                    per_image[image_id] = seconds
            total = round(time.time() - start, 3)
            result = {
                "method": TASK,
                "model_version": version,
                "scored": len(per_image),
                "skipped": current,
                "remaining": max(0, len(todo) - len(per_image)),
                "seconds": total,
                "seconds_per_image": round(float(np.mean(list(per_image.values()))), 3) if per_image else None,
                "per_image": per_image,
                "paused_seconds": round(self._paused, 3),
                "stopped": self.stop.is_set(),
            }
            logger.log(
                logging.INFO if per_image else logging.DEBUG,
                "Scored %d images with model %s in %.1fs (%d already scored)",
                len(per_image),
                version,
                total,
                current,
            )
            return result
