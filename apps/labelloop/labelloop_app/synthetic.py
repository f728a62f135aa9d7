"""Deterministic synthetic CT-like torso phantoms with organ labels and a lesion classification cohort.

The phantoms are the project's sample data: they feed the MONAI Label studies folders, the tests and the
benchmarks, so that everything runs without downloading patient data.  Every case is fully determined by an
integer seed.

Anatomy is built in physical space.  SimpleITK physical coordinates are LPS (+x = patient left, +y = posterior,
+z = superior), so the liver (patient right) always has a negative physical x, whatever the header orientation;
in RAS coordinates (3D Slicer, nibabel) the same point has a positive x.  The header orientation only changes the
direction matrix and the array layout, never where the organs are.

Command line::

    python -m labelloop_app.synthetic --out sample-data [--seed 0] [--small] [--n-seg 24] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

__all__ = [
    "SEG_LABELS",
    "CLASSES",
    "ORIENTATION_CYCLE",
    "FOV_MODES",
    "PhantomCase",
    "orientation_direction",
    "phantom_case",
    "phantom_geometry",
    "make_phantom",
    "make_lesion_phantom",
    "cohort_plan",
    "generate_sample_data",
    "main",
]

logger = logging.getLogger(__name__)

SEG_LABELS: dict[str, int] = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
"""Organ label values (TotalSegmentator names)."""

CLASSES: list[str] = ["normal", "lesion"]
"""Image-level classes of the lesion cohort."""

ORIENTATION_CYCLE: tuple[tuple[str, float], ...] = (
    ("RAS", 0.0),
    ("LPS", 0.0),
    ("LAS", 0.0),
    ("RAS", 10.0),  # oblique: 10 degrees about the physical z axis
    ("LIP", 0.0),  # permuted axes: a coronal stack (rows left, columns inferior, slices posterior)
)
"""Header orientations used by default, cycled by seed (``seed % 5``) and by cohort index."""

FOV_MODES: tuple[str, ...] = ("full", "cut_top", "cut_bottom", "cut_side")
"""Field-of-view variants: all organs inside, liver dome cut, kidneys cut, liver or spleen cut laterally."""

HU_MIN, HU_MAX = -1024, 3071
GENERATOR_VERSION = 2
"""Bump when the rendering changes so that existing sample data is regenerated."""

NEAR_LIMIT_FRACTION = 0.2
"""Share of lesions drawn near the detection limit (radius 3-8 mm and 10-25 HU: at most two voxels across and at
most twice the noise at the classifier's 3.5 mm); the others are plain to a reader (8-20 mm, 25-60 HU)."""

_LETTER_AXES = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
_SEG_FOV_CYCLE = ("full", "full", "cut_top", "full", "cut_side", "full", "cut_bottom")
_STREAMS = {"seg": 1, "seg_heldout": 2, "cls": 3, "cls_heldout": 4}
_F32 = np.float32
_CHUNK_VOXELS = 1 << 21


# ----------------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------------
def orientation_direction(code: str, oblique_deg: float = 0.0) -> np.ndarray:
    """Direction matrix (columns = array axes in LPS physical space) for an orientation code such as ``"RAS"``.

    The code names where each array axis points (DICOM/nibabel convention, as ``sitk.DICOMOrient``): ``"LPS"`` is
    the identity, ``"RAS"`` flips x and y.  ``oblique_deg`` rotates the axes about the physical z axis.
    """
    code = code.upper()
    if len(code) != 3 or any(c not in _LETTER_AXES for c in code):
        raise ValueError(f"invalid orientation code {code!r}")
    direction = np.array([_LETTER_AXES[c] for c in code], dtype=float).T
    if abs(np.linalg.det(direction)) < 0.5:
        raise ValueError(f"orientation code {code!r} repeats an axis")
    if oblique_deg:
        direction = _rotation(z=oblique_deg) @ direction
    return direction


def _rotation(z: float = 0.0, y: float = 0.0, x: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx from angles in degrees."""
    cz, sz = math.cos(math.radians(z)), math.sin(math.radians(z))
    cy, sy = math.cos(math.radians(y)), math.sin(math.radians(y))
    cx, sx = math.cos(math.radians(x)), math.sin(math.radians(x))
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rz @ ry @ rx


@dataclass
class _Grid:
    """Voxel grid in SimpleITK conventions: ``size``/``spacing`` in (i, j, k) order, direction columns per axis."""

    size: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Numpy array shape (k, j, i)."""
        return int(self.size[2]), int(self.size[1]), int(self.size[0])

    @property
    def affine(self) -> np.ndarray:
        """Matrix A with physical = origin + A @ index."""
        return self.direction * self.spacing[None, :]

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Set this grid's geometry on an image."""
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction.ravel()])
        return image


def _axis_permutation(direction: np.ndarray) -> list[int]:
    """Physical axis (0=x, 1=y, 2=z) that each array axis mostly runs along."""
    perm = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
    if sorted(perm) != [0, 1, 2]:
        raise ValueError("direction matrix too oblique to map array axes onto physical axes")
    return perm


# ----------------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Shape:
    """Smooth solid with an approximate signed distance in mm (negative inside).

    ``kind``: ``ellipsoid`` (optionally tapered and deformed by low-frequency waves), ``cylinder`` (elliptic,
    infinite along local z), ``tube`` (capsule along local x of ``length``), ``box`` (infinite along local z) or
    ``body`` (elliptic cylinder whose semi-axes vary slowly with z, flatter at the back).
    """

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    kind: str = "ellipsoid"
    waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    taper: float = 0.0
    length: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned physical bounding box (conservative)."""
        if self.kind == "tube":
            p1 = self.center + self.rot[:, 0] * self.length
            r = float(self.radii[0])
            return np.minimum(self.center, p1) - r, np.maximum(self.center, p1) + r
        margin = 1.0 + float(np.abs(self.waves[:, 4]).sum()) if len(self.waves) else 1.0
        radii = self.radii * margin
        if self.kind == "body":
            radii = np.array([radii[0] * (1 + self.extra["ea"]), max(radii[1], self.extra["b_post"]), 0.0])
            radii *= 1 + self.extra["eb"]
        half = np.sqrt(((self.rot * radii[None, :]) ** 2).sum(axis=1))
        if self.kind in ("cylinder", "box", "body"):
            half[2] = 1e5
        return self.center - half, self.center + half

    def extent(self, within: Sequence[tuple[_Shape, float]] = (), n: int = 28) -> tuple[np.ndarray, np.ndarray]:
        """Tight physical bounding box, sampled on an ``n``^3 lattice; ``within`` clips as in ``_Canvas.paint``."""
        lo, hi = self.bounds()
        axes = [np.linspace(lo[d], hi[d], n) for d in range(3)]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        inside = self.distance(*self.local_points(pts)) < 0
        for other, shrink in within:
            inside &= other.distance(*other.local_points(pts)) + shrink < 0
        inside = pts[inside]
        if len(inside) == 0:
            return self.center.copy(), self.center.copy()
        step = (hi - lo) / (n - 1)
        return inside.min(axis=0) - step, inside.max(axis=0) + step

    def local_points(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local coordinates (mm) of physical points (N, 3)."""
        v = (np.asarray(points, dtype=float) - self.center) @ self.rot
        return v[:, 0], v[:, 1], v[:, 2]

    def distance(self, v0: np.ndarray, v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm) from local coordinates; arrays may be broadcastable."""
        if self.kind == "tube":
            t = np.clip(v0, 0.0, self.length)
            return np.sqrt((v0 - t) ** 2 + v1 * v1 + v2 * v2) - float(self.radii[0])
        if self.kind == "box":
            return np.maximum(np.abs(v0) - float(self.radii[0]), np.abs(v1) - float(self.radii[1]))
        if self.kind == "body":
            e = self.extra
            a = float(self.radii[0]) * (1.0 + e["ea"] * np.sin(e["wz"] * v2 + e["pa"]))
            b = np.where(v1 > 0, e["b_post"], float(self.radii[1])) * (1.0 + e["eb"] * np.sin(e["wz"] * v2 + e["pb"]))
            u0, u1 = v0 / a, v1 / b
            f = np.sqrt(u0 * u0 + u1 * u1)
            vn = np.sqrt(v0 * v0 + v1 * v1)
            return self._radial_distance(f, vn)
        u0 = v0 / float(self.radii[0])
        u1 = v1 / float(self.radii[1])
        u2 = v2 / float(self.radii[2])
        if self.taper:
            t = np.maximum(1.0 - self.taper * 0.5 * (u0 + 1.0), 0.3)
            u1 = u1 / t
            u2 = u2 / t
        if self.kind == "cylinder":
            f = np.sqrt(u0 * u0 + u1 * u1)
            vn = np.sqrt(v0 * v0 + v1 * v1)
        else:
            f = np.sqrt(u0 * u0 + u1 * u1 + u2 * u2)
            vn = np.sqrt(v0 * v0 + v1 * v1 + v2 * v2)
        if len(self.waves):
            g = 0.0
            for kx, ky, kz, ph, amp in self.waves:
                g = g + float(amp) * np.sin(float(kx) * u0 + float(ky) * u1 + float(kz) * u2 + float(ph))
            f = f * (1.0 + g)
        return self._radial_distance(f, vn)

    def _radial_distance(self, f: np.ndarray, vn: np.ndarray) -> np.ndarray:
        """Distance along the ray from the centre: the surface is where the level ``f`` equals 1."""
        rmin = float(np.min(self.radii))
        return (f - 1.0) * ((vn + 1e-6 * rmin) / (f + 1e-6))


def _ellipsoid(
    rng: np.random.Generator, center: Sequence[float], radii: Sequence[float], rot: np.ndarray, amp: float = 0.05
) -> _Shape:
    """Ellipsoid deformed by three random low-frequency waves of relative amplitude up to ``amp``."""
    waves = []
    for _ in range(3):
        k = rng.normal(size=3)
        k *= rng.uniform(1.5, 3.0) / (np.linalg.norm(k) + 1e-9)
        waves.append([k[0], k[1], k[2], rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0) * amp])
    return _Shape(np.asarray(center, float), np.asarray(radii, float), rot, waves=np.array(waves))


def _tube(p0: np.ndarray, p1: np.ndarray, radius: float) -> _Shape:
    """Capsule between two points."""
    d = p1 - p0
    length = float(np.linalg.norm(d))
    e0 = d / max(length, 1e-6)
    ref = np.array([0.0, 0.0, 1.0]) if abs(e0[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(e0, ref)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e0, e1)
    return _Shape(np.asarray(p0, float), np.array([radius] * 3), np.stack([e0, e1, e2], axis=1), "tube", length=length)


# ----------------------------------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Anatomy:
    """Everything patient-specific, in physical LPS millimetres and HU."""

    hard: bool
    enhanced: bool
    body: _Shape
    wall: float
    organs: dict[str, _Shape]
    hu: dict[str, float]
    muscles: list[_Shape]
    lungs: list[_Shape]
    bowel: list[tuple[_Shape, float]]
    stomach: _Shape
    liver_vessels: list[_Shape]
    gallbladder: _Shape | None
    kidney_sinus: dict[str, _Shape]
    vessels: list[tuple[_Shape, float]]
    spine: dict[str, Any]
    table: _Shape | None


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent random stream of a case, so that e.g. the header orientation never changes the anatomy."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, stream]))


def _default_flags(seed: int) -> tuple[str, bool]:
    """Seeded default field-of-view mode and difficulty of a case."""
    rng = _rng(seed, 0)
    mode = str(rng.choice(FOV_MODES, p=[0.55, 0.15, 0.15, 0.15]))
    return mode, bool(rng.random() < 0.25)


def _mirror_x(shape: _Shape) -> _Shape:
    """The mirror image of a shape across the body's sagittal midplane (physical x = 0)."""
    flip = np.diag([-1.0, 1.0, 1.0])
    return replace(shape, center=flip @ shape.center, rot=flip @ shape.rot)


def _make_anatomy(seed: int, hard: bool, enhanced: bool | None = None, mirrored: bool = False) -> _Anatomy:
    """Random torso: body, wall, organs, vessels, bowel, spine, lungs, table (the same for any header).

    ``mirrored``: situs inversus, the liver, gallbladder, spleen, stomach and great vessels on the other side (the
    kidneys stay); drawn from the same random numbers as the case without it."""
    rng = _rng(seed, 1)
    u = rng.uniform
    s = u(0.85, 1.15)  # patient size
    a = 165.0 * s * u(0.93, 1.07)
    b = a * u(0.62, 0.76)
    fat = u(8.0, 30.0) * s
    muscle = u(7.0, 14.0)
    body = _Shape(
        np.zeros(3),
        np.array([a, b, 1.0]),
        kind="body",
        extra={
            "b_post": b * u(0.88, 0.97),
            "ea": u(0.0, 0.05),
            "eb": u(0.0, 0.05),
            "wz": 2 * math.pi / u(250.0, 450.0),
            "pa": u(0, 2 * math.pi),
            "pb": u(0, 2 * math.pi),
            "fat": fat,
        },
    )
    wall = fat + muscle * 0.8

    small_organs = u(0.72, 0.85)  # drawn in every case so that ``hard`` changes nothing else
    so = s * u(0.92, 1.08) * (small_organs if hard else 1.0)
    drawn_enhanced = bool(rng.random() < 0.4)  # drawn in every case so that forcing it changes nothing else
    enhanced = drawn_enhanced if enhanced is None else bool(enhanced)
    offset = u(-8.0, 8.0)
    fat_frac = u(0.0, 0.2) if hard else u(0.3, 0.85)
    fat_hu = u(-110.0, -85.0)
    hu = {
        "fat": fat_hu,
        "muscle": u(40.0, 60.0) + offset,
        "visceral": fat_hu * fat_frac + u(25.0, 40.0) * (1 - fat_frac),
        "visceral_amp": u(15.0, 40.0) * (0.5 if hard else 1.0),
        "liver": u(55.0, 70.0) + offset,
        "spleen": u(45.0, 60.0) + offset,
        "kidney": (u(150.0, 200.0) if enhanced else u(25.0, 40.0)) + offset,
        "lung": u(-870.0, -830.0),
        "organ_amp": u(1.5, 4.0),
        "sinus": u(-80.0, -30.0),
        "gallbladder": u(0.0, 20.0),
        "liver_vessel": u(40.0, 90.0) if enhanced else -u(12.0, 25.0),
        "cortical": u(700.0, 1000.0),
        "cancellous": u(180.0, 320.0),
        "disc": u(70.0, 100.0),
        "csf": u(0.0, 15.0),
        "rib": u(350.0, 700.0),
        "table": u(200.0, 500.0),
        "fluid": u(5.0, 25.0),
    }

    def rot() -> np.ndarray:
        return _rotation(z=u(-15, 15), y=u(-10, 10), x=u(-10, 10))

    def jit(lo: float = 0.9, hi: float = 1.1) -> np.ndarray:
        return rng.uniform(lo, hi, size=3)

    organs = {}
    liver = _ellipsoid(
        rng,
        [-0.42 * a, -0.08 * b + u(-8, 8), 95.0 * s + u(-10, 10)],
        np.array([80.0, 66.0, 78.0]) * so * jit(),
        rot(),
        amp=0.06,
    )
    liver.taper = u(0.25, 0.45)
    organs["liver"] = liver
    organs["spleen"] = _ellipsoid(
        rng,
        [0.58 * a, 0.28 * b + u(-6, 6), 90.0 * s + u(-12, 12)],
        np.array([26.0, 48.0, 52.0]) * so * jit(0.85, 1.15),
        _rotation(z=u(-50, -30), x=u(-10, 10)),
        amp=0.05,
    )
    kid_x, kid_y = 0.42 * a, 0.52 * b
    kid_z = u(5.0, 25.0) * s
    for name, sign, dz in (("kidney_left", 1.0, 0.0), ("kidney_right", -1.0, -u(5.0, 25.0))):
        organs[name] = _ellipsoid(
            rng,
            [sign * kid_x * u(0.95, 1.05), kid_y * u(0.95, 1.05), kid_z + dz],
            np.array([28.0, 25.0, 55.0]) * so * jit(),
            _rotation(z=sign * u(20, 35), y=-sign * u(0, 12)),
            amp=0.04,
        )
    sinus = {}
    for name, sign in (("kidney_left", 1.0), ("kidney_right", -1.0)):
        k = organs[name]
        c = k.center + k.rot @ np.array([-sign * 0.55 * k.radii[0], 0.0, 0.0])
        sinus[name] = _ellipsoid(rng, c, k.radii * np.array([0.35, 0.3, 0.45]), k.rot, amp=0.03)

    # liver vessels radiate from the hilum; gallbladder sits in the inferior, anterior, medial fossa
    lc, lr, lrot = liver.center, liver.radii, liver.rot
    hilum = lc + lrot @ (lr * np.array([0.25, 0.1, -0.2]))
    liver_vessels = []
    for _ in range(int(rng.integers(3, 7))):
        d = rng.normal(size=3) * np.array([1.0, 0.6, 0.8])
        d[0] = -abs(d[0])  # mostly towards the right lobe
        d /= np.linalg.norm(d)
        p1 = hilum + lrot @ (d * lr * u(0.5, 0.85))
        liver_vessels.append(_tube(hilum, p1, u(2.5, 6.5)))
    gb_present = rng.random() < 0.7
    gb = _ellipsoid(
        rng, lc + lrot @ (lr * np.array([0.45, -0.55, -0.6])), np.array([14.0, 16.0, 32.0]) * so * jit(), rot(), 0.04
    )

    # spine, muscles, big vessels
    yv = 0.48 * b
    rv = np.array([21.0, 17.0]) * s * u(0.9, 1.1)
    y_canal = yv + rv[1] + 9.0 * s
    spine = {
        "body": _Shape(np.array([0.0, yv, 0.0]), np.array([rv[0], rv[1], 1.0]), kind="cylinder"),
        "arch": _Shape(np.array([0.0, y_canal, 0.0]), np.array([17.0, 15.0, 1.0]) * s, kind="cylinder"),
        "canal": _Shape(np.array([0.0, y_canal, 0.0]), np.array([8.0, 7.0, 1.0]) * s, kind="cylinder"),
        "process": _Shape(np.array([0.0, y_canal + 24.0 * s, 0.0]), np.array([5.0, 14.0, 1.0]) * s, kind="cylinder"),
        "period": u(27.0, 34.0) * s,
        "disc": u(5.0, 8.0),
        "phase": u(0.0, 40.0),
    }
    muscles = [
        _Shape(np.array([sign * 33.0 * s, y_canal + 14.0 * s, 0.0]), np.array([26.0, 22.0, 1.0]) * s, kind="cylinder")
        for sign in (-1.0, 1.0)
    ]
    muscles += [
        _ellipsoid(rng, [sign * 34.0 * s, yv, -140.0 * s], np.array([17.0, 17.0, 170.0]) * s, np.eye(3), 0.03)
        for sign in (-1.0, 1.0)
    ]
    r_ao = u(10.0, 13.0) * s
    vessels = [
        (
            _Shape(np.array([14.0 * s, yv - rv[1] - r_ao - 3, 0.0]), np.array([r_ao, r_ao, 1.0]), kind="cylinder"),
            u(150.0, 250.0) if enhanced else u(38.0, 48.0),
        ),
        (
            _Shape(np.array([-24.0 * s, yv - rv[1] - 9.0, 0.0]), np.array([14.0, 10.0, 1.0]) * s, kind="cylinder"),
            u(90.0, 140.0) if enhanced else u(35.0, 45.0),
        ),
    ]

    lungs = [
        _ellipsoid(
            rng,
            [sign * 0.45 * a, 0.15 * b, liver.center[2] + u(50, 80) * s + 120.0 * s],
            np.array([0.36 * a, 0.75 * b, 130.0 * s]) * jit(0.95, 1.05),
            np.eye(3),
            0.03,
        )
        for sign in (-1.0, 1.0)
    ]
    stomach = _ellipsoid(
        rng, [0.3 * a, -0.35 * b, 125.0 * s + u(-10, 10)], np.array([45.0, 35.0, 50.0]) * s * jit(), rot(), 0.06
    )
    bowel = []
    for _ in range(int(rng.integers(8, 17))):
        c = [u(-0.6, 0.6) * a, u(-0.75, 0.1) * b, u(-110.0, 50.0) * s]
        kind = rng.random()
        value = u(-950.0, -600.0) if kind < 0.2 else (u(150.0, 300.0) if kind > 0.9 else u(0.0, 40.0))
        bowel.append((_ellipsoid(rng, c, rng.uniform(10.0, 30.0, size=3) * s, rot(), 0.08), value))

    table = None
    if rng.random() < 0.7:
        thick = u(6.0, 12.0)
        y_table = body.extra["b_post"] * (1 + body.extra["eb"]) + u(3.0, 25.0) + thick / 2
        table = _Shape(np.array([0.0, y_table, 0.0]), np.array([u(180.0, 230.0), thick / 2, 1.0]), kind="box")
    if mirrored:
        organs["liver"], organs["spleen"] = _mirror_x(organs["liver"]), _mirror_x(organs["spleen"])
        stomach = _mirror_x(stomach)
        gb = _mirror_x(gb)
        liver_vessels = [_mirror_x(v) for v in liver_vessels]
        vessels = [(_mirror_x(v), value) for v, value in vessels]
    return _Anatomy(
        hard=hard,
        enhanced=enhanced,
        body=body,
        wall=wall,
        organs=organs,
        hu=hu,
        muscles=muscles,
        lungs=lungs,
        bowel=bowel,
        stomach=stomach,
        liver_vessels=liver_vessels,
        gallbladder=gb if gb_present else None,
        kidney_sinus=sinus,
        vessels=vessels,
        spine=spine,
        table=table,
    )


# ----------------------------------------------------------------------------------------------------------------
# field of view
# ----------------------------------------------------------------------------------------------------------------
def _round_to(x: float, step: float) -> float:
    return round(x / step) * step


def _plan_grid(
    anat: _Anatomy,
    seed: int,
    *,
    profile: str,
    mode: str,
    small: bool,
    size: Sequence[int] | None,
    spacing: Sequence[float] | None,
    direction: np.ndarray,
) -> tuple[_Grid, dict[str, float]]:
    """Choose field of view, matrix and spacing (physical axes first, then permuted to the array axes)."""
    rng = _rng(seed, 2)
    r = rng.random(16)  # fixed number of draws: choices never shift the other streams
    ext = {k: v.extent(within=[(anat.body, anat.wall)]) for k, v in anat.organs.items()}
    lo = {k: v[0] for k, v in ext.items()}
    hi = {k: v[1] for k, v in ext.items()}
    body_half = float(anat.body.radii[0]) * (1 + anat.body.extra["ea"])
    needed = 2 * body_half + 10 + 20 * r[0]
    cx, cy = (r[3] - 0.5) * 10.0, 5.0 + (r[4] - 0.5) * 20.0
    kid_lo = min(lo["kidney_left"][2], lo["kidney_right"][2])
    top_hi = max(hi["liver"][2], hi["spleen"][2])
    acq = {"noise_hu": (18.0 + 7.0 * r[12]) if anat.hard else (5.0 + 13.0 * r[12])}
    acq["blur_xy"], acq["blur_z"] = 0.3 + 0.35 * r[13], 0.3 + 0.15 * r[14]
    acq["noise_corr"] = 0.45 + 0.35 * r[15]

    if profile == "cls":
        n_xy = (96, 112, 128)[int(r[2] * 3)]
        px = float(np.clip(needed / n_xy, 2.0, 3.0))
        n_z = 30 + int(r[8] * 21)
        sz = _round_to(3.0 + 2.0 * r[9], 0.5)
        z_c = float(anat.organs["liver"].center[2]) + (r[6] - 0.5) * 30.0
        z_lo, z_hi = z_c - n_z * sz / 2, z_c + n_z * sz / 2
    else:
        if mode == "cut_side":
            n_xy = 256 + 16 * int(r[2] * 5)
            px = float(np.clip(needed * (0.55 + 0.15 * r[1]) / n_xy, 0.7, 1.0))
            width = n_xy * px
            if r[5] < 0.5:  # cut the liver: field of view shifted to the patient's left
                cx = lo["liver"][0] + 20.0 + 25.0 * r[3] + width / 2
            else:
                cx = hi["spleen"][0] - 15.0 - 20.0 * r[3] - width / 2
        else:
            px = 0.7 + 0.3 * r[1]
            n_xy = int(np.clip(math.ceil(needed / px / 16) * 16, 256, 384))
            if n_xy * px < needed:
                px = min(1.0, needed / n_xy)
        px = _round_to(px, 0.01)
        z_lo = kid_lo - (10.0 + 40.0 * r[6])
        z_hi = top_hi + (10.0 + 40.0 * r[7])
        if mode == "cut_top":
            z_hi = hi["liver"][2] - (20.0 + 35.0 * r[7])
        elif mode == "cut_bottom":
            z_lo = max(lo["kidney_left"][2], lo["kidney_right"][2]) + (20.0 + 25.0 * r[6])
        length = z_hi - z_lo
        sz = 2.0 + 3.0 * r[8]
        sz = float(np.clip(sz, length / 90.0, length / 40.0))
        sz = float(np.clip(_round_to(sz, 0.25), 2.0, 5.0))
        n_z = int(np.clip(math.ceil(length / sz - 1e-6), 40, 90))
        if mode == "cut_top":
            z_lo = z_hi - n_z * sz
        elif mode == "cut_bottom":
            z_hi = z_lo + n_z * sz
        else:
            z_c = (z_lo + z_hi) / 2
            z_lo, z_hi = z_c - n_z * sz / 2, z_c + n_z * sz / 2

    extent = np.array([n_xy * px, n_xy * px, z_hi - z_lo])
    size_p = np.array([n_xy, n_xy, n_z])
    spacing_p = np.array([px, px, sz])
    if small:
        n_small = (48, 40) if profile == "cls" else (48 + 8 * int(r[10] * 3), 40 + int(r[11] * 17))
        size_p = np.array([n_small[0], n_small[0], n_small[1]])
        spacing_p = extent / size_p
    perm = _axis_permutation(direction)
    if size is not None:
        size_p = np.empty(3, int)
        for a in range(3):
            size_p[perm[a]] = int(size[a])
        if spacing is None:
            spacing_p = extent / size_p
    if spacing is not None:
        spacing_p = np.empty(3)
        for a in range(3):
            spacing_p[perm[a]] = float(spacing[a])
        if size is None:
            size_p = np.maximum(np.ceil(extent / spacing_p - 1e-6), 1).astype(int)
    size_a = np.array([size_p[perm[a]] for a in range(3)], dtype=int)
    spacing_a = np.array([spacing_p[perm[a]] for a in range(3)], dtype=float)
    center = np.array([cx, cy, (z_lo + z_hi) / 2])
    origin = center - direction @ (spacing_a * (size_a - 1) / 2.0)
    acq["perm"] = perm
    return _Grid(size_a, spacing_a, origin, direction), acq


# ----------------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------------
class _Canvas:
    """Image (float HU) and label arrays on a grid; shapes are painted only inside their index bounding box."""

    def __init__(self, grid: _Grid, texture: np.ndarray):
        self.grid = grid
        self.img = np.full(grid.shape, -1000.0, dtype=_F32)
        self.lab = np.zeros(grid.shape, dtype=np.uint8)
        self.tex = texture
        self.w = float(np.prod(grid.spacing) ** (1.0 / 3.0))  # partial-volume edge width (mm)
        self._a = grid.affine
        self._ainv = np.linalg.inv(self._a)

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
        """Index box (k0, k1, j0, j1, i0, i1) covering a physical box, or None when outside the grid."""
        lo, hi = np.maximum(lo, -1e5), np.minimum(hi, 1e5)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        idx = self._ainv @ (corners - self.grid.origin).T
        i_lo = np.clip(np.floor(idx.min(axis=1)).astype(np.int64), 0, self.grid.size)
        i_hi = np.clip(np.ceil(idx.max(axis=1)).astype(np.int64) + 1, 0, self.grid.size)
        if np.any(i_hi <= i_lo):
            return None
        return int(i_lo[2]), int(i_hi[2]), int(i_lo[1]), int(i_hi[1]), int(i_lo[0]), int(i_hi[0])

    def _linear(self, coef: np.ndarray, const: float, blk: tuple[int, ...]) -> np.ndarray:
        """``const + coef . (i, j, k)`` on a block, broadcast only along the axes it varies on."""
        k0, k1, j0, j1, i0, i1 = blk
        out = np.full((1, 1, 1), const, dtype=_F32)
        scale = float(np.abs(coef).max()) + 1e-30
        for c, (a0, a1), shape in zip(coef, ((i0, i1), (j0, j1), (k0, k1)), ((1, 1, -1), (1, -1, 1), (-1, 1, 1))):
            if abs(c) > 1e-9 * scale:
                out = out + (float(c) * np.arange(a0, a1, dtype=_F32)).reshape(shape)
        return out

    def local(self, shape: _Shape, blk: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local coordinates of a shape on a block (linear in the voxel index)."""
        m = shape.rot.T @ self._a
        b = shape.rot.T @ (self.grid.origin - shape.center)
        return (
            self._linear(m[0], float(b[0]), blk),
            self._linear(m[1], float(b[1]), blk),
            self._linear(m[2], float(b[2]), blk),
        )

    def alpha(self, shape: _Shape, blk: tuple[int, ...], offset: float = 0.0) -> np.ndarray:
        """Partial-volume occupancy (0..1) of a shape grown by ``offset`` mm (negative shrinks)."""
        d = shape.distance(*self.local(shape, blk)) - offset
        return np.clip(0.5 - d / self.w, 0.0, 1.0)

    def paint(
        self,
        shape: _Shape,
        hu: float | Callable[[tuple[np.ndarray, ...], np.ndarray, tuple[slice, ...]], np.ndarray],
        *,
        label: int | None = None,
        clear: int | None = None,
        within: Sequence[tuple[_Shape, float]] = (),
        additive: bool = False,
    ) -> int:
        """Blend a shape into the image; set ``label`` (or reset ``clear`` to 0) where it occupies > 50 %.

        ``within`` restricts the shape to other shapes (each shrunk by the given mm).  Returns the voxel count.
        """
        box = self.block(*shape.bounds())
        if box is None:
            return 0
        k0, k1 = box[0], box[1]
        step = max(1, _CHUNK_VOXELS // max(1, (box[3] - box[2]) * (box[5] - box[4])))
        count = 0
        for k in range(k0, k1, step):  # slabs bound the memory of the temporaries
            blk = (k, min(k + step, k1)) + box[2:]
            sl = (slice(blk[0], blk[1]), slice(blk[2], blk[3]), slice(blk[4], blk[5]))
            v = self.local(shape, blk)
            d = shape.distance(*v)
            alpha = np.clip(0.5 - d / self.w, 0.0, 1.0)
            for other, shrink in within:
                alpha = alpha * self.alpha(other, blk, -shrink)
            view = self.img[sl]
            alpha = np.broadcast_to(alpha, view.shape).astype(_F32)
            value = hu(v, d, sl) if callable(hu) else hu
            if additive:
                view += alpha * value
            else:
                view += alpha * (value - view)
            mask = alpha > 0.5
            if label is not None:
                self.lab[sl][mask] = label
            if clear is not None:
                lab = self.lab[sl]
                lab[mask & (lab == clear)] = 0
            count += int(mask.sum())
        return count


_TEXTURE_BOX = (np.array([-320.0, -320.0, -420.0]), np.array([320.0, 320.0, 520.0]))


def _texture(seed: int, grid: _Grid) -> np.ndarray:
    """Smooth random tissue texture (unit std, blobs of ~5-15 mm) defined on a fixed physical lattice.

    Being physical, it is identical for any header orientation; interpolation onto the grid is done by SimpleITK.
    """
    rng = _rng(seed, 5)
    lo, hi = _TEXTURE_BOX
    ref = grid.apply(sitk.Image([int(x) for x in grid.size], sitk.sitkUInt8))
    out = None
    for step, weight in ((12.0, 0.75), (5.0, 0.65)):
        n = np.ceil((hi - lo) / step).astype(int) + 1
        lattice = rng.standard_normal((n[2], n[1], n[0]), dtype=_F32)
        for axis in range(3):
            lattice = _blur_axis(lattice, axis, 0.9)
        lattice *= _F32(weight / (lattice.std() + 1e-6))
        coarse = sitk.GetImageFromArray(lattice)
        coarse.SetSpacing([step] * 3)
        coarse.SetOrigin([float(x) for x in lo])
        field = sitk.Resample(coarse, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        arr = sitk.GetArrayViewFromImage(field)
        out = np.array(arr, dtype=_F32) if out is None else out + arr
    return out


def _gauss_kernel(sigma: float) -> np.ndarray:
    """Normalised 1D Gaussian kernel (sigma in voxels), at most 17 taps."""
    rad = min(int(math.ceil(3 * sigma)), 8)
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    return k / k.sum()


def _blur_axis(arr: np.ndarray, axis: int, sigma: float) -> np.ndarray:
    """Separable Gaussian along one array axis (sigma in voxels), edge-replicated; no-op for tiny sigma."""
    if sigma < 0.2 or arr.shape[axis] < 2:
        return arr
    k = _gauss_kernel(sigma)
    rad = len(k) // 2
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (rad, rad)
    p = np.pad(arr, pad, mode="edge")
    n = arr.shape[axis]
    out = arr * _F32(k[rad])
    for t in range(1, rad + 1):
        plus = [slice(None)] * arr.ndim
        minus = [slice(None)] * arr.ndim
        plus[axis] = slice(rad + t, rad + t + n)
        minus[axis] = slice(rad - t, rad - t + n)
        out += _F32(k[rad + t]) * (p[tuple(plus)] + p[tuple(minus)])
    return out


def _organ_status(lab: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per organ: voxel count and whether it is fully inside, cut by the field of view or absent."""
    faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
    counts = np.bincount(lab.ravel(), minlength=max(SEG_LABELS.values()) + 1)
    out = {}
    for name, value in SEG_LABELS.items():
        n = int(counts[value])
        touching = any(bool(np.any(f == value)) for f in faces)
        out[name] = {"voxels": n, "status": "absent" if n == 0 else ("cut" if touching else "full")}
    return out


def _render(
    anat: _Anatomy, grid: _Grid, acq: dict[str, Any], seed: int, lesion: _Shape | None = None, lesion_hu: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Paint the torso (and optional liver lesion) on a grid; returns int16 HU, uint8 labels, lesion voxel count."""
    cv = _Canvas(grid, _texture(seed, grid))
    hu = anat.hu
    body, wall = anat.body, anat.wall
    cavity = [(body, wall)]
    fat_thick = body.extra["fat"]
    spine = anat.spine

    if anat.table is not None:
        cv.paint(anat.table, hu["table"])

    rib_phase = float(spine["phase"]) * 0.7
    rib_z0 = float(anat.organs["kidney_left"].center[2]) + 20.0

    def body_hu(v: tuple[np.ndarray, ...], d: np.ndarray, sl: tuple[slice, ...]) -> np.ndarray:
        depth = -d
        s1 = np.clip((depth - fat_thick) / cv.w + 0.5, 0.0, 1.0)
        s2 = np.clip((depth - wall) / cv.w + 0.5, 0.0, 1.0)
        visceral = hu["visceral"] + hu["visceral_amp"] * cv.tex[sl]
        out = hu["fat"] + (hu["muscle"] - hu["fat"]) * s1 + (visceral - hu["muscle"]) * s2
        x, y, z = v
        rib = (
            (depth > fat_thick + 1.0)
            & (depth < fat_thick + 9.0)
            & (np.mod(z - rib_phase - 45.0 * y / float(body.radii[1]), 30.0) < 9.0)
            & (z > rib_z0)
            & ~((np.abs(x) < 0.3 * float(body.radii[0])) & (y < 0))
            & ~((np.abs(x) < 0.25 * float(body.radii[0])) & (y > 0))
        )
        return np.where(rib, _F32(hu["rib"]), out)

    cv.paint(body, body_hu)
    under_skin = [(body, 0.6 * fat_thick)]

    def soft_hu(value: float, amp: float) -> Callable[..., np.ndarray]:
        return lambda v, d, sl: value + amp * cv.tex[sl]

    for m in anat.muscles:  # paraspinal muscles (cylinders) in the back, psoas (ellipsoids) in the cavity
        cv.paint(m, soft_hu(hu["muscle"], 3.0), within=under_skin if m.kind == "cylinder" else cavity)
    for lung in anat.lungs:
        cv.paint(lung, soft_hu(hu["lung"], 15.0), within=cavity)
    for loop, value in anat.bowel:
        cv.paint(loop, value, within=cavity)
    stomach = anat.stomach
    cv.paint(
        stomach,
        lambda v, d, sl: np.where(v[1] < -0.4 * float(stomach.radii[1]), _F32(-900.0), _F32(hu["fluid"])),
        within=cavity,
    )

    liver = anat.organs["liver"]
    cv.paint(liver, soft_hu(hu["liver"], hu["organ_amp"]), label=SEG_LABELS["liver"], within=cavity)
    for vessel in anat.liver_vessels:
        cv.paint(vessel, hu["liver"] + hu["liver_vessel"], within=[(liver, 1.0)] + cavity)
    if anat.gallbladder is not None:
        cv.paint(anat.gallbladder, hu["gallbladder"], clear=SEG_LABELS["liver"], within=cavity)
    cv.paint(anat.organs["spleen"], soft_hu(hu["spleen"], hu["organ_amp"]), label=SEG_LABELS["spleen"], within=cavity)
    for name in ("kidney_left", "kidney_right"):
        cv.paint(anat.organs[name], soft_hu(hu["kidney"], hu["organ_amp"]), label=SEG_LABELS[name], within=cavity)
        cv.paint(anat.kidney_sinus[name], hu["sinus"], clear=SEG_LABELS[name], within=cavity)
    for vessel, value in anat.vessels:
        cv.paint(vessel, value, label=0)

    period, disc, phase = float(spine["period"]), float(spine["disc"]), float(spine["phase"])

    def bone_hu(cortical: bool) -> Callable[..., np.ndarray]:
        def fn(v: tuple[np.ndarray, ...], d: np.ndarray, sl: tuple[slice, ...]) -> np.ndarray:
            is_disc = np.mod(v[2] - phase, period) < disc
            bone = np.where(d > -2.5, _F32(hu["cortical"]), _F32(hu["cancellous"])) if cortical else hu["cortical"]
            return np.where(is_disc, _F32(hu["disc"] if cortical else hu["muscle"]), bone)

        return fn

    cv.paint(spine["arch"], bone_hu(False), label=0, within=under_skin)
    cv.paint(spine["process"], bone_hu(False), label=0, within=under_skin)
    cv.paint(spine["canal"], hu["csf"], label=0)
    cv.paint(spine["body"], bone_hu(True), label=0)

    n_lesion = 0
    if lesion is not None:
        n_lesion = cv.paint(lesion, lesion_hu, additive=True)

    # slice profile / reconstruction kernel, then correlated noise
    img, lab = cv.img, cv.lab
    cv.tex = cv.img = None  # type: ignore[assignment]  # release memory before blurring
    img = acquisition_blur(img, acq)
    img += _shape_noise(_rng(seed, 3).standard_normal(img.shape, dtype=_F32), acq)
    out = np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)
    return out, lab, n_lesion


def acquisition_blur(array: np.ndarray, acq: dict[str, Any]) -> np.ndarray:
    """The acquisition's slice profile and reconstruction kernel (``blur_xy`` in-plane, ``blur_z`` across slices)
    applied to a float32 array in numpy order, as rendering applies them to the torso."""
    perm = acq["perm"]  # array axis a runs along physical axis perm[a]; z is the slice direction
    for a in range(3):
        array = _blur_axis(array, 2 - a, acq["blur_xy"] if perm[a] < 2 else acq["blur_z"])
    return array


def acquisition_noise(shape: Sequence[int], acq: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """A fresh draw (float64, numpy order) of the noise an image of the acquisition ``acq`` carries: the correlated
    Gaussian noise rendering adds, and the rounding to integer HU as white noise of variance 1/12, so that its power
    spectrum is :func:`noise_power`'s."""
    correlated = _shape_noise(rng.standard_normal(tuple(shape), dtype=_F32), acq).astype(np.float64)
    return correlated + rng.standard_normal(tuple(shape)) * math.sqrt(1.0 / 12.0)


def _shape_noise(white: np.ndarray, acq: dict[str, Any]) -> np.ndarray:
    """The acquisition's noise from white Gaussian noise: correlated in-plane (``noise_corr``), rescaled to a
    standard deviation of ``noise_hu``."""
    noise, corr, gain = white, float(acq["noise_corr"]), 1.0
    for a in range(3):
        if acq["perm"][a] < 2:
            noise = _blur_axis(noise, 2 - a, corr)
            gain *= float(np.sqrt((_gauss_kernel(corr) ** 2).sum()))
    return noise * _F32(acq["noise_hu"] / gain)


def noise_power(shape: Sequence[int], acq: dict[str, Any]) -> np.ndarray:
    """Power spectrum of the noise an image of the acquisition ``acq`` carries, on an array of ``shape`` (numpy
    order, FFT layout): ``E|FFT(noise)|^2 / N`` of the correlated Gaussian noise, plus the rounding to integer HU
    (variance 1/12). White noise of variance v has ``v`` at every frequency."""
    delta = np.zeros(tuple(shape), dtype=_F32)
    delta[tuple(n // 2 for n in shape)] = 1.0
    kernel = np.fft.ifftshift(_shape_noise(delta, acq).astype(np.float64))
    return np.abs(np.fft.fftn(kernel)) ** 2 + 1.0 / 12.0


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PhantomCase:
    """A rendered segmentation phantom: image (int16 HU), label map (uint8) and a description of the case."""

    image: sitk.Image
    label: sitk.Image
    info: dict[str, Any]


def _resolve_orientation(seed: int, orientation: str | None, oblique_deg: float) -> tuple[str, float]:
    """Orientation code and oblique angle; ``None`` cycles through ``ORIENTATION_CYCLE`` by seed."""
    if orientation is None:
        code, angle = ORIENTATION_CYCLE[int(seed) % len(ORIENTATION_CYCLE)]
        return code, angle + float(oblique_deg)
    return orientation.upper(), float(oblique_deg)


def _to_image(array: np.ndarray, grid: _Grid) -> sitk.Image:
    return grid.apply(sitk.GetImageFromArray(array))


def _geometry_info(grid: _Grid) -> dict[str, Any]:
    return {
        "size": [int(x) for x in grid.size],
        "spacing": [round(float(x), 6) for x in grid.spacing],
        "origin": [round(float(x), 6) for x in grid.origin],
        "direction": [round(float(x), 9) for x in grid.direction.ravel()],
    }


def _setup_case(
    seed: int,
    size: Sequence[int] | None,
    spacing: Sequence[float] | None,
    orientation: str | None,
    oblique_deg: float,
    fov: str | None,
    hard: bool | None,
    small: bool,
    enhanced: bool | None = None,
    mirrored: bool = False,
) -> tuple[_Anatomy, _Grid, dict[str, Any], dict[str, Any]]:
    """Anatomy, grid, acquisition and description of a segmentation case (no rendering)."""
    default_mode, default_hard = _default_flags(seed)
    mode = default_mode if fov is None else fov
    if mode not in FOV_MODES:
        raise ValueError(f"fov must be one of {FOV_MODES}, got {mode!r}")
    hard = default_hard if hard is None else bool(hard)
    code, angle = _resolve_orientation(seed, orientation, oblique_deg)
    direction = orientation_direction(code, angle)
    anat = _make_anatomy(seed, hard, enhanced, mirrored)
    grid, acq = _plan_grid(
        anat, seed, profile="seg", mode=mode, small=small, size=size, spacing=spacing, direction=direction
    )
    meta = {
        "seed": int(seed),
        "orientation": code,
        "oblique_deg": angle,
        "fov": mode,
        "hard": hard,
        "contrast": "enhanced" if anat.enhanced else "native",
        "noise_hu": round(float(acq["noise_hu"]), 2),
        **_geometry_info(grid),
    }
    if mirrored:
        meta["situs"] = "inversus"
    return anat, grid, acq, meta


def phantom_geometry(
    seed: int,
    *,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    oblique_deg: float = 0.0,
    fov: str | None = None,
    hard: bool | None = None,
    small: bool = False,
    enhanced: bool | None = None,
    mirrored: bool = False,
) -> dict[str, Any]:
    """Description and grid (size, spacing, origin, direction) of :func:`phantom_case` without rendering (fast)."""
    return _setup_case(seed, size, spacing, orientation, oblique_deg, fov, hard, small, enhanced, mirrored)[3]


def phantom_case(
    seed: int,
    *,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    oblique_deg: float = 0.0,
    fov: str | None = None,
    hard: bool | None = None,
    small: bool = False,
    enhanced: bool | None = None,
    mirrored: bool = False,
) -> PhantomCase:
    """Render one segmentation phantom and describe it (geometry, field of view, organ status, contrast, noise).

    Args:
        seed: determines anatomy, field of view, acquisition and noise.
        size, spacing: SimpleITK (i, j, k) order; when only one is given the other follows from the field of view.
        orientation: header orientation code (e.g. "RAS", "LPS", "LIP"); None cycles ``ORIENTATION_CYCLE`` by seed.
        oblique_deg: extra rotation of the voxel axes about the physical z axis.
        fov: one of ``FOV_MODES``; None picks it from the seed (most cases "full").
        hard: small organs, low organ-to-background contrast and high noise; None picks it from the seed.
        small: tiny matrix (48-64 voxels per side) covering the same field of view, for fast tests.
        enhanced: contrast-enhanced (bright vessels and kidneys) or native phase; None picks it from the seed (40%
            enhanced). Forcing it changes nothing else about the case.
        mirrored: situs inversus (liver, gallbladder, spleen, stomach and great vessels on the other side, the
            kidneys in place); nothing else about the case changes.
    """
    anat, grid, acq, meta = _setup_case(
        seed, size, spacing, orientation, oblique_deg, fov, hard, small, enhanced, mirrored
    )
    img, lab, _ = _render(anat, grid, acq, seed)
    organs = _organ_status(lab)
    for name in SEG_LABELS:
        organs[name]["hu"] = round(float(anat.hu["kidney" if name.startswith("kidney") else name]), 1)
    info = {**meta, "organs": organs}
    return PhantomCase(_to_image(img, grid), _to_image(lab, grid), info)


def make_phantom(
    seed: int,
    *,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    oblique_deg: float = 0.0,
    fov: str | None = None,
    hard: bool | None = None,
    small: bool = False,
) -> tuple[sitk.Image, sitk.Image]:
    """Image (int16 HU) and label map (uint8, values from SEG_LABELS) on exactly the same grid.

    Same arguments as :func:`phantom_case`; anatomy depends on the seed only (never on size, spacing or header).
    """
    case = phantom_case(
        seed,
        size=size,
        spacing=spacing,
        orientation=orientation,
        oblique_deg=oblique_deg,
        fov=fov,
        hard=hard,
        small=small,
    )
    return case.image, case.label


_DIRS = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
    + [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)],
    dtype=float,
)
_DIRS /= np.linalg.norm(_DIRS, axis=1, keepdims=True)


def _place_lesion(anat: _Anatomy, grid: _Grid, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Centre of a lesion of ``radius`` mm fully inside the liver, away from the gallbladder, inside the grid."""
    liver, body = anat.organs["liver"], anat.body
    ainv = np.linalg.inv(grid.affine)
    best, best_score = None, np.inf
    for _ in range(400):
        u = rng.normal(size=3)
        u *= rng.random() ** (1.0 / 3.0) * 0.85 / (np.linalg.norm(u) + 1e-9)
        c = liver.center + liver.rot @ (u * liver.radii)
        pts = np.vstack([c, c + (radius + 2.0) * _DIRS])
        score = float(liver.distance(*liver.local_points(pts)).max())
        score = max(score, float(body.distance(*body.local_points(pts)).max()) + anat.wall)
        if anat.gallbladder is not None:
            score = max(score, -float(anat.gallbladder.distance(*anat.gallbladder.local_points(pts)).min()))
        idx = ainv @ (c - grid.origin)
        margin = radius / grid.spacing + 1.0
        if np.any(idx < margin) or np.any(idx > grid.size - 1 - margin):
            continue
        if score < -1.0:
            return c
        if score < best_score:
            best, best_score = c, score
    if best is None:  # liver not in view: put the lesion at the liver point closest to the grid centre
        centre = grid.origin + grid.affine @ ((grid.size - 1) / 2.0)
        best = liver.center + 0.3 * (centre - liver.center)
    return best


def _lesion_setup(seed, size, spacing, orientation, oblique_deg, small):
    _, hard = _default_flags(seed)
    code, angle = _resolve_orientation(seed, orientation, oblique_deg)
    direction = orientation_direction(code, angle)
    anat = _make_anatomy(seed, hard)
    grid, acq = _plan_grid(
        anat, seed, profile="cls", mode="full", small=small, size=size, spacing=spacing, direction=direction
    )
    return anat, grid, acq, (code, angle, hard)


def lesion_acquisition(
    seed: int,
    *,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    oblique_deg: float = 0.0,
    small: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """The acquisition of :func:`make_lesion_phantom`'s case with these arguments (others are ignored): noise level
    ``noise_hu`` and in-plane correlation ``noise_corr``, blur, and ``perm`` (the physical axis of each array
    axis), as :func:`noise_power` takes it."""
    return _lesion_setup(seed, size, spacing, orientation, oblique_deg, small)[2]


def lesion_phantom_liver(
    seed: int,
    *,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    oblique_deg: float = 0.0,
    small: bool = False,
    **_: Any,
) -> sitk.Image:
    """Where :func:`make_lesion_phantom`'s case with these arguments (others are ignored) has liver: a 0/1 mask on
    the case's grid. Every lesion lies inside it."""
    anat, grid, acq, _ = _lesion_setup(seed, size, spacing, orientation, oblique_deg, small)
    _, lab, _ = _render(anat, grid, acq, seed)
    return _to_image((lab == SEG_LABELS["liver"]).astype(np.uint8), grid)


def make_lesion_phantom(
    seed: int,
    *,
    lesion: bool,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    lesion_radius_mm: float | None = None,
    lesion_contrast_hu: float | None = None,
    orientation: str | None = None,
    oblique_deg: float = 0.0,
    small: bool = False,
) -> tuple[sitk.Image, dict[str, Any]]:
    """Torso phantom for image-level classification (liver lesion or not).

    The "lesion" class has one ellipsoidal hypo- or hyperdense liver lesion unless radius and contrast are given:
    typical (equivalent radius 8-20 mm, 25-60 HU) or, in ``NEAR_LIMIT_FRACTION`` of the cases, near the detection
    limit (3-8 mm and 10-25 HU); "normal" has none but keeps the benign look-alikes (vessels, gallbladder).  The same
    seed gives the same torso, acquisition and noise with and without the lesion.  ``info`` holds ``class``,
    ``lesion_radius_mm``, ``contrast_hu`` (signed, HU added inside the lesion), ``centre`` (physical LPS mm or None)
    and ``lesion_voxels`` (voxel centres inside the lesion).
    """
    anat, grid, acq, (code, angle, hard) = _lesion_setup(seed, size, spacing, orientation, oblique_deg, small)
    rng = _rng(seed, 4)
    near_limit = bool(rng.random() < NEAR_LIMIT_FRACTION)
    (r_lo, r_hi), (c_lo, c_hi) = ((3.0, 8.0), (10.0, 25.0)) if near_limit else ((8.0, 20.0), (25.0, 60.0))
    radius = float(math.exp(rng.uniform(math.log(r_lo), math.log(r_hi))))
    contrast = float(rng.uniform(c_lo, c_hi)) * (-1.0 if rng.random() < 0.7 else 1.0)
    axes = np.exp(rng.normal(0.0, 0.12, size=3))
    axes /= np.prod(axes) ** (1.0 / 3.0)
    rot = _rotation(z=rng.uniform(-90, 90), y=rng.uniform(-90, 90), x=rng.uniform(-90, 90))
    if lesion_radius_mm is not None:
        radius = float(lesion_radius_mm)
    if lesion_contrast_hu is not None:
        contrast = float(lesion_contrast_hu)
    shape, centre = None, None
    if lesion:
        centre = _place_lesion(anat, grid, rng, radius * float(axes.max()))
        shape = _Shape(centre, radius * axes, rot)
    img, _, n_lesion = _render(anat, grid, acq, seed, lesion=shape, lesion_hu=contrast)
    info = {
        "class": "lesion" if lesion else "normal",
        "lesion_radius_mm": round(radius, 3) if lesion else 0.0,
        "contrast_hu": round(contrast, 2) if lesion else 0.0,
        "centre": [round(float(x), 3) for x in centre] if centre is not None else None,
        "lesion_voxels": n_lesion,
        "near_limit": near_limit if lesion and lesion_radius_mm is None and lesion_contrast_hu is None else None,
        "seed": int(seed),
        "orientation": code,
        "oblique_deg": angle,
        "hard": hard,
        "contrast": "enhanced" if anat.enhanced else "native",
        "noise_hu": round(float(acq["noise_hu"]), 2),
        **_geometry_info(grid),
    }
    return _to_image(img, grid), info


def _derive_seed(seed: int, stream: int, index: int) -> int:
    """Per-case seed: independent of the cohort size, so adding cases never changes existing ones."""
    return int(np.random.SeedSequence([int(seed), stream, int(index)]).generate_state(1)[0])


def cohort_plan(kind: str, n: int, seed: int = 0, n_labeled: int = 0) -> list[dict[str, Any]]:
    """Per-case ids and keyword arguments of a cohort: ``seg``, ``seg_heldout``, ``cls`` or ``cls_heldout``.

    Segmentation cohorts cycle header orientations (``ORIENTATION_CYCLE``), field-of-view cuts and hard cases by
    index so that even a few cases are diverse.  Classification cohorts are roughly, never exactly, balanced; the
    first ``n_labeled`` cases contain both classes when ``n_labeled >= 2``.
    """
    if kind not in _STREAMS:
        raise ValueError(f"kind must be one of {sorted(_STREAMS)}, got {kind!r}")
    stream = _STREAMS[kind]
    heldout = kind.endswith("heldout")
    plan: list[dict[str, Any]] = []
    if kind.startswith("seg"):
        for i in range(n):
            code, angle = ORIENTATION_CYCLE[i % len(ORIENTATION_CYCLE)]
            if angle:
                angle = angle if (i // len(ORIENTATION_CYCLE)) % 2 == 0 else -12.0
            plan.append(
                {
                    "id": f"phantom_heldout_{i:03d}" if heldout else f"phantom_{i:03d}",
                    "seed": _derive_seed(seed, stream, i),
                    "orientation": code,
                    "oblique_deg": angle,
                    "fov": _SEG_FOV_CYCLE[i % len(_SEG_FOV_CYCLE)],
                    "hard": i % 4 == 3,
                }
            )
        return plan
    rng = np.random.default_rng([int(seed), stream, 0xC1A55])
    n_lesion = n
    if n > 1:
        n_lesion = int(np.clip(round(n * rng.uniform(0.42, 0.58)), 1, n - 1))
        if 2 * n_lesion == n and n >= 4:
            n_lesion += 1 if rng.random() < 0.5 else -1
    is_lesion = np.array([True] * n_lesion + [False] * (n - n_lesion))
    rng.shuffle(is_lesion)
    k = min(n_labeled, n)
    if k >= 2 and len(set(is_lesion[:k].tolist())) == 1 and len(set(is_lesion.tolist())) == 2:
        j = k + int(np.argmax(is_lesion[k:] != is_lesion[0]))
        is_lesion[k - 1], is_lesion[j] = is_lesion[j], is_lesion[k - 1]
    for i in range(n):
        code, angle = ORIENTATION_CYCLE[i % len(ORIENTATION_CYCLE)]
        plan.append(
            {
                "id": f"lesion_heldout_{i:03d}" if heldout else f"lesion_{i:03d}",
                "seed": _derive_seed(seed, stream, i),
                "lesion": bool(is_lesion[i]),
                "orientation": code,
                "oblique_deg": angle,
            }
        )
    return plan


# ----------------------------------------------------------------------------------------------------------------
# sample data set
# ----------------------------------------------------------------------------------------------------------------
_MARKER = ".complete"
_TMP = ".tmp"


def _atomic_text(path: Path, text: str) -> None:
    """Write a text file via a temporary name in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _atomic_image(image: sitk.Image, path: Path, tmp_dir: Path) -> None:
    """Compressed NIfTI written under ``tmp_dir`` (same file system) then moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.getpid()}_{path.name}"
    sitk.WriteImage(image, str(tmp), True)
    os.replace(tmp, path)


def _run_task(task: dict[str, Any], tmp_dir: str) -> dict[str, Any]:
    """Render one case, write its files atomically and record its description (used to resume)."""
    tmp = Path(tmp_dir)
    kw = dict(task["kwargs"])
    if task["kind"] == "seg":
        case = phantom_case(**kw)
        _atomic_image(case.image, Path(task["image"]), tmp)
        _atomic_image(case.label, Path(task["label"]), tmp)
        for extra in task.get("copies", []):
            t = tmp / f"{os.getpid()}_copy_{Path(extra).name}"
            shutil.copyfile(task["label"], t)
            Path(extra).parent.mkdir(parents=True, exist_ok=True)
            os.replace(t, extra)
        meta = {"id": task["id"], **case.info}
    else:
        image, info = make_lesion_phantom(**kw)
        _atomic_image(image, Path(task["image"]), tmp)
        meta = {"id": task["id"], **info}
    _atomic_json(tmp / "meta" / f"{task['group']}__{task['id']}.json", meta)
    return meta


def _outputs(task: dict[str, Any]) -> list[str]:
    return [task["image"]] + ([task["label"]] if "label" in task else []) + list(task.get("copies", []))


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _readme(params: dict[str, Any], command: str, counts: dict[str, Any]) -> str:
    return f"""# LabelLoop synthetic sample data

Synthetic CT-like torso phantoms, generated (deterministically, seed {params["seed"]}) by
`labelloop_app.synthetic` so that the app, tests and benchmarks run without patient data.
Not real anatomy; not for any clinical use.

Made with:

    {command}

- `segmentation/`: {counts["n_seg"]} studies for the segmentation server (int16 HU, NIfTI);
  `segmentation/labels/final/` holds final labels of the first {counts["n_seg_labeled"]}.
- `segmentation_truth/`: ground truth of every study (not visible to the server) + `cases.json`
  (orientation, field of view, organ cut/absent status, contrast phase, noise per case).
- `segmentation_heldout/`: {counts["n_seg_heldout"]} held-out cases (images/, labels/, cases.json) for benchmarks.
- `labels.json`: organ label values ({", ".join(f"{k}={v}" for k, v in SEG_LABELS.items())}).
- `classification/`: {counts["n_cls"]} studies for liver lesion classification ({", ".join(CLASSES)});
  `classification_truth.json` has the class, lesion radius (mm), contrast (HU), centre and near-limit flag of each;
  `classification_labeled.json` the {counts["n_cls_labeled"]} cases whose class is known at the start, also
  stored as the server's class labels: `classification/labels/class/<id>.json` holding `{{"class": "<name>"}}`
  and the lesion as a finding, `"findings": [{{"centre_lps": [x, y, z], "radius_mm": r}}]` (`[]` when normal).
- `classification_heldout/`: {counts["n_cls_heldout"]} held-out images + `truth.json`.

Physical coordinates are LPS (SimpleITK/DICOM): the liver lies at negative x (patient right) whatever the
header orientation (RAS, LPS, LAS, oblique and permuted-axis headers occur on purpose).
"""


CLASS_LABEL_DIR = Path("classification", "labels", "class")
"""Where the labeled classification cases' class labels go: the server's label tag ``class`` (one JSON file per
image, ``{"class": "<name>"}``; the convention is described in ``labelloop_app.class_labels``)."""


def class_label_document(name: str, truth: dict[str, Any] | None) -> dict[str, Any]:
    """A class label as an annotator who marks what they label would write it: the class and, from the case's
    truth, its lesion as a finding (``[]`` for a case without one); no findings key when the truth is unknown."""
    doc: dict[str, Any] = {"class": name}
    if truth is not None:
        centre = truth.get("centre")
        doc["findings"] = [] if centre is None else [{"centre_lps": centre, "radius_mm": truth["lesion_radius_mm"]}]
    return doc


def _write_class_labels(out: Path, labeled: dict[str, str]) -> list[str]:
    """Class labels of the labeled classification cases, as the server reads them, with findings from
    ``classification_truth.json``; an existing file is kept (it may hold an annotator's correction). Returns their
    paths relative to ``out``."""
    truth_file = out / "classification_truth.json"
    truth = json.loads(truth_file.read_text()) if truth_file.is_file() else {}
    files = []
    for image_id, name in labeled.items():
        path = out / CLASS_LABEL_DIR / f"{image_id}.json"
        if not path.is_file():
            _atomic_json(path, class_label_document(name, truth.get(image_id)))
        files.append(str(path.relative_to(out)))
    return files


def _clean_stale(folder: Path, pattern: str, keep: set[str]) -> int:
    """Delete files of this generator's naming pattern that the current parameters do not produce."""
    removed = 0
    if folder.is_dir():
        for p in folder.glob(pattern):
            if p.is_file() and p.name not in keep:
                p.unlink()
                removed += 1
    return removed


def generate_sample_data(
    out_dir: str | Path,
    *,
    n_seg: int = 24,
    n_seg_labeled: int = 5,
    n_seg_heldout: int = 8,
    n_cls: int = 40,
    n_cls_labeled: int = 16,
    n_cls_heldout: int = 24,
    seed: int = 0,
    small: bool = False,
    progress: bool = True,
    workers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write the sample data set (segmentation + classification cohorts, truth, held-out sets) to ``out_dir``.

    Files are written atomically and a ``.complete`` marker records the parameters: a second call with the same
    parameters does nothing, an interrupted call resumes.  Files of this generator that the parameters no longer
    produce are removed (final labels only when the images changed).  Returns a summary of what was written.
    """
    counts = {
        "n_seg": n_seg,
        "n_seg_labeled": n_seg_labeled,
        "n_seg_heldout": n_seg_heldout,
        "n_cls": n_cls,
        "n_cls_labeled": n_cls_labeled,
        "n_cls_heldout": n_cls_heldout,
    }
    if min(counts.values()) < 0 or n_seg_labeled > n_seg or n_cls_labeled > n_cls:
        raise ValueError(f"invalid cohort sizes {counts}")
    params = {"version": GENERATOR_VERSION, "seed": int(seed), "small": bool(small), **counts}
    out = Path(out_dir)
    marker = out / _MARKER
    previous = None
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, ValueError):
            previous = None
    if not force and previous and previous.get("params") == params:
        summary = previous.get("summary", {})
        _write_class_labels(out, summary.get("classification", {}).get("labeled", {}))  # data made before they existed
        if all((out / f).is_file() for f in summary.get("files", [])):
            return {**summary, "out_dir": str(out), "skipped": True}

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / _TMP
    partial = tmp / "params.json"
    if tmp.is_dir() and (force or not partial.is_file() or json.loads(partial.read_text()) != params):
        shutil.rmtree(tmp)
    (tmp / "meta").mkdir(parents=True, exist_ok=True)
    _atomic_json(partial, params)
    if marker.exists():
        marker.unlink()

    seg = cohort_plan("seg", n_seg, seed)
    seg_ho = cohort_plan("seg_heldout", n_seg_heldout, seed)
    cls = cohort_plan("cls", n_cls, seed, n_labeled=n_cls_labeled)
    cls_ho = cohort_plan("cls_heldout", n_cls_heldout, seed)
    seg_dir, truth_dir = out / "segmentation", out / "segmentation_truth"
    final_dir = seg_dir / "labels" / "final"
    tasks: list[dict[str, Any]] = []
    for i, c in enumerate(seg):
        name = f"{c['id']}.nii.gz"
        task = {"group": "seg", "kind": "seg", "id": c["id"], "image": str(seg_dir / name)}
        task["label"] = str(truth_dir / name)
        task["copies"] = [str(final_dir / name)] if i < n_seg_labeled else []
        tasks.append(task)
    for c in seg_ho:
        name = f"{c['id']}.nii.gz"
        task = {"group": "seg_heldout", "kind": "seg", "id": c["id"]}
        task["image"] = str(out / "segmentation_heldout" / "images" / name)
        task["label"] = str(out / "segmentation_heldout" / "labels" / name)
        tasks.append(task)
    for group, plan, folder in (
        ("cls", cls, out / "classification"),
        ("cls_heldout", cls_ho, out / "classification_heldout" / "images"),
    ):
        for c in plan:
            tasks.append({"group": group, "kind": "cls", "id": c["id"], "image": str(folder / f"{c['id']}.nii.gz")})
    for task, c in zip(tasks, seg + seg_ho + cls + cls_ho):
        kwargs = {k: v for k, v in c.items() if k != "id"}
        task["kwargs"] = {**kwargs, "small": bool(small)}

    metas: dict[tuple[str, str], dict[str, Any]] = {}
    todo = []
    for task in tasks:
        meta_path = tmp / "meta" / f"{task['group']}__{task['id']}.json"
        if meta_path.is_file() and all(Path(p).is_file() for p in _outputs(task)):
            metas[(task["group"], task["id"])] = json.loads(meta_path.read_text())
        else:
            todo.append(task)
    n_workers = _default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="synthetic data", disable=not progress)
    try:
        if n_workers == 1 or len(todo) <= 1:
            for task in todo:
                metas[(task["group"], task["id"])] = _run_task(task, str(tmp))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork after SimpleITK/ITK threads started
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                futures = {pool.submit(_run_task, t, str(tmp)): t for t in todo}
                for fut in as_completed(futures):
                    t = futures[fut]
                    metas[(t["group"], t["id"])] = fut.result()
                    bar.update(1)
    finally:
        bar.close()

    def group_meta(group: str, plan: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {c["id"]: {k: v for k, v in metas[(group, c["id"])].items() if k != "id"} for c in plan}

    def truth(meta: dict[str, Any]) -> dict[str, Any]:
        keys = ("class", "lesion_radius_mm", "contrast_hu", "centre", "lesion_voxels", "near_limit")
        return {k: meta[k] for k in keys}

    cls_meta, cls_ho_meta = group_meta("cls", cls), group_meta("cls_heldout", cls_ho)
    _atomic_json(out / "labels.json", SEG_LABELS)
    _atomic_json(truth_dir / "cases.json", group_meta("seg", seg))
    _atomic_json(out / "segmentation_heldout" / "cases.json", group_meta("seg_heldout", seg_ho))
    _atomic_json(out / "classification_truth.json", {k: truth(v) for k, v in cls_meta.items()})
    labeled = {c["id"]: cls_meta[c["id"]]["class"] for c in cls[:n_cls_labeled]}
    _atomic_json(out / "classification_labeled.json", labeled)
    class_files = _write_class_labels(out, labeled)
    _atomic_json(out / "classification_heldout" / "truth.json", {k: truth(v) for k, v in cls_ho_meta.items()})

    images_changed = previous is None or any(
        previous.get("params", {}).get(k) != params[k] for k in ("version", "seed", "small")
    )
    seg_names = {f"{c['id']}.nii.gz" for c in seg}
    labeled_names = {f"{c['id']}.nii.gz" for c in seg[:n_seg_labeled]}
    removed = _clean_stale(seg_dir, "phantom_*.nii.gz", seg_names)
    removed += _clean_stale(truth_dir, "phantom_*.nii.gz", seg_names)
    removed += _clean_stale(final_dir, "phantom_*.nii.gz", labeled_names if images_changed else seg_names)
    ho_names = {f"{c['id']}.nii.gz" for c in seg_ho}
    for sub in ("images", "labels"):
        removed += _clean_stale(out / "segmentation_heldout" / sub, "phantom_heldout_*.nii.gz", ho_names)
    removed += _clean_stale(out / "classification", "lesion_*.nii.gz", {f"{c['id']}.nii.gz" for c in cls})
    class_keep = labeled if images_changed else [c["id"] for c in cls]
    removed += _clean_stale(out / CLASS_LABEL_DIR, "lesion_*.json", {f"{i}.json" for i in class_keep})
    removed += _clean_stale(
        out / "classification_heldout" / "images", "lesion_heldout_*.nii.gz", {f"{c['id']}.nii.gz" for c in cls_ho}
    )

    options = [f"--seed {seed}"] + (["--small"] if small else [])
    options += [f"--{k.replace('_', '-')} {v}" for k, v in counts.items()]
    command = "python -m labelloop_app.synthetic --out <out_dir> " + " ".join(options)
    _atomic_text(out / "README.md", _readme(params, command, counts))

    files = sorted(str(Path(p).relative_to(out)) for t in tasks for p in _outputs(t))
    files += [
        "labels.json",
        "README.md",
        "segmentation_truth/cases.json",
        "segmentation_heldout/cases.json",
        "classification_truth.json",
        "classification_labeled.json",
        "classification_heldout/truth.json",
        *class_files,
    ]
    n_bytes = sum((out / f).stat().st_size for f in files)
    class_counts = {name: sum(m["class"] == name for m in cls_meta.values()) for name in CLASSES}
    summary = {
        "params": params,
        "labels": dict(SEG_LABELS),
        "segmentation": {
            "studies": [c["id"] for c in seg],
            "labeled": [c["id"] for c in seg[:n_seg_labeled]],
            "heldout": [c["id"] for c in seg_ho],
        },
        "classification": {
            "studies": [c["id"] for c in cls],
            "labeled": labeled,
            "heldout": [c["id"] for c in cls_ho],
            "class_counts": class_counts,
        },
        "files": files,
        "bytes": int(n_bytes),
        "removed_stale": removed,
        "seconds": round(time.time() - start, 2),
    }
    _atomic_json(marker, {"params": params, "summary": summary})
    shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "out_dir": str(out), "skipped": False}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: generate the sample data set."""
    parser = argparse.ArgumentParser(
        prog="python -m labelloop_app.synthetic", description="Generate LabelLoop synthetic sample data."
    )
    parser.add_argument("--out", required=True, help="output folder (e.g. sample-data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny volumes (48-64 voxels per side) for fast tests")
    parser.add_argument("--n-seg", type=int, default=24)
    parser.add_argument("--n-seg-labeled", type=int, default=5)
    parser.add_argument("--n-seg-heldout", type=int, default=8)
    parser.add_argument("--n-cls", type=int, default=40)
    parser.add_argument("--n-cls-labeled", type=int, default=16)
    parser.add_argument("--n-cls-heldout", type=int, default=24)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs available, at most 4)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = generate_sample_data(
        args.out,
        n_seg=args.n_seg,
        n_seg_labeled=args.n_seg_labeled,
        n_seg_heldout=args.n_seg_heldout,
        n_cls=args.n_cls,
        n_cls_labeled=args.n_cls_labeled,
        n_cls_heldout=args.n_cls_heldout,
        seed=args.seed,
        small=args.small,
        progress=not args.no_progress,
        workers=args.workers,
        force=args.force,
    )
    if summary["skipped"]:
        logger.info("%s is already complete for these parameters; nothing to do", args.out)
    else:
        logger.info(
            "wrote %d files (%.1f MB) to %s in %.1f s",
            len(summary["files"]),
            summary["bytes"] / 1e6,
            args.out,
            summary["seconds"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
