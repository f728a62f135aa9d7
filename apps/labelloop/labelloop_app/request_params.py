"""Checks of a request's parameters (training, inference, scoring) before any work starts.

MONAI Label hands a task whatever parameters it is given: ``{"max_epochs": "abc"}`` answers 200 and the run fails
in the background, ``{"sw_overlap": "x"}`` makes an inference answer 500, and ``{"pretrained": "false"}``
fine-tunes (the text counts as true). These checks turn a value a parameter cannot take into a 422 that names the
parameter and what it takes, and hand the task the values typed. Parameters they do not know pass through (MONAI
Label and its tasks read others); for training, a near miss of a known name is refused, as most likely a typo.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from labelloop_app.conf import FALSE_WORDS, RESTORE_MODES, TRUE_WORDS, ConfError, parse_floats
from labelloop_app.errors import UnprocessableInput


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
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def _size3(value: Any) -> Optional[List[int]]:
    """``48``, ``[48, 48, 32]`` or ``"48,48,32"`` as three whole numbers (read as ``--conf roi_size`` is)."""
    try:
        sizes = [_integer(v) for v in parse_floats(value, 3, "roi_size", positive=False)]
    except ConfError:
        return None
    return None if None in sizes else sizes


def _name(value: Any) -> Optional[str]:
    """A short name on one line (an annotator's client id; empty: none given)."""
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 200 or not value.isprintable():
        return None
    return value.strip()


def _one_of(*choices: str) -> Callable[[Any], Optional[str]]:
    return lambda value: value if isinstance(value, str) and value in choices else None


Rule = Tuple[Callable[[Any], Any], Callable[[Any], bool], str]
"""How to read a value (``None``: unreadable), whether the read value is allowed, and what the parameter takes."""

ANY: Callable[[Any], bool] = lambda v: True  # noqa: E731
AT_LEAST_1: Callable[[Any], bool] = lambda v: v >= 1  # noqa: E731
DATASETS = ("CacheDataset", "SmartCacheDataset", "PersistentDataset", "Dataset")
DATALOADERS = ("ThreadDataLoader", "DataLoader")

TRAIN_RULES: Dict[str, Rule] = {
    "max_epochs": (_integer, AT_LEAST_1, "a whole number of epochs, at least 1"),
    "max_minutes": (_number, lambda v: v >= 0, "a number of minutes, 0 (no budget) or more"),
    "learning_rate": (_number, lambda v: v >= 0, "a number, 0 or more"),
    "val_split": (_number, lambda v: 0 <= v < 1, "a share of the labeled images, from 0 up to (not including) 1"),
    "train_batch_size": (_integer, AT_LEAST_1, "a whole number, at least 1"),
    "val_batch_size": (_integer, AT_LEAST_1, "a whole number, at least 1"),
    "num_samples": (_integer, AT_LEAST_1, "a whole number of patches per image, at least 1"),
    "early_stop_patience": (_integer, ANY, "a whole number of epochs (-1: no early stop)"),
    "pretrained": (_boolean, ANY, "true or false"),
    "balance": (_boolean, ANY, "true or false"),
    # MONAI Label quietly takes any other name as the plain Dataset or DataLoader
    "dataset": (_one_of(*DATASETS), ANY, "one of " + ", ".join(DATASETS)),
    "dataloader": (_one_of(*DATALOADERS), ANY, "one of " + ", ".join(DATALOADERS)),
    "patch": (_integer, lambda v: v >= 8, "a whole number of voxels, at least 8"),
    "finding_weight": (_number, lambda v: v > 0, "a number above 0"),
    "hard_negatives": (_number, lambda v: 0 <= v <= 1, "a share of the patches, from 0 to 1"),
    "hard_negative_every": (_integer, AT_LEAST_1, "a whole number of iterations, at least 1"),
    "hard_negative_images": (_integer, AT_LEAST_1, "a whole number of images, at least 1"),
}

INFER_RULES: Dict[str, Rule] = {
    "sw_overlap": (_number, lambda v: 0 <= v < 1, "a share of the window, from 0 up to (not including) 1"),
    "sw_batch_size": (_integer, AT_LEAST_1, "a whole number of windows, at least 1"),
    "roi_size": (_size3, lambda v: min(v) >= 1, "a window size: one or three whole numbers of voxels, at least 1"),
    "restore": (_one_of(*RESTORE_MODES), ANY, " or ".join(RESTORE_MODES)),
}

STRATEGY_RULES: Dict[str, Rule] = {
    "client_id": (_name, ANY, "a name of up to 200 printable characters"),
}

SCORING_RULES: Dict[str, Rule] = {
    "max_images": (_integer, AT_LEAST_1, "a whole number of images, at least 1"),
    "force": (_boolean, ANY, "true or false"),
}


def read_params(
    params: Mapping[str, Any], rules: Mapping[str, Rule], near_misses_of: Iterable[str] = ()
) -> Tuple[Dict[str, Any], List[str]]:
    """``params`` with the values of the parameters in ``rules`` as the task uses them (``"2"`` -> 2,
    ``"false"`` -> False), and what is wrong: a value a parameter cannot take, or a name that is not in
    ``near_misses_of`` (nor in ``rules``) but nearly the name of one of them."""
    typed: Dict[str, Any] = dict(params)
    found = []
    known = set(near_misses_of)
    names = sorted(known | set(rules)) if known else []
    for name, value in params.items():
        if name in rules:
            read, allowed, takes = rules[name]
            parsed = read(value)
            if parsed is None or not allowed(parsed):
                found.append(f"{name} takes {takes}, not {value!r}")
            else:
                typed[name] = parsed
        elif names and name not in known:
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
            if near:
                found.append(f"unknown parameter {name!r}: did you mean {near[0]!r}?")
    return typed, found


def checked(
    what: str, params: Optional[Mapping[str, Any]], rules: Mapping[str, Rule], near_misses_of: Iterable[str] = ()
) -> Optional[Dict[str, Any]]:
    """``params`` read by :func:`read_params`, or a 422 ``cannot <what>: <every problem>``."""
    if params is None:
        return None
    typed, found = read_params(params, rules, near_misses_of)
    if found:
        raise UnprocessableInput(f"cannot {what}: " + "; ".join(found))
    return typed
