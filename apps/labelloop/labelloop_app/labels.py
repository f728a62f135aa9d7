"""Structure names and label values.

Label values always mean the same named structure. Names follow TotalSegmentator, so reference label maps
that use another value table (TotalSegmentator's own, a site's) can be remapped by name.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

DEFAULT_SEG_LABELS: Dict[str, int] = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
DEFAULT_CLASSES = ("normal", "lesion")


def remap_by_name(label: np.ndarray, source: Mapping[str, int], target: Mapping[str, int]) -> np.ndarray:
    """Re-express ``label`` (values from ``source``) in ``target``'s values; structures ``target`` lacks become 0."""
    lut = np.zeros(max(max(source.values(), default=0), int(label.max(initial=0))) + 1, dtype=np.uint8)
    for name, value in source.items():
        if name in target:
            lut[value] = target[name]
    return lut[label.astype(np.int64)]
