"""Parsing of ``--conf`` values given to ``monailabel start_server``.

MONAI Label passes every ``--conf key value`` pair as strings; these helpers turn them into typed
settings with clear errors, so a typo stops the server at start-up instead of at the first request.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Sequence, Tuple

from labelloop_app.labels import DEFAULT_CLASSES, DEFAULT_SEG_LABELS

TASKS = ("segmentation", "classification")
NETWORKS = ("unet", "dynunet", "segresnet", "attentionunet")
CLS_NETWORKS = ("densenet121", "resnet10", "resnet18", "detector")
MODALITIES = ("CT", "MR")


class ConfError(ValueError):
    """A ``--conf`` value that cannot be used."""


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
RESTORE_MODES = ("linear", "nearest")
"""How a label map is put back on the input grid: resampling the class probabilities, or the labels."""


def parse_bool(value: Any, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in TRUE_WORDS


def parse_floats(value: Any, n: int, name: str, positive: bool = True) -> Tuple[float, ...]:
    """``"2"`` -> (2, 2, 2); ``"2,2,3"`` or ``"[2, 2, 3]"`` -> (2, 2, 3)."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip().strip("[]()")
        items = [v for v in text.replace(" ", ",").split(",") if v]
    try:
        numbers = tuple(float(v) for v in items)
    except ValueError as e:
        raise ConfError(f"--conf {name} needs numbers, got {value!r}") from e
    if len(numbers) == 1:
        numbers = numbers * n
    if len(numbers) != n or (positive and any(v <= 0 for v in numbers)):
        raise ConfError(f"--conf {name} needs {n} {'positive ' if positive else ''}numbers, got {value!r}")
    return numbers


def parse_labels(value: Any, default: Mapping[str, int] = DEFAULT_SEG_LABELS) -> Dict[str, int]:
    """Labels as ``name -> value``.

    Accepts a comma list (``liver,spleen``: values 1, 2, ... in order), a JSON object string, or the path of a
    JSON file holding ``{"liver": 1, ...}`` (as TotalSegmentator publishes them). Value 0 is background.
    """
    if value is None or str(value).strip() == "":
        return dict(default)
    text = str(value).strip()
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfError(f"--conf labels is not valid JSON: {e}") from e
        if all(isinstance(k, str) and k.isdigit() for k in raw):  # value -> name form
            raw = {v: int(k) for k, v in raw.items()}
        labels = {str(k).strip(): int(v) for k, v in raw.items() if str(k).strip() != "background"}
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
        labels = {n: i for i, n in enumerate(names, start=1)}
    if not labels:
        raise ConfError("--conf labels names no structure")
    values = list(labels.values())
    if len(set(values)) != len(values) or any(v <= 0 or v > 255 for v in values):
        raise ConfError(f"--conf labels needs distinct values in 1..255, got {labels}")
    return labels


def parse_names(value: Any, default: Sequence[str]) -> list[str]:
    """A comma list, JSON list, or JSON file of names."""
    if value is None or str(value).strip() == "":
        return list(default)
    text = str(value).strip()
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read().strip()
    if text.startswith("["):
        names = [str(n).strip() for n in json.loads(text)]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfError(f"need at least two distinct names, got {value!r}")
    return names


def parse_tasks(value: Any) -> list[str]:
    """``--conf tasks segmentation,classification``: which tasks this server offers (default: segmentation)."""
    names = [n.strip().lower() for n in str(value or "segmentation").split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ConfError(f"--conf tasks {value!r}: unknown {unknown}; available: {', '.join(TASKS)}")
    return names


@dataclass
class SegmentationConf:
    """Settings of the ``segmentation`` task, from ``--conf``."""

    labels: Dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SEG_LABELS))
    network: str = "unet"
    modality: str = "CT"
    target_spacing: Tuple[float, ...] = (3.0, 3.0, 4.0)
    roi_size: Tuple[int, ...] = (64, 64, 48)
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    ct_window: Tuple[float, ...] = (-175.0, 250.0)
    restore: str = "linear"
    max_epochs: int = 50
    num_samples: int = 4

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> SegmentationConf:
        network = str(conf.get("network", cls.network)).strip().lower().replace("_", "").replace("-", "")
        if network not in NETWORKS:
            raise ConfError(f"--conf network {conf.get('network')!r} is not one of {', '.join(NETWORKS)}")
        modality = str(conf.get("modality", cls.modality)).strip().upper()
        if modality in ("MRI",):
            modality = "MR"
        if modality not in MODALITIES:
            raise ConfError(f"--conf modality {conf.get('modality')!r} is not one of CT, MR")
        restore = str(conf.get("restore", cls.restore)).strip().lower()
        if restore not in RESTORE_MODES:
            raise ConfError(f"--conf restore {restore!r} is not one of {', '.join(RESTORE_MODES)}")
        return cls(
            labels=parse_labels(conf.get("labels")),
            network=network,
            modality=modality,
            target_spacing=parse_floats(conf.get("target_spacing", cls.target_spacing), 3, "target_spacing"),
            roi_size=tuple(int(v) for v in parse_floats(conf.get("roi_size", cls.roi_size), 3, "roi_size")),
            sw_batch_size=int(conf.get("sw_batch_size", cls.sw_batch_size)),
            sw_overlap=float(conf.get("sw_overlap", cls.sw_overlap)),
            ct_window=parse_floats(conf.get("ct_window", cls.ct_window), 2, "ct_window", positive=False),
            restore=restore,
            max_epochs=int(conf.get("max_epochs", cls.max_epochs)),
            num_samples=int(conf.get("num_samples", cls.num_samples)),
        )

    @property
    def channel_of(self) -> Dict[str, int]:
        """Network output channel of each label (0 is background), in the order the labels were given."""
        return {name: i for i, name in enumerate(self.labels, start=1)}

    @property
    def out_channels(self) -> int:
        return len(self.labels) + 1


def parse_modality(value: Any, default: str = "CT") -> str:
    """``CT`` or ``MR`` (``MRI`` accepted)."""
    modality = str(value if value not in (None, "") else default).strip().upper()
    modality = "MR" if modality == "MRI" else modality
    if modality not in MODALITIES:
        raise ConfError(f"--conf modality {value!r} is not one of CT, MR")
    return modality


@dataclass
class ClassificationConf:
    """Settings of the ``classification`` task (one class per image), from ``--conf``.

    The input is oriented RAS, resampled to ``target_spacing``, cropped to the body and centre-cropped or padded to
    ``spatial_size``: the whole field of view in one fixed-size volume. 96 x 96 x 64 voxels of 3.5 mm cover a
    336 x 336 x 224 mm torso, small enough for a 3D DenseNet121 to train on a laptop CPU in minutes.
    """

    classes: Tuple[str, ...] = tuple(DEFAULT_CLASSES)
    network: str = "densenet121"
    modality: str = "CT"
    target_spacing: Tuple[float, ...] = (3.5, 3.5, 3.5)
    spatial_size: Tuple[int, ...] = (96, 96, 64)
    ct_window: Tuple[float, ...] = (-175.0, 250.0)
    body_threshold: float = -500.0  # HU above which a voxel belongs to the body (MR default: 0)
    features: Tuple[int, ...] = (32, 16)
    max_epochs: int = 30
    batch_size: int = 4

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> ClassificationConf:
        """Keys: ``classes``, ``cls_network``, ``modality``, ``cls_spacing``, ``cls_size``, ``cls_ct_window`` (else
        ``ct_window``), ``cls_body_threshold``, ``cls_features``, ``cls_max_epochs``, ``cls_batch_size``."""
        network = str(conf.get("cls_network", cls.network)).strip().lower().replace("_", "").replace("-", "")
        network = {"densenet": "densenet121", "resnet": "resnet10"}.get(network, network)
        if network not in CLS_NETWORKS:
            raise ConfError(
                f"--conf cls_network {conf.get('cls_network')!r} is not one of densenet121, resnet (resnet10), "
                "resnet18, detector"
            )
        try:
            classes = tuple(parse_names(conf.get("classes"), DEFAULT_CLASSES))
        except (ConfError, ValueError) as e:
            raise ConfError(f"--conf classes: {e}") from e
        window = conf.get("cls_ct_window", conf.get("ct_window", cls.ct_window))
        modality = parse_modality(conf.get("modality"), cls.modality)
        body_default = cls.body_threshold if modality == "CT" else 0.0  # MR: any non-zero voxel
        features = tuple(int(v) for v in parse_floats(conf.get("cls_features", cls.features), 2, "cls_features"))
        return cls(
            classes=classes,
            network=network,
            modality=modality,
            target_spacing=parse_floats(conf.get("cls_spacing", cls.target_spacing), 3, "cls_spacing"),
            spatial_size=tuple(int(v) for v in parse_floats(conf.get("cls_size", cls.spatial_size), 3, "cls_size")),
            ct_window=parse_floats(window, 2, "cls_ct_window", positive=False),
            body_threshold=float(conf.get("cls_body_threshold", body_default)),
            features=features,
            max_epochs=int(conf.get("cls_max_epochs", cls.max_epochs)),
            batch_size=int(conf.get("cls_batch_size", cls.batch_size)),
        )

    @property
    def index_of(self) -> Dict[str, int]:
        """Network output index of each class, in the order the classes were given."""
        return {name: i for i, name in enumerate(self.classes)}
