"""Stable display colors for structure names.

A structure keeps the same color in every session, on every computer, so that annotators learn them. Known
anatomical names (TotalSegmentator naming: ``liver``, ``kidney_left``, ``vertebrae_L1``, ...) get an anatomical
color close to 3D Slicer's generic anatomy palette; paired structures get slightly different shades for the left
and right side so that both are visible when they touch. Any other name gets a color derived from a hash of the
name (never Python's salted ``hash()``), so it is stable too.
"""

from __future__ import annotations

import colorsys
import hashlib
import re
from typing import Dict, Iterable, Optional, Tuple

RGB = Tuple[float, float, float]

# 0-255 anatomical colors, keyed by base structure name (side and index removed).
_ANATOMY_255: Dict[str, Tuple[int, int, int]] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (185, 102, 83),
    "kidney_cyst": (205, 205, 100),
    "pancreas": (249, 180, 111),
    "gallbladder": (139, 150, 98),
    "stomach": (216, 132, 105),
    "duodenum": (255, 253, 229),
    "small_bowel": (205, 167, 142),
    "colon": (204, 168, 143),
    "esophagus": (211, 171, 143),
    "adrenal_gland": (244, 214, 49),
    "urinary_bladder": (222, 154, 132),
    "prostate": (230, 158, 140),
    "aorta": (224, 97, 76),
    "inferior_vena_cava": (0, 151, 206),
    "portal_vein_and_splenic_vein": (0, 151, 206),
    "pulmonary_vein": (0, 122, 171),
    "pulmonary_artery": (0, 122, 171),
    "brachiocephalic_trunk": (196, 121, 79),
    "subclavian_artery": (176, 121, 79),
    "common_carotid_artery": (186, 111, 79),
    "brachiocephalic_vein": (0, 161, 196),
    "superior_vena_cava": (0, 141, 226),
    "iliac_artery": (216, 101, 79),
    "iliac_vena": (0, 151, 216),
    "heart": (206, 110, 84),
    "atrial_appendage": (210, 115, 89),
    "lung": (197, 165, 145),
    "lung_upper_lobe": (172, 138, 115),
    "lung_middle_lobe": (202, 164, 140),
    "lung_lower_lobe": (224, 186, 162),
    "trachea": (182, 228, 255),
    "thyroid_gland": (220, 160, 160),
    "brain": (250, 250, 225),
    "spinal_cord": (244, 214, 49),
    "skull": (241, 213, 144),
    "sacrum": (241, 213, 144),
    "vertebrae": (241, 213, 144),
    "rib": (241, 214, 145),
    "sternum": (241, 214, 145),
    "costal_cartilages": (111, 184, 210),
    "clavicula": (241, 214, 145),
    "scapula": (241, 214, 145),
    "humerus": (241, 214, 145),
    "femur": (241, 214, 145),
    "hip": (241, 214, 145),
    "gluteus_maximus": (192, 104, 88),
    "gluteus_medius": (182, 94, 78),
    "gluteus_minimus": (172, 84, 68),
    "autochthon": (192, 104, 88),
    "iliopsoas": (192, 104, 88),
    "muscle": (192, 104, 88),
    "fat": (230, 220, 70),
    "skin": (177, 122, 101),
    "lesion": (144, 238, 144),
    "tumor": (144, 238, 144),
    "liver_vessels": (0, 151, 206),
    "liver_tumor": (144, 238, 144),
}

_SIDE = re.compile(r"(^|_)(left|right)(?=_|$)", re.IGNORECASE)
_INDEX = re.compile(r"_(\d+|[cltsCLTS]\d+)$")


def normalize_name(name: str) -> str:
    """Lower case, spaces and hyphens as underscores, no surrounding blanks: ``"Kidney left"`` -> ``kidney_left``."""
    return re.sub(r"[\s\-]+", "_", name.strip()).lower()


def _side_and_base(name: str) -> Tuple[str, str]:
    key = normalize_name(name)
    side_match = _SIDE.search(key)
    side = side_match.group(2).lower() if side_match else ""
    base = _SIDE.sub("", key).strip("_")
    base = re.sub(r"__+", "_", base)
    return side, base


def _shade(rgb: RGB, factor: float) -> RGB:
    h, light, s = colorsys.rgb_to_hls(*rgb)
    return colorsys.hls_to_rgb(h, max(0.0, min(1.0, light * factor)), s)


def hash_color(name: str) -> RGB:
    """A saturated, bright color derived from an MD5 hash of ``name``: the same name always gets the same color."""
    digest = hashlib.md5(normalize_name(name).encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65535.0
    saturation = 0.55 + 0.3 * digest[2] / 255.0
    value = 0.75 + 0.2 * digest[3] / 255.0
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(hue, saturation, value))  # type: ignore[return-value]


def anatomical_color(name: str) -> Optional[RGB]:
    """The palette color of a known structure name (with side shading), or ``None`` if the name is unknown."""
    side, base = _side_and_base(name)
    rgb255 = _ANATOMY_255.get(base)
    if rgb255 is None:
        stripped = _INDEX.sub("", base)
        rgb255 = _ANATOMY_255.get(stripped)
    if rgb255 is None:
        return None
    rgb = tuple(c / 255.0 for c in rgb255)
    if side == "left":
        rgb = _shade(rgb, 0.88)
    elif side == "right":
        rgb = _shade(rgb, 1.06)
    return tuple(round(c, 4) for c in rgb)  # type: ignore[return-value]


def color_for(name: str) -> RGB:
    """Display color (r, g, b in 0-1) of a structure: anatomical when the name is known, hash-based otherwise."""
    return anatomical_color(name) or hash_color(name)


def colors_for(names: Iterable[str]) -> Dict[str, RGB]:
    """``{name: color_for(name)}`` for every name."""
    return {name: color_for(name) for name in names}


def to_255(rgb: RGB) -> Tuple[int, int, int]:
    """0-1 floats to 0-255 integers (as MONAI Label's label info and Qt expect)."""
    return tuple(int(round(max(0.0, min(1.0, float(c))) * 255)) for c in rgb)  # type: ignore[return-value]
