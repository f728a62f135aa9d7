"""The ``detector`` classifier: a segmentation network that maps where each class shows, trained from findings.

Image-level labels alone did not teach a 3D CNN to find a lesion of a few voxels within a CPU budget
(``benchmarks/results/classification.md``); a mark where the lesion is did. The detector is MONAI's residual UNet
with one output channel per class. Training paints each finding (centre and radius from the class label, see
:mod:`labelloop_app.class_labels`) as a ball of its class on the preprocessed grid and learns from patches, most
of them near findings; an image without findings of a non-first class teaches nothing where, so it is left out.
The network sees the volume as it was trained, in patch-sized sliding windows (:class:`PatchWindowInferer`): its
instance normalisation is computed per window, and a whole torso normalises a lesion far from how a patch did.
An image's evidence for class ``k >= 1`` is the mean of its ``TOP_K`` most probable voxels for ``k``; the first
class (``normal``) gets what the strongest other class leaves. The class map itself is the explanation.

The evidence ranks images well but is not a probability: the loss weights finding voxels up, so a normal image's
strongest voxels sit near 0.5. Each finding class therefore has a bias on the logit of its evidence, fitted on the
validation images after every validation (:class:`EvidenceCalibration`) and saved with the weights as the buffer
``evidence_bias`` of :class:`ClassMapUNet`; probabilities are those of a cohort with equal class frequencies.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import MapTransform, Randomizable, ScaleIntensityRanged

TOP_K = 8
"""Voxels whose mean probability is an image's probability of a class: a few, so one noisy voxel does not decide."""

SOFT_TISSUE = (0.55, 0.65)
"""Where the [0, 1] CT window (-175 to 250 HU) puts 59 and 101 HU: rescaled to 0 and 1, a 42.5 HU lesion is one
unit. In [0, 1] a lesion is a tenth of the range, and the networks learned it far more slowly (see the results)."""

FINDINGS = "findings"
CLASS_INDEX = "class_index"
EVIDENCE = "evidence"
EVIDENCE_BIAS = "evidence_bias"
PATCH_SIZE = "patch_size"
DEFAULT_PATCH = 32
"""Training patch, voxels per side. On two CPU cores a training step of 4 patches takes 0.04 s at 32 voxels and
0.28 s at 48, and in the classification benchmark's 15 minutes the trainer gets through 1.7 times as many patches
(``benchmarks/results/classification.md``). At 3.5 mm a patch still spans 11 cm around a finding."""
LEGACY_PATCH = 48
"""The patch of models saved before ``patch_size`` was stored with the weights."""


class ClassMapUNet(UNet):
    """MONAI's UNet with one output channel per class, plus what inference needs to know of its training, saved and
    loaded with the weights: ``evidence_bias`` (one logit offset per finding class, see :class:`EvidenceCalibration`)
    and ``patch_size`` (the training patch, voxels per side: the sliding window at inference). A state dict from
    before these buffers existed loads with no offset and the patch of its time (``LEGACY_PATCH``)."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(out_channels=num_classes, **kwargs)
        self.register_buffer(EVIDENCE_BIAS, torch.zeros(max(int(num_classes) - 1, 0)))
        self.register_buffer(PATCH_SIZE, torch.tensor(DEFAULT_PATCH, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + EVIDENCE_BIAS, torch.zeros_like(self.evidence_bias))
        state_dict.setdefault(prefix + PATCH_SIZE, torch.tensor(LEGACY_PATCH, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The network itself, out of ``DistributedDataParallel`` (multi-GPU training) if wrapped."""
    return getattr(network, "module", network)


class PatchWindowInferer(Inferer):
    """Sliding windows of the network's training patch (``patch`` when given, else the network's ``patch_size``),
    a quarter overlapping, blended with Gaussian weights."""

    def __init__(self, patch: Optional[int] = None, sw_batch_size: int = 4):
        super().__init__()
        self.patch, self.sw_batch_size = patch, sw_batch_size

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        patch = self.patch or int(getattr(unwrapped(network), PATCH_SIZE, DEFAULT_PATCH))
        windows = SlidingWindowInferer(
            roi_size=[int(patch)] * 3, sw_batch_size=self.sw_batch_size, overlap=0.25, mode="gaussian"
        )
        return windows(inputs, network, *args, **kwargs)


def detector_input_transforms(conf) -> list:
    """After the whole-volume pipeline, CT in soft-tissue units (lesion contrast matters, not bone or air)."""
    if conf.modality != "CT":
        return []
    lo, hi = SOFT_TISSUE
    return [ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=False)]


def image_evidence(logits: torch.Tensor, top_k: int = TOP_K) -> torch.Tensor:
    """Evidence (C - 1,) of one image for each finding class: the mean of its ``top_k`` most probable voxels."""
    voxel = torch.softmax(logits.float(), dim=0).flatten(1)
    k = min(int(top_k), voxel.shape[1])
    return voxel[1:].topk(k, dim=1).values.mean(dim=1)


def evidence_probabilities(evidence: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class probabilities (C,) from the finding classes' evidence (C - 1,) and their logit offsets; they sum to 1."""
    evidence = torch.as_tensor(evidence).float().clamp(1e-6, 1.0 - 1e-6)
    if bias is not None:
        evidence = torch.sigmoid(torch.logit(evidence) + torch.as_tensor(bias).float().to(evidence.device))
    normal = (1.0 - evidence.max()).clamp(min=0.0).reshape(1)
    p = torch.cat([normal, evidence]).clamp(min=1e-6)
    return p / p.sum()


def image_probabilities(logits: torch.Tensor, bias: Optional[torch.Tensor] = None, top_k: int = TOP_K) -> torch.Tensor:
    """Class probabilities (C,) of one image from its voxel logits (C, *spatial); they sum to 1."""
    return evidence_probabilities(image_evidence(logits, top_k), bias)


class ImageProbabilitiesd(MapTransform):
    """Replace voxel logits (C, *spatial) under ``keys`` by the image's class probabilities (C,), calibrated by
    ``bias()`` (the network's ``evidence_bias``) when given, else by the item's ``evidence_bias`` if it has one; the
    uncalibrated evidence goes to ``evidence``."""

    def __init__(self, keys, bias: Optional[Callable[[], torch.Tensor]] = None):
        super().__init__(keys)
        self.bias = bias

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        bias = d.get(EVIDENCE_BIAS) if self.bias is None else self.bias().detach().cpu()
        for key in self.key_iterator(d):
            evidence = image_evidence(torch.as_tensor(d[key]))
            d[EVIDENCE] = evidence
            d[key] = evidence_probabilities(evidence, bias)
        return d


def fit_evidence_bias(evidence: np.ndarray, positive: np.ndarray, bound: float = 15.0) -> float:
    """The logit offset ``b`` under which ``sigmoid(logit(evidence) + b)`` best predicts ``positive``: maximum
    likelihood with both groups weighted equally. The likelihood is concave in ``b``, so its derivative is found
    by bisection within ``[-bound, bound]``."""
    z = np.log(np.clip(evidence, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(evidence, 1e-6, 1 - 1e-6))
    y = np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("fitting an evidence bias needs images with and without the finding")
    weight = np.where(y, 0.5 / y.sum(), 0.5 / (~y).sum())

    def slope(b: float) -> float:  # derivative of the negative log-likelihood: increasing in b
        return float(np.sum(weight * (1.0 / (1.0 + np.exp(-(z + b))) - y)))

    lo, hi = -bound, bound
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if slope(mid) > 0 else (mid, hi)
    return 0.5 * (lo + hi)


class EvidenceCalibration:
    """Fits ``evidence_bias`` on each validation and puts it in the network, before the checkpoint is saved.

    Attach it to the evaluator before MONAI Label's ``CheckpointSaver`` (a validation handler, attached after the
    key metric): it gathers every image's evidence and class, fits one offset per finding class (its images
    against the first class's), stores it in the network with the training ``patch``, and has ``rescore``
    recompute the epoch's metrics with the calibrated probabilities, so the saved model and the reported accuracy
    agree.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        rescore: Optional[Callable[[Engine, np.ndarray], None]] = None,
        patch: int = DEFAULT_PATCH,
    ):
        self.network = unwrapped(network)
        self.rescore = rescore
        self.patch = int(patch)
        self._evidence: List[np.ndarray] = []
        self._labels: List[int] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._gather)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._fit)

    def _reset(self, engine: Engine) -> None:
        self._evidence, self._labels = [], []

    def _gather(self, engine: Engine) -> None:
        for item in engine.state.output:
            self._evidence.append(torch.as_tensor(item[EVIDENCE]).detach().float().cpu().numpy().reshape(-1))
            self._labels.append(int(torch.as_tensor(item["label"]).reshape(-1)[0].item()))

    def _fit(self, engine: Engine) -> None:
        if not self._evidence:
            return
        evidence, labels = np.stack(self._evidence), np.asarray(self._labels)
        bias = self.network.evidence_bias.detach().cpu().numpy().astype(np.float64)
        for k in range(bias.size):
            rows = (labels == 0) | (labels == k + 1)
            if len(set(labels[rows])) == 2:
                bias[k] = fit_evidence_bias(evidence[rows, k], labels[rows] == k + 1)
        self.network.evidence_bias.copy_(torch.as_tensor(bias, dtype=self.network.evidence_bias.dtype))
        self.network.patch_size.fill_(self.patch)
        if self.rescore is not None:
            probs = [evidence_probabilities(torch.as_tensor(e), torch.as_tensor(bias)).numpy() for e in evidence]
            self.rescore(engine, np.stack(probs))


class HardNegatives:
    """Where the detector is most wrong on images without findings: per image id, the flat indices of its most
    probable finding voxels on the preprocessed grid, refreshed during training by :meth:`refresh`.

    Such an image teaches only through patches of it, and patches centred at random tissue rarely hold what fools
    the network (in the sample data, the junctions of enhanced liver vessels, bright blobs like a hyperdense
    lesion). :class:`HardNegativeIndicesd` centres part of their patches here instead.
    """

    def __init__(self, voxels: int = 16):
        self.voxels = int(voxels)
        self.indices: Dict[str, np.ndarray] = {}

    def refresh(self, network: torch.nn.Module, images: Mapping[str, torch.Tensor], inferer: Callable) -> None:
        """Run ``network`` (through ``inferer``) over ``images`` (id -> preprocessed (1, *spatial) volume) and keep
        each one's ``voxels`` most probable finding voxels."""
        network = unwrapped(network)
        device = next(network.parameters()).device
        was_training = network.training
        network.eval()
        with torch.inference_mode():
            for image_id, image in images.items():
                logits = inferer(torch.as_tensor(image)[None].to(device), network)[0].float()
                finding = torch.softmax(logits, dim=0)[1:].amax(dim=0).flatten()
                top = finding.topk(min(self.voxels, finding.numel())).indices
                self.indices[image_id] = top.cpu().numpy()
        network.train(was_training)


class HardNegativeIndicesd(Randomizable, MapTransform):
    """With probability ``prob``, an image without findings (``class_index`` 0) that ``hard`` knows gets its hard
    negative voxels as ``<key>_bg_indices``, so that ``RandCropByPosNegLabeld`` centres its patch at one of them."""

    def __init__(self, hard: HardNegatives, prob: float = 0.5, key: str = "label", id_key: str = "image_id"):
        super().__init__([key])
        self.hard, self.prob, self.key, self.id_key = hard, float(prob), key, id_key

    def randomize(self, data: Any = None) -> None:
        self._draw = self.R.rand()

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        indices = self.hard.indices.get(str(d.get(self.id_key)))
        self.randomize()
        if indices is not None and int(d.get(CLASS_INDEX, 0)) == 0 and self._draw < self.prob:
            d[f"{self.key}_bg_indices"] = indices
        return d


class PatchClassd(MapTransform):
    """Replace a label map (1, *spatial) by its class index: the largest class value in it (0: none)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key]).max().long().reshape(1)
        return d


class FindingsToMaskd(MapTransform):
    """Paint an image's findings as balls of its class index on the image's current (preprocessed) grid.

    Reads ``findings`` (centres in LPS mm, radii in mm) and ``class_index``; writes ``label`` (1, *spatial) uint8
    on the grid of ``image`` (a MetaTensor whose affine maps voxels to RAS mm). A ball is at least one voxel, so
    a finding smaller than a voxel still marks its voxel.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key])
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        shape = tuple(image.shape[1:])
        affine = np.asarray(torch.as_tensor(image.affine).double().cpu())
        mask = np.zeros(shape, dtype=np.uint8)
        value = int(d.get(CLASS_INDEX, 0))
        if value > 0:
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            inverse = np.linalg.inv(affine)
            axes = [np.arange(n, dtype=np.float64) for n in shape]
            for finding in d.get(FINDINGS) or []:
                x, y, z = (float(v) for v in finding["centre_lps"])
                centre = (inverse @ np.array([-x, -y, z, 1.0]))[:3]  # LPS -> RAS -> voxel index
                radius = np.maximum(float(finding["radius_mm"]) / spacing, 0.5)
                lo = np.maximum(np.floor(centre - radius), 0).astype(int)
                hi = np.minimum(np.ceil(centre + radius) + 1, shape).astype(int)
                if np.any(hi <= lo):
                    continue  # outside the cropped field of view
                terms = [((a[b:e] - c) / r) ** 2 for a, b, e, c, r in zip(axes, lo, hi, centre, radius)]
                inside = sum(np.meshgrid(*terms, indexing="ij")) <= 1.0
                if not inside.any():  # a ball between voxel centres: mark the nearest voxel
                    nearest = tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, shape))
                    mask[nearest] = value
                    continue
                region = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
                region[inside] = value
        d[self.label_key] = torch.from_numpy(mask[None])
        return d


def findings_datalist_item(item: Dict[str, Any], findings: Sequence[Mapping[str, Any]] | None) -> Dict[str, Any]:
    """A trainer datalist item with what :class:`FindingsToMaskd` reads."""
    return {**item, CLASS_INDEX: int(item["label"]), FINDINGS: [dict(f) for f in findings or []]}


class FindingLoss(torch.nn.Module):
    """Dice over the finding classes (batch-wise, so a patch without findings adds no noise) plus cross-entropy
    with the finding classes weighted up (``finding_weight``), as findings fill a few voxels of a patch."""

    def __init__(self, num_classes: int, finding_weight: float = 20.0):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        self.register_buffer("weight", torch.tensor([1.0] + [float(finding_weight)] * (num_classes - 1)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), weight=self.weight.to(logits.device))
        return self.dice(logits, target) + ce
