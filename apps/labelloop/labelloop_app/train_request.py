"""Checks of a training request's parameters before the run starts.

MONAI Label starts a training run with whatever parameters it is given: ``{"max_epochs": "abc"}`` answers 200 and
the run fails in the background, and ``{"pretrained": "false"}`` fine-tunes (the text counts as true). These
checks turn a value a parameter cannot take into a 422 that names the parameter and what it takes, and give
MONAI Label the values typed. Parameters they do not know pass through (MONAI Label and its tasks read others),
except a near miss of a known one, which is most likely a typo.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from labelloop_app.errors import UnprocessableInput

BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> Optional[int]:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def _boolean(value: Any) -> Optional[bool]:
    return value if isinstance(value, bool) else BOOL_WORDS.get(str(value).strip().lower())


Rule = Tuple[Callable[[Any], Any], Callable[[Any], bool], str]
"""How to read a value, whether the read value is allowed, and what the parameter takes (for the message)."""

RULES: Dict[str, Rule] = {
    "max_epochs": (_integer, lambda v: v >= 1, "a whole number of epochs, at least 1"),
    "max_minutes": (_number, lambda v: v >= 0, "a number of minutes, 0 (no budget) or more"),
    "learning_rate": (_number, lambda v: v >= 0, "a number, 0 or more"),
    "val_split": (_number, lambda v: 0 <= v < 1, "a share of the labeled images, from 0 up to (not including) 1"),
    "train_batch_size": (_integer, lambda v: v >= 1, "a whole number, at least 1"),
    "val_batch_size": (_integer, lambda v: v >= 1, "a whole number, at least 1"),
    "num_samples": (_integer, lambda v: v >= 1, "a whole number of patches per image, at least 1"),
    "early_stop_patience": (_integer, lambda v: True, "a whole number of epochs (-1: no early stop)"),
    "pretrained": (_boolean, lambda v: True, "true or false"),
    "balance": (_boolean, lambda v: True, "true or false"),
    "patch": (_integer, lambda v: v >= 8, "a whole number of voxels, at least 8"),
    "finding_weight": (_number, lambda v: v > 0, "a number above 0"),
    "hard_negatives": (_number, lambda v: 0 <= v <= 1, "a share of the patches, from 0 to 1"),
    "hard_negative_every": (_integer, lambda v: v >= 1, "a whole number of iterations, at least 1"),
    "hard_negative_images": (_integer, lambda v: v >= 1, "a whole number of images, at least 1"),
}

CHOICES: Dict[str, Tuple[str, ...]] = {
    "dataset": ("CacheDataset", "SmartCacheDataset", "PersistentDataset", "Dataset"),
    "dataloader": ("ThreadDataLoader", "DataLoader"),
}
"""MONAI Label's dataset and data loader types; it quietly takes any other name as the plain one."""


def read_request(params: Mapping[str, Any], config: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """A training request's ``params`` for a trainer whose defaults are ``config``, with the values of known
    parameters as the trainer uses them (``"2"`` -> 2, ``"false"`` -> False: MONAI Label would take the text as it
    is, and the text ``"false"`` counts as true), and what is wrong with it: a value a known parameter cannot take,
    a choice not offered (:data:`CHOICES`), or a parameter that is not the trainer's but nearly the name of one."""
    typed: Dict[str, Any] = dict(params)
    found = []
    known = sorted(set(config) | set(RULES))
    for name, value in params.items():
        if name in RULES:
            read, allowed, takes = RULES[name]
            parsed = read(value)
            if parsed is None or not allowed(parsed):
                found.append(f"{name} takes {takes}, not {value!r}")
            else:
                typed[name] = parsed
        elif name in CHOICES:
            if value not in CHOICES[name]:
                found.append(f"{name} takes one of {', '.join(CHOICES[name])}, not {value!r}")
        elif name not in config:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if near:
                found.append(f"unknown parameter {name!r}: did you mean {near[0]!r}?")
    return typed, found


def check_train_request(
    model: str, params: Optional[Mapping[str, Any]], config: Mapping[str, Any]
) -> Optional[Dict[str, Any]]:
    """``params`` read by :func:`read_request`, or a 422 naming every problem before a training of ``model``
    starts."""
    if not params:
        return None if params is None else {}
    typed, found = read_request(params, config)
    if found:
        raise UnprocessableInput(f"cannot train {model!r}: " + "; ".join(found))
    return typed
