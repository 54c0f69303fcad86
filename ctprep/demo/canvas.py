"""Shared pieces of the demo phantom: tissue codes, the painting canvas and the landmarks.

:mod:`ctprep.demo.phantom` (anatomy) and :mod:`ctprep.demo.findings` (pathologies) both paint
on a :class:`Canvas` of patient-frame points ``(u, v, t)`` with the codes of :class:`Tissue`;
the landmark helpers here (diaphragm, fissures, posterior lung surface) place both.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ctprep.demo.phantom import Phantom


class Tissue(IntEnum):
    """What each point is; ``tissue_at`` returns these codes (tests use them as masks)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    MEDIASTINUM = 3
    LUNG = 4
    VESSEL = 5
    AIRWAY = 6
    HEART = 7
    BLOOD = 8
    BONE = 9
    MARROW = 10
    ABDOMEN = 11
    LIVER = 12
    SPLEEN = 13
    STOMACH = 14
    ESOPHAGUS = 15
    EMPHYSEMA = 16
    EFFUSION = 17
    ATELECTASIS = 18
    CONSOLIDATION = 19
    OPACITY = 20
    FIBROSIS = 21
    PERICARDIAL = 22
    CALCIFICATION = 23
    NODE = 24
    HERNIA = 25
    NODULE = 26
    METAL = 27


#: Lobe codes returned with the tissue map; names as the reports use them.
LOBES = {1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "LLL"}
LOBE_CODE = {name: code for code, name in LOBES.items()}
#: Tissues a lung finding may replace (aerated lung and what runs through it).
LUNGISH = (Tissue.LUNG, Tissue.VESSEL, Tissue.EMPHYSEMA)


# --- canvas and landmarks -------------------------------------------------------------------------
class Canvas:
    """Points being painted, their HU/tissue/lobe, and the chunk's bounding box for pruning."""

    def __init__(self, P: np.ndarray) -> None:
        self.P = np.ascontiguousarray(P, dtype=np.float32)
        n = len(self.P)
        self.hu = np.full(n, -1000.0, dtype=np.float32)
        self.tissue = np.zeros(n, dtype=np.uint8)
        self.lobe = np.zeros(n, dtype=np.uint8)
        self.cols = [np.ascontiguousarray(self.P[:, i]) for i in range(3)]
        self.lo = [float(x.min()) if n else 0.0 for x in self.cols]
        self.hi = [float(x.max()) if n else 0.0 for x in self.cols]

    def near(self, lo, hi) -> np.ndarray | None:
        """Indices of points in the box [lo, hi], or None when the chunk cannot touch it.

        Chunks are a few slices thick, so most structures are skipped on the cheap z test.
        """
        lo, hi = [float(x) for x in lo], [float(x) for x in hi]
        if any(hi[i] < self.lo[i] or lo[i] > self.hi[i] for i in range(3)):
            return None
        m = None
        for i in range(3):  # 1D tests on contiguous columns; skip axes the chunk lies within
            if lo[i] <= self.lo[i] and hi[i] >= self.hi[i]:
                continue
            mi = (self.cols[i] >= lo[i]) & (self.cols[i] <= hi[i])
            m = mi if m is None else m & mi
        idx = np.arange(len(self.P)) if m is None else np.flatnonzero(m)
        return idx if idx.size else None

    def sphere(self, c, r) -> np.ndarray | None:
        c = np.asarray(c, np.float32)
        idx = self.near(c - r, c + r)
        if idx is None:
            return None
        keep = ((self.P[idx] - c) ** 2).sum(axis=1) <= r * r
        return idx[keep]

    def capsule(self, a, b, r) -> np.ndarray | None:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        idx = self.near(np.minimum(a, b) - r, np.maximum(a, b) + r)
        if idx is None:
            return None
        ab = b - a
        d = self.P[idx] - a
        s = np.clip(d @ ab / max(float(ab @ ab), 1e-6), 0.0, 1.0)
        keep = ((d - s[:, None] * ab) ** 2).sum(axis=1) <= r * r
        return idx[keep]

    def ellipsoid(self, c, axes, angle_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
        """Points inside an ellipsoid turned by ``angle_deg`` about t; returns (idx, radius²)."""
        c = np.asarray(c, np.float32)
        reach = float(max(axes[0], axes[1]))
        idx = self.near(c - [reach, reach, axes[2]], c + [reach, reach, axes[2]])
        if idx is None:
            return None
        d = self.P[idx] - c
        ca, sa = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
        x, y = d[:, 0] * ca + d[:, 1] * sa, -d[:, 0] * sa + d[:, 1] * ca
        q = (x / axes[0]) ** 2 + (y / axes[1]) ** 2 + (d[:, 2] / axes[2]) ** 2
        keep = q <= 1.0
        return idx[keep], q[keep]

    def paint(self, idx, hu, tissue: Tissue, only=None) -> None:
        if idx is None or not len(idx):
            return
        if only is not None:
            keep = np.isin(self.tissue[idx], np.asarray(only, dtype=np.uint8))
            idx = idx[keep]
            hu = hu if np.isscalar(hu) else np.asarray(hu)[keep]
        self.hu[idx] = hu
        self.tissue[idx] = tissue


def waves(P: np.ndarray, waves: list[list[float]]) -> np.ndarray:
    """Sum of plane waves ``amp * sin(k . p + phase)``: deterministic texture at any point."""
    out = np.zeros(len(P), dtype=np.float32)
    for ku, kv, kt, ph, amp in waves:
        out += np.float32(amp) * np.sin(P[:, 0] * ku + P[:, 1] * kv + P[:, 2] * kt + ph)
    return out


def derive(p: Phantom) -> dict:
    """Landmarks that follow from the parameters (never stored, so JSON stays minimal)."""
    a, b = p.body_axes
    ca, cb = a - p.fat_mm - p.muscle_mm, b - p.fat_mm - p.muscle_mm  # thoracic cavity
    gap, H = p.mediastinum_mm, p.lung_height
    lra = (ca - gap) / 2.0
    g = {"ca": ca, "cb": cb, "lra": lra, "lc": gap + lra, "lv": -0.05 * cb, "lrb": 0.95 * cb}
    vr = p.vertebra_radius
    g["spine_v"] = -cb + vr + 6.0
    g["v_tr"] = g["spine_v"] + vr + 26.0
    g["v_oes"] = g["v_tr"] - p.trachea_radius - 9.0
    tc = p.carina_t
    g["carina"] = [0.0, g["v_tr"], tc]
    g["hila"] = {1: [gap + 14.0, g["v_tr"] - 10.0, tc + 20.0], -1: [-(gap + 14.0), g["v_tr"] - 8.0, tc + 30.0]}
    # Heart: sits on the diaphragm behind the sternum, shifted to the patient's left (-u).
    cm = next((x for x in p.pathologies if x["kind"] == "cardiomegaly"), None)
    scale = cm["scale"] if cm else 1.0
    h = p.heart
    # An enlarged heart grows mostly in-plane (that is what the cardiothoracic ratio measures).
    ax = [h["axes"][0] * scale, h["axes"][1] * scale, h["axes"][2] * (1.0 + 0.4 * (scale - 1.0))]
    al = np.radians(h["angle_deg"])
    ext_v = float(np.hypot(ax[0] * np.sin(al), ax[1] * np.cos(al)))
    g["heart_center"] = [-h["offset_left_mm"], cb - ext_v - h["front_gap_mm"], H - p.dome_mm - 0.55 * ax[2]]
    g["heart_axes"] = ax
    g["heart_width"] = 2.0 * float(np.hypot(ax[0] * np.cos(al), ax[1] * np.sin(al)))
    # Aorta: ascending (right-anterior), arch over the left main bronchus, descending left of
    # the spine. The arch is a quadratic Bezier so it passes left of the trachea.
    ra, hc = p.aorta_radius, g["heart_center"]
    t_arch = tc - 25.0
    a0 = [10.0, hc[1] + 10.0, hc[2] - 0.6 * ax[2]]
    a1 = [10.0, g["v_tr"] + p.trachea_radius + ra + 6.0, t_arch]
    ctrl = [-(p.trachea_radius + ra + 20.0), g["v_tr"] + 8.0, t_arch - 35.0]
    d0 = [-(vr + 0.8 * ra + 4.0), g["spine_v"] + 0.5 * vr, t_arch]
    arch = [[(1 - s) ** 2 * a1[i] + 2 * s * (1 - s) * ctrl[i] + s**2 * d0[i] for i in range(3)]
            for s in np.linspace(0, 1, 7)]
    segs = [(a0, a1, ra)] + [(arch[i], arch[i + 1], ra) for i in range(6)]
    segs.append((d0, [d0[0], d0[1], H + 600.0], 0.8 * ra))
    g["aorta"] = segs
    g["t_arch"] = t_arch
    # Pulmonary trunk to the hila (under the arch, in front of the carina).
    p1 = [-12.0, g["v_tr"] + 14.0, tc + 8.0]
    p0 = [hc[0] * 0.3 - 5.0, hc[1] + 0.5 * ax[1], hc[2] - 0.7 * ax[2]]
    g["pa"] = [(p0, p1, 0.8 * ra), (p1, g["hila"][1], 0.6 * ra), (p1, g["hila"][-1], 0.6 * ra)]
    # Airways: trachea to the carina, main bronchi to the hila, two lobar bronchi each side.
    hr, hl = g["hila"][1], g["hila"][-1]
    g["airways"] = [
        ([0.0, g["v_tr"], -400.0], g["carina"], p.trachea_radius),
        (g["carina"], hr, 6.5),
        (g["carina"], hl, 5.5),
        (hr, [hr[0] + 25.0, hr[1] + 5.0, hr[2] - 35.0], 4.0),
        (hr, [hr[0] + 20.0, hr[1] - 25.0, hr[2] + 45.0], 4.0),
        (hl, [hl[0] - 25.0, hl[1] + 8.0, hl[2] - 30.0], 4.0),
        (hl, [hl[0] - 20.0, hl[1] - 25.0, hl[2] + 45.0], 4.0),
    ]
    return g


def t_diaphragm(p: Phantom, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Depth of the diaphragm under (u, v): one dome, the right side higher, recesses behind."""
    g = p._geo
    q = np.minimum((u / g["ca"]) ** 2 + (v / g["cb"]) ** 2, 1.0)
    right_up = 14.0 * np.clip(u / 40.0 + 0.5, 0.0, 1.0)  # the liver pushes the right dome up
    return p.lung_height - right_up - p.dome_mm * (1.0 - q) + 15.0 * np.clip(-v / g["cb"], 0.0, 1.0)


def oblique_fissure_t(p: Phantom, v: np.ndarray) -> np.ndarray:
    """Depth of the major fissure at ``v``: high at the back, reaching the base in front."""
    g, H = p._geo, p.lung_height
    return H * (0.3 + 0.65 * (v - g["lv"] + g["lrb"]) / (2.0 * g["lrb"]))


def horizontal_fissure_t(p: Phantom) -> float:
    return 0.5 * p.lung_height


def lung_back_v(p: Phantom, side: int, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``v`` of the posterior lung surface at (u, t) on ``side`` (+1 right, -1 left)."""
    g = p._geo
    taper = np.sqrt(np.clip(t / p.apex_mm, 1e-3, 1.0))
    x = (u - side * g["lc"]) / (g["lra"] * taper)
    lung = g["lv"] - g["lrb"] * taper * np.sqrt(np.clip(1.0 - x * x, 0.0, 1.0))
    cav = -(g["cb"] - 1.0) * np.sqrt(np.clip(1.0 - (u / (g["ca"] - 1.0)) ** 2, 0.0, 1.0))
    return np.maximum(lung, cav)
