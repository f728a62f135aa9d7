"""Uncertainty measures shared by every task's active-learning scores.

All but :func:`fragmentation` (a label map's) take class probabilities with the class axis first: ``(C,)`` for one
image-level prediction or ``(C, ...)`` for voxels. Higher always means "more useful to annotate next".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms.utils import get_largest_connected_component_mask

_EPS = 1e-12


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy normalised to [0, 1] by ``log(C)``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    return -(p * np.log(p)).sum(axis=0) / np.log(p.shape[0])


def margin(probs: np.ndarray) -> np.ndarray:
    """One minus the gap between the two most probable classes (1: a tie, 0: certain)."""
    top2 = np.sort(np.asarray(probs, dtype=np.float64), axis=0)[-2:]
    return 1.0 - (top2[1] - top2[0])


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """One minus the top probability, rescaled to [0, 1] by the uniform distribution's value."""
    p = np.asarray(probs, dtype=np.float64)
    c = p.shape[0]
    return (1.0 - p.max(axis=0)) * c / (c - 1)


MEASURES = {"entropy": entropy, "margin": margin, "least_confidence": least_confidence}


def mutual_information(samples: np.ndarray) -> np.ndarray:
    """BALD: entropy of the mean prediction minus the mean entropy of the samples, normalised by ``log(C)``.

    ``samples`` has the sample axis first and the class axis second: ``(T, C, ...)`` (MC-dropout passes or
    test-time augmentations). High where the samples disagree (model uncertainty), low where every sample is
    equally unsure (noise in the data), which the plain entropy of the mean cannot tell apart.
    """
    s = np.asarray(samples, dtype=np.float64)
    return np.clip(entropy(s.mean(axis=0)) - np.mean([entropy(p) for p in s], axis=0), 0.0, 1.0)


def disagreement(labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Fraction of the label maps in ``labels`` (``(T, ...)``, e.g. argmax per augmentation) that differ from
    ``reference`` (``(...)``) at each position: 0 where all agree, 1 where none agrees with the reference."""
    return (np.asarray(labels) != np.asarray(reference)[None]).mean(axis=0)


def _foreground_dice(predicted: torch.Tensor, reference: torch.Tensor, labels: Sequence[int]) -> float:
    """Mean over ``labels`` of MONAI's Dice of the one-hot ``predicted`` against the one-hot or soft ``reference``
    (both ``(B, C, ...)``), 1 where both are empty."""
    dice = compute_dice(predicted, reference, include_background=False, ignore_empty=False)
    return float(dice[:, [c - 1 for c in labels]].mean())


def expected_dice_loss(probs: np.ndarray, labels: Sequence[int]) -> float:
    """One minus the Dice the model expects of its own prediction, averaged over ``labels``.

    ``probs`` is ``(C, ...)``. Per structure, the soft Dice of the predicted mask (argmax) against the model's
    probability of that structure: if the probabilities are calibrated this is the prediction's expected Dice, the
    metric the annotation study measures. Being per structure, a small organ's uncertain rim weighs as much as a
    large organ's, where a voxel average lets the large organs dominate.
    """
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    predicted = one_hot(p.argmax(0)[None, None], num_classes=p.shape[0], dtype=torch.float64)
    return 1.0 - _foreground_dice(predicted, p[None], labels)


def sample_dice_loss(samples: np.ndarray, labels: Sequence[int]) -> float:
    """One minus the mean Dice between each sample's mask and the mean prediction's, averaged over ``labels``.

    ``samples`` is ``(T, C, ...)`` (MC-dropout passes): how much the structures' outlines move between passes,
    in the metric's own units (structure-wise Dice agreement of MC samples).
    """
    s = torch.as_tensor(np.asarray(samples, dtype=np.float64))
    classes = s.shape[1]
    per_sample = one_hot(s.argmax(1, keepdim=True), num_classes=classes, dtype=torch.float64)
    reference = one_hot(s.mean(0).argmax(0)[None, None], num_classes=classes, dtype=torch.float64).expand_as(per_sample)
    return 1.0 - _foreground_dice(per_sample, reference, labels)


def fragmentation(prediction: np.ndarray, labels: Sequence[int]) -> float:
    """The share of each structure's predicted volume outside its largest connected piece, averaged over the
    ``labels`` present in the label map ``prediction`` (0 when every structure is one piece or none is predicted).

    Every structure is one organ, so a prediction in pieces is wrong somewhere, however confident: a model that meets
    anatomy it has never seen (organs on the other side) scatters them with low entropy.
    """
    shares = []
    for value in labels:
        mask = torch.as_tensor(np.asarray(prediction) == value)
        total = int(mask.sum())
        if total:
            largest = int(get_largest_connected_component_mask(mask).sum())
            shares.append(1.0 - largest / total)
    return float(np.mean(shares)) if shares else 0.0
