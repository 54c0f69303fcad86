"""An analytic chest phantom: noise-free HU at any physical (RAS) point.

The phantom lives in a patient frame ``(u, v, t)`` in mm: ``u`` towards the patient's right
(RAS +x), ``v`` anterior (RAS +y) and ``t`` the depth below the lung apices (RAS -z), centred on
the patient's axial centre. Every structure is a closed-form region (ellipses, ellipsoids,
capsules, fissure planes), so a volume can be rendered on any grid, and a test can re-render it
from the JSON in ``demo_truth.csv`` to check the geometry of a stored file.

Anatomy comes from :func:`sample_anatomy` (per patient); :func:`sample_findings` adds the findings
of a scan as plain dicts in ``Phantom.pathologies`` (painted by :func:`paint_findings`). Lobes are
bounded by the fissure planes, so a finding can be put in a named lobe and reported as such.

Sections: tissue codes and the phantom type; the painting canvas; anatomy; findings; sampling.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


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


@dataclass
class Phantom:
    """Patient parameters (mm, HU) and findings; everything needed to re-render a scan.

    Derived landmarks are computed once at construction: change a phantom with :meth:`replace`,
    never by assigning to a field.
    """

    center_ras: list[float]  # [x, y] RAS of the patient's axial centre
    z_apex: float  # RAS z of the lung apices
    body_axes: list[float]  # skin ellipse semi-axes [right-left, anterior-posterior]
    fat_mm: float  # subcutaneous fat thickness
    muscle_mm: float  # chest wall muscle thickness (ribs and sternum sit in it)
    lung_height: float  # apex to costophrenic recess
    apex_mm: float  # height of the tapering apical dome
    dome_mm: float  # height of the diaphragm dome above the recesses
    mediastinum_mm: float  # half-width of the mediastinum between the lungs
    heart: dict  # {"offset_left_mm", "axes", "angle_deg", "front_gap_mm", "wall_mm"}
    trachea_radius: float
    carina_t: float  # depth of the carina below the apex
    aorta_radius: float
    vertebra_radius: float
    vertebra_phase: float  # where the disc spaces fall along t
    rib_drop: float  # how far a rib descends from its spine end to its front end
    texture: list[list[float]]  # lung texture waves [ku, kv, kt, phase, amplitude]
    vessels: list[list[float]] = field(default_factory=list)  # [u0, v0, t0, u1, v1, t1, radius]
    contrast: bool = False  # contrast-enhanced blood pool
    pathologies: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._geo = _derive(self)

    # --- serialisation --------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Phantom:
        return cls(**json.loads(text))

    def replace(self, **changes) -> Phantom:
        return dataclasses.replace(self, **changes)

    def finding(self, kind: str) -> dict | None:
        return next((p for p in self.pathologies if p["kind"] == kind), None)

    # --- frames ---------------------------------------------------------------------------
    def to_local(self, points_ras: np.ndarray) -> np.ndarray:
        """RAS (N, 3) -> patient frame (N, 3) float32 ``(u, v, t)``."""
        p = np.asarray(points_ras, dtype=np.float64)
        out = np.empty(p.shape, dtype=np.float32)
        out[:, 0] = p[:, 0] - self.center_ras[0]
        out[:, 1] = p[:, 1] - self.center_ras[1]
        out[:, 2] = self.z_apex - p[:, 2]
        return out

    def to_ras(self, uvt) -> list[float]:
        u, v, t = (float(x) for x in uvt)
        return [u + self.center_ras[0], v + self.center_ras[1], self.z_apex - t]

    # --- rendering ------------------------------------------------------------------------
    def hu_at(self, points_ras: np.ndarray) -> np.ndarray:
        """Noise-free HU (N,) float32 at RAS points (N, 3)."""
        return self.paint_local(self.to_local(points_ras))[0]

    def tissue_at(self, points_ras: np.ndarray) -> np.ndarray:
        """:class:`Tissue` codes (N,) uint8 at RAS points (N, 3)."""
        return self.paint_local(self.to_local(points_ras))[1]

    def paint_local(self, P: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hu, tissue, lobe) at patient-frame points, in chunks so memory stays flat."""
        outs = []
        for s in range(0, max(len(P), 1), chunk):
            c = _Canvas(P[s : s + chunk])
            if len(c.P):
                _paint_anatomy(self, c)
            outs.append((c.hu, c.tissue, c.lobe))
        return tuple(np.concatenate(x) for x in zip(*outs))  # type: ignore[return-value]


# --- geometry helpers -------------------------------------------------------------------------
class _Canvas:
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


def _waves(P: np.ndarray, waves: list[list[float]]) -> np.ndarray:
    """Sum of plane waves ``amp * sin(k . p + phase)``: deterministic texture at any point."""
    out = np.zeros(len(P), dtype=np.float32)
    for ku, kv, kt, ph, amp in waves:
        out += np.float32(amp) * np.sin(P[:, 0] * ku + P[:, 1] * kv + P[:, 2] * kt + ph)
    return out


def _derive(p: Phantom) -> dict:
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


# --- anatomy ----------------------------------------------------------------------------------
def _paint_anatomy(p: Phantom, c: _Canvas) -> None:
    g, H = p._geo, p.lung_height
    u, v, t = c.P[:, 0], c.P[:, 1], c.P[:, 2]
    a, b = p.body_axes
    ca, cb = g["ca"], g["cb"]
    # Body layers: skin ellipse -> fat, inner ellipse -> muscle, cavity -> mediastinal fat.
    e_body = (u / a) ** 2 + (v / b) ** 2
    c.paint(np.flatnonzero(e_body <= 1.0), -100.0, Tissue.FAT)
    inner = (u / (a - p.fat_mm)) ** 2 + (v / (b - p.fat_mm)) ** 2 <= 1.0
    c.paint(np.flatnonzero(inner), 45.0, Tissue.MUSCLE)
    cav = np.flatnonzero((u / ca) ** 2 + (v / cb) ** 2 <= 1.0)
    c.paint(cav, -90.0, Tissue.MEDIASTINUM)
    # Below the diaphragm: upper abdomen (liver right, stomach and spleen left).
    tdia = t_diaphragm(p, u[cav], v[cav])
    abd = cav[t[cav] >= tdia]
    c.paint(abd, 35.0, Tissue.ABDOMEN)
    c.paint(abd[u[abd] > -0.25 * ca], 58.0, Tissue.LIVER)
    top_l = H - p.dome_mm
    sp = c.ellipsoid([-0.7 * ca, -0.45 * cb, top_l + 60.0], [30.0, 0.4 * cb, 50.0])
    if sp is not None:
        c.paint(sp[0], 45.0, Tissue.SPLEEN, only=[Tissue.ABDOMEN])
    st_c = [-0.45 * ca, 0.2 * cb, top_l + 40.0]
    st = c.ellipsoid(st_c, [40.0, 0.4 * cb, 45.0])
    if st is not None:
        idx = st[0]
        c.paint(idx, np.where(t[idx] < st_c[2] - 25.0, -1000.0, 25.0), Tissue.STOMACH, only=[Tissue.ABDOMEN])
    # Lungs: two ellipses clipped by the cavity, tapering into the apices, above the diaphragm.
    chest = cav[(t[cav] > 0.0) & (t[cav] < tdia)]
    if chest.size:
        _paint_lungs(p, c, chest)
    for x in p.vessels:
        a_, b_, r = x[:3], x[3:6], x[6]
        c.paint(c.capsule(a_, b_, r), 35.0, Tissue.VESSEL, only=[Tissue.LUNG])
    paint_findings(p, c, "lung")
    # Mediastinum: oesophagus, pericardium, heart, great vessels, airways.
    c.paint(c.capsule([-6.0, g["v_oes"], -400.0], [-6.0, g["v_oes"], H - p.dome_mm + 10.0], 7.0), 40.0, Tissue.ESOPHAGUS)
    blood = 230.0 if p.contrast else 42.0
    paint_findings(p, c, "pericardium")
    hc, hax = g["heart_center"], g["heart_axes"]
    heart = c.ellipsoid(hc, hax, p.heart["angle_deg"])
    if heart is not None:
        idx, q = heart
        # The heart rests on the diaphragm: clip what would dip below it.
        keep = t[idx] < t_diaphragm(p, u[idx], v[idx]) + 3.0
        idx, q = idx[keep], q[keep]
        wall = p.heart["wall_mm"] / min(hax)
        pool = q <= (1.0 - wall) ** 2
        c.paint(idx[~pool], 38.0, Tissue.HEART)
        c.paint(idx[pool], blood, Tissue.BLOOD)
    for a_, b_, r in g["aorta"] + g["pa"]:
        c.paint(c.capsule(a_, b_, r), blood, Tissue.BLOOD)
    paint_findings(p, c, "mediastinum")
    for a_, b_, r in g["airways"][:1]:  # tracheal wall, then the lumen
        c.paint(c.capsule(a_, b_, r + 2.0), 50.0, Tissue.MUSCLE)
    for a_, b_, r in g["airways"]:
        c.paint(c.capsule(a_, b_, r), -1000.0, Tissue.AIRWAY)
    _paint_bones(p, c)
    paint_findings(p, c, "late")


def _paint_lungs(p: Phantom, c: _Canvas, idx: np.ndarray) -> None:
    g, H = p._geo, p.lung_height
    u, v, t = c.P[idx, 0], c.P[idx, 1], c.P[idx, 2]
    taper = np.sqrt(np.clip(t / p.apex_mm, 1e-3, 1.0))
    for side in (1, -1):
        q = ((u - side * g["lc"]) / (g["lra"] * taper)) ** 2 + ((v - g["lv"]) / (g["lrb"] * taper)) ** 2
        inside = q <= 1.0
        sel, us, vs, ts = idx[inside], u[inside], v[inside], t[inside]
        if not sel.size:
            continue
        lower = ts > oblique_fissure_t(p, vs)
        if side == 1:
            lobe = np.where(lower, 3, np.where(ts > horizontal_fissure_t(p), 2, 1))
        else:
            lobe = np.where(lower, 5, 4)
        # Dependent (posterior) lung is denser; waves give a little parenchymal texture.
        hu = -865.0 + 45.0 * np.clip(-(vs - g["lv"]) / g["lrb"], 0.0, 1.0) + _waves(c.P[sel], p.texture)
        slope = 0.65 * H / (2.0 * g["lrb"])
        fis = np.abs(ts - oblique_fissure_t(p, vs)) / np.sqrt(1.0 + slope * slope) < 0.8
        if side == 1:
            fis |= ~lower & (np.abs(ts - horizontal_fissure_t(p)) < 0.8)
        hu = np.where(fis, -720.0, hu)
        c.paint(sel, hu, Tissue.LUNG)
        c.lobe[sel] = lobe


def _paint_bones(p: Phantom, c: _Canvas) -> None:
    g, H = p._geo, p.lung_height
    vr, sv = p.vertebra_radius, g["spine_v"]
    # Vertebral bodies (cortex over marrow) with disc spaces every 30 mm, posterior arch, process.
    idx = c.near([-1.2 * vr, sv - vr - 45.0, -500.0], [1.2 * vr, sv + vr, 5000.0])
    if idx is not None:
        u, v, t = c.P[idx, 0], c.P[idx, 1], c.P[idx, 2]
        q = (u / (1.15 * vr)) ** 2 + ((v - sv) / vr) ** 2
        disc = np.mod(t - p.vertebra_phase, 30.0) < 6.0
        body = q <= 1.0
        marrow = q <= (1.0 - 2.5 / vr) ** 2
        c.paint(idx[body & disc], 90.0, Tissue.MUSCLE)
        c.paint(idx[body & ~disc & ~marrow], 700.0, Tissue.BONE)
        c.paint(idx[body & ~disc & marrow], 250.0, Tissue.MARROW)
        cv = sv - vr - 8.0  # spinal canal centre
        rc = np.hypot(u, v - cv)
        c.paint(idx[(rc >= 7.0) & (rc <= 12.0) & (v < sv - vr + 2.0)], 600.0, Tissue.BONE)
        c.paint(idx[(rc < 7.0)], 15.0, Tissue.MUSCLE)
        c.paint(idx[(np.abs(u) < 4.0) & (v < cv - 10.0) & (v > cv - 40.0)], 550.0, Tissue.BONE)
    _paint_ribs(p, c)
    # Sternum, in the anterior chest wall.
    vs = g["cb"] + 0.45 * p.muscle_mm
    st = c.near([-15.0, vs - 6.0, 0.2 * H], [15.0, vs + 6.0, 0.85 * H])
    if st is not None:
        inner = (np.abs(c.P[st, 0]) < 11.0) & (np.abs(c.P[st, 1] - vs) < 3.5)
        c.paint(st[~inner], 550.0, Tissue.BONE)
        c.paint(st[inner], 200.0, Tissue.MARROW)


def _paint_ribs(p: Phantom, c: _Canvas) -> None:
    """Twelve rib pairs: rings in the chest wall that drop from the spine towards the front."""
    g, H = p._geo, p.lung_height
    ra, rb = g["ca"] + 0.5 * p.muscle_mm, g["cb"] + 0.5 * p.muscle_mm
    idx = c.near([-ra - 8.0, -rb - 8.0, -20.0], [ra + 8.0, rb + 8.0, H + 60.0])
    if idx is None:
        return
    u, v, t = c.P[idx, 0], c.P[idx, 1], c.P[idx, 2]
    e = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
    near_ring = np.abs(e - 1.0) * np.sqrt(ra * rb) < 5.0
    idx, u, v, t, e = idx[near_ring], u[near_ring], v[near_ring], t[near_ring], e[near_ring]
    sin_phi = (v / rb) / np.maximum(e, 1e-6)
    front = p.rib_drop * (1.0 + sin_phi) / 2.0
    pitch, t0 = (H + 20.0) / 11.0, -10.0
    k = np.rint((t - t0 - front) / pitch)
    dt = t - (t0 + front + k * pitch)
    radial = (e - 1.0) * np.sqrt(ra * rb)
    cartilage = (sin_phi > 0.0) & (np.abs(u) < 0.3 * ra)
    spine = (v < 0.0) & (np.abs(u) < p.vertebra_radius + 10.0)
    rib = (k >= 0) & (k <= 11) & (np.abs(dt) < 5.0) & ~cartilage & ~spine
    marrow = rib & (np.abs(dt) < 3.0) & (np.abs(radial) < 3.0)
    c.paint(idx[rib & ~marrow], 500.0, Tissue.BONE)
    c.paint(idx[marrow], 200.0, Tissue.MARROW)


# --- findings ---------------------------------------------------------------------------------
def paint_findings(p: Phantom, c: _Canvas, stage: str) -> None:
    """Paint the findings that belong to ``stage`` (painting order decides what covers what)."""
    for f in p.pathologies:
        fn = _FINDINGS.get((stage, f["kind"]))
        if fn is not None:
            fn(p, c, f)


def _side_code(side: str) -> int:
    return 1 if side == "right" else -1


def _lobes_of(side: int) -> tuple[int, ...]:
    return (1, 2, 3) if side == 1 else (4, 5)


def effusion_thickness(p: Phantom, side: str, t: np.ndarray) -> np.ndarray:
    """Vertical depth of dependent pleural fluid at depth ``t``: grows towards the base."""
    f = p.finding("effusion")
    T = (f or {}).get("thickness_mm", {}).get(side, 0.0)
    return T * np.clip((t - (p.lung_height - 120.0)) / 100.0, 0.0, 1.0)


def _lung_idx(c: _Canvas, lobes, extra=()) -> np.ndarray:
    ok = np.isin(c.tissue, np.asarray(LUNGISH + tuple(extra), np.uint8)) & np.isin(c.lobe, lobes)
    return np.flatnonzero(ok)


def _emphysema(p, c, f):
    """Low-attenuation holes where a random-wave field peaks, mostly in the upper lungs."""
    idx = _lung_idx(c, (1, 2, 3, 4, 5))
    idx = idx[c.P[idx, 2] < f["t_limit"]]
    field_ = _waves(c.P[idx], f["waves"]) / np.float32(np.sqrt(len(f["waves"]) / 2.0))  # ~ N(0, 1)
    thr = f["threshold"] + 1.5 * c.P[idx, 2] / f["t_limit"]  # fewer holes towards the bases
    c.paint(idx[field_ > thr], -975.0, Tissue.EMPHYSEMA, only=[Tissue.LUNG])


def _mosaic(p, c, f):
    idx = _lung_idx(c, (1, 2, 3, 4, 5))
    c.hu[idx] += f["amplitude"] * np.tanh(3.0 * _waves(c.P[idx], f["waves"]))


def _effusion(p, c, f):
    for side, T in f["thickness_mm"].items():
        s = _side_code(side)
        idx = _lung_idx(c, _lobes_of(s), (Tissue.ATELECTASIS,))
        u, v, t = c.P[idx].T
        fluid = v - lung_back_v(p, s, u, t) < effusion_thickness(p, side, t)
        c.paint(idx[fluid], 15.0, Tissue.EFFUSION)


def _atelectasis(p, c, f):
    s = _side_code(f["side"])
    idx = _lung_idx(c, (LOBE_CODE[f["lobe"]],))
    u, v, t = c.P[idx].T
    base = effusion_thickness(p, f["side"], t)
    depth = v - lung_back_v(p, s, u, t)
    band = (t >= f["t_range"][0]) & (t <= f["t_range"][1]) & (depth < base + f["thickness_mm"])
    c.paint(idx[band], 35.0, Tissue.ATELECTASIS)


def _focal(tissue: Tissue, hu: float):
    def paint(p, c, f):
        idx = c.sphere(f["center"], f["radius_mm"])
        if idx is not None:
            idx = idx[np.isin(c.lobe[idx], [LOBE_CODE[f["lobe"]]])]
            c.paint(idx, hu, tissue, only=LUNGISH)
        for band in f.get("bronchograms", []):
            c.paint(c.capsule(band[:3], band[3:], f["bronchogram_radius_mm"]), -920.0, Tissue.AIRWAY, only=[tissue])
    return paint


def _fibrosis(p, c, f):
    for band in f["bands"]:
        idx = c.capsule(band[:3], band[3:], f["radius_mm"])
        if idx is not None:
            c.paint(idx[c.lobe[idx] == LOBE_CODE[f["lobe"]]], -60.0, Tissue.FIBROSIS, only=LUNGISH)


def _pericardial(p, c, f):
    g, T = p._geo, f["thickness_mm"]
    rim = c.ellipsoid(g["heart_center"], [x + T for x in g["heart_axes"]], p.heart["angle_deg"])
    if rim is not None:
        idx = rim[0]
        idx = idx[c.P[idx, 2] < t_diaphragm(p, c.P[idx, 0], c.P[idx, 1]) + 3.0]
        c.paint(idx, 12.0, Tissue.PERICARDIAL)


def _nodes(p, c, f):
    for n in f["nodes"]:
        e = c.ellipsoid(n["center"], n["axes"])
        c.paint(None if e is None else e[0], 42.0, Tissue.NODE)


def _hernia(p, c, f):
    e = c.ellipsoid(f["center"], f["axes"])
    if e is not None:
        idx = e[0]
        gas = c.P[idx, 2] < f["center"][2] - 0.35 * f["axes"][2]
        c.paint(idx, np.where(gas, -1000.0, 30.0), Tissue.HERNIA)


def _spheres(tissue: Tissue, hu: float, key: str = "plaques"):
    def paint(p, c, f):
        for centre in f[key]:
            c.paint(c.sphere(centre, f["radius_mm"]), hu, tissue)
    return paint


def _nodule(p, c, f):
    c.paint(c.sphere(f["center"], f["diameter_mm"] / 2.0), f["hu"], Tissue.NODULE)


def _material(p, c, f):
    for part in f["parts"]:
        if part["shape"] == "ellipsoid":
            e = c.ellipsoid(part["center"], part["axes"])
            c.paint(None if e is None else e[0], 3000.0, Tissue.METAL)
        else:
            c.paint(c.capsule(part["a"], part["b"], part["radius_mm"]), 3000.0, Tissue.METAL)


_FINDINGS = {
    ("lung", "mosaic"): _mosaic,
    ("lung", "emphysema"): _emphysema,
    ("lung", "atelectasis"): _atelectasis,
    ("lung", "effusion"): _effusion,
    ("lung", "consolidation"): _focal(Tissue.CONSOLIDATION, 28.0),
    ("lung", "opacity"): _focal(Tissue.OPACITY, -560.0),
    ("lung", "fibrosis"): _fibrosis,
    ("pericardium", "pericardial_effusion"): _pericardial,
    ("mediastinum", "lymphadenopathy"): _nodes,
    ("mediastinum", "hiatal_hernia"): _hernia,
    ("late", "aortic_calcification"): _spheres(Tissue.CALCIFICATION, 650.0),
    ("late", "coronary_calcification"): _spheres(Tissue.CALCIFICATION, 550.0),
    ("late", "nodule"): _nodule,
    ("late", "medical_material"): _material,
}


# --- sampling -----------------------------------------------------------------------------------
def sample_anatomy(rng: np.random.Generator, max_lung_height: float = 250.0) -> Phantom:
    """A patient's anatomy (no findings, centred at the origin, apex at z=0)."""

    def U(lo, hi):
        return round(float(rng.uniform(lo, hi)), 2)

    b = U(105.0, 130.0)
    H = round(min(U(195.0, 250.0), max(max_lung_height, 80.0)), 2)
    waves = []
    for _ in range(4):
        k = rng.normal(size=3)
        k *= 2.0 * np.pi / rng.uniform(12.0, 35.0) / np.linalg.norm(k)
        waves.append([round(float(x), 5) for x in k] + [U(0, 2 * np.pi), U(6.0, 10.0)])
    a, fat, muscle = U(140.0, 175.0), U(8.0, 0.2 * b), U(12.0, 18.0)
    ha = U(0.40, 0.46) * (a - fat - muscle)  # heart half-width: a cardiothoracic ratio of ~0.4-0.45
    p = Phantom(
        center_ras=[0.0, 0.0],
        z_apex=0.0,
        body_axes=[a, b],
        fat_mm=fat,
        muscle_mm=muscle,
        lung_height=H,
        apex_mm=round(0.2 * H, 2),
        dome_mm=round(0.25 * H, 2),
        mediastinum_mm=U(20.0, 28.0),
        heart={"offset_left_mm": U(15.0, 28.0), "axes": [round(ha, 2), round(ha * U(0.75, 0.85), 2), U(45.0, 52.0)],
               "angle_deg": U(20.0, 40.0), "front_gap_mm": U(4.0, 10.0), "wall_mm": 9.0},
        trachea_radius=U(8.0, 11.0),
        carina_t=round(0.42 * H + float(rng.uniform(-8, 8)), 2),
        aorta_radius=U(12.0, 16.0),
        vertebra_radius=U(16.0, 20.0),
        vertebra_phase=U(0.0, 30.0),
        rib_drop=U(70.0, 100.0),
        texture=waves,
    )
    return p.replace(vessels=_sample_vessels(p, rng))


def _sample_vessels(p: Phantom, rng: np.random.Generator, per_lung: int = 10) -> list[list[float]]:
    """Pulmonary vessels: capsules from each hilum to random points in that lung."""
    g = p._geo
    out = []
    for side in (1, -1):
        cand = np.column_stack([
            side * rng.uniform(g["lc"] - 0.3 * g["lra"], g["lc"] + 0.8 * g["lra"], 400),
            rng.uniform(-g["cb"], g["cb"], 400),
            rng.uniform(0.15 * p.lung_height, 0.95 * p.lung_height, 400),
        ]).astype(np.float32)
        ok = np.flatnonzero(p.paint_local(cand)[1] == Tissue.LUNG)[:per_lung]
        for end in cand[ok]:
            out.append([round(float(x), 2) for x in (*g["hila"][side], *end)] + [round(float(rng.uniform(2.5, 3.5)), 2)])
    return out


# --- placing findings ---------------------------------------------------------------------------
#: CT-RATE label -> finding kind drawn for it. The other three labels are never rendered (0).
KIND_OF_LABEL = {
    "Cardiomegaly": "cardiomegaly",
    "Pericardial effusion": "pericardial_effusion",
    "Pleural effusion": "effusion",
    "Atelectasis": "atelectasis",
    "Emphysema": "emphysema",
    "Mosaic attenuation pattern": "mosaic",
    "Consolidation": "consolidation",
    "Lung opacity": "opacity",
    "Pulmonary fibrotic sequela": "fibrosis",
    "Lung nodule": "nodule",
    "Arterial wall calcification": "aortic_calcification",
    "Coronary artery wall calcification": "coronary_calcification",
    "Lymphadenopathy": "lymphadenopathy",
    "Hiatal hernia": "hiatal_hernia",
    "Medical material": "medical_material",
}
#: Mediastinal lymph node stations the reports name.
STATIONS = ("right paratracheal", "subcarinal", "prevascular", "right hilar", "left hilar")


def sample_findings(p: Phantom, labels: list[str], rng: np.random.Generator, min_feature_mm: float) -> Phantom:
    """Add one finding per present label, in an order where later ones avoid earlier ones.

    ``min_feature_mm`` is half the diagonal of the coarsest voxel of the scan: every finding is at
    least that thick, so at least one voxel centre falls inside it and the label stays true.
    """
    d = float(min_feature_mm)
    kinds = {KIND_OF_LABEL[lab]: lab for lab in labels if lab in KIND_OF_LABEL}

    def U(lo, hi, nd=1):
        return round(float(rng.uniform(lo, max(lo, hi))), nd)

    def add(p_, finding):
        return p_.replace(pathologies=p_.pathologies + [{"label": kinds[finding["kind"]], **finding}])

    g, H = p._geo, p.lung_height
    for kind in [k for k in KIND_OF_LABEL.values() if k in kinds]:  # placement order
        if kind == "cardiomegaly":
            p = add(p, {"kind": kind, "scale": U(1.3, 1.4, 3)})
            p.pathologies[-1]["ctr"] = round(p._geo["heart_width"] / (2.0 * p._geo["ca"]), 2)
        elif kind == "pericardial_effusion":
            p = add(p, {"kind": kind, "thickness_mm": U(max(6.0, 2 * d), 18.0, 0)})
        elif kind == "effusion":
            sides = [("right",), ("left",), ("right", "left")][int(rng.choice(3, p=[0.35, 0.3, 0.35]))]
            p = add(p, {"kind": kind, "thickness_mm": {s: U(max(10.0, 2 * d + 4), 40.0, 0) for s in sides}})
        elif kind == "atelectasis":
            eff = p.finding("effusion")
            side = list(eff["thickness_mm"])[0] if eff else str(rng.choice(["right", "left"]))
            p = add(p, {"kind": kind, "side": side, "lobe": "RLL" if side == "right" else "LLL",
                        "thickness_mm": U(max(8.0, 2 * d + 2), 16.0, 0),
                        "t_range": [round(H - 90.0, 1), round(H - 10.0, 1)]})
        elif kind == "emphysema":
            p = add(p, {"kind": kind, "waves": _random_waves(rng, 8, 7.0, 14.0), "threshold": U(0.6, 1.0, 3),
                        "t_limit": round(U(0.55, 0.75, 3) * H, 1)})
        elif kind == "mosaic":
            p = add(p, {"kind": kind, "waves": _random_waves(rng, 2, 50.0, 90.0), "amplitude": U(45.0, 65.0)})
        elif kind in ("consolidation", "opacity"):
            r = U(max(15.0, 2 * d + 4), 35.0) if kind == "consolidation" else U(max(12.0, 2 * d + 3), 30.0)
            lobe, c = _place_in_lobe(p, rng, max(d + 1.0, 0.3 * r))
            f = {"kind": kind, "lobe": lobe, "center": c, "radius_mm": r}
            if kind == "consolidation":
                f["bronchogram_radius_mm"] = 2.5
                f["bronchograms"] = [c + [round(c[i] + 0.7 * r * x, 2) for i, x in enumerate(_unit(rng))] for _ in range(2)]
            p = add(p, f)
        elif kind == "fibrosis":
            lobe, c = _place_in_lobe(p, rng, d + 1.0)
            bands = []
            for _ in range(int(rng.integers(2, 4))):
                half = U(8.0, 18.0) * np.asarray(_unit(rng))
                bands.append([round(float(x), 2) for x in (*(np.asarray(c) - half), *(np.asarray(c) + half))])
            p = add(p, {"kind": kind, "lobe": lobe, "bands": bands, "radius_mm": round(max(2.5, 0.7 * d), 2)})
        elif kind == "nodule":
            for _ in range(int(rng.integers(1, 3))):
                diam = U(max(4.0, 2 * d + 1), 25.0, 0)
                lobe, c = _place_in_lobe(p, rng, diam / 2.0 + 0.5)
                p = add(p, {"kind": kind, "lobe": lobe, "center": c, "diameter_mm": diam, "hu": U(20.0, 45.0, 0)})
        elif kind == "aortic_calcification":
            p = add(p, {"kind": kind, "plaques": _aortic_plaques(p, rng), "radius_mm": round(max(3.0, d + 0.3), 2)})
        elif kind == "coronary_calcification":
            p = add(p, {"kind": kind, "plaques": _coronary_plaques(p, rng), "radius_mm": round(max(3.0, d + 0.3), 2)})
        elif kind == "lymphadenopathy":
            pos = {"right paratracheal": [p.trachea_radius + 14.0, g["v_tr"] + 4.0, p.carina_t - 30.0],
                   "subcarinal": [0.0, g["v_tr"] - 6.0, p.carina_t + 22.0],
                   "prevascular": [-6.0, g["v_tr"] + p.trachea_radius + 2 * p.aorta_radius + 16.0, g["t_arch"] + 5.0],
                   "right hilar": [g["hila"][1][0] + 8.0, g["hila"][1][1] + 12.0, g["hila"][1][2]],
                   "left hilar": [g["hila"][-1][0] - 8.0, g["hila"][-1][1] + 12.0, g["hila"][-1][2]]}
            nodes = []
            for st in sorted(rng.choice(len(STATIONS), int(rng.integers(1, 4)), replace=False)):
                s = U(max(12.0, 2 * d + 2), 24.0, 0)
                nodes.append({"station": STATIONS[st], "center": [round(x, 2) for x in pos[STATIONS[st]]],
                              "short_axis_mm": s, "axes": [s / 2, round(0.55 * s, 2), round(0.7 * s, 2)]})
            p = add(p, {"kind": kind, "nodes": nodes})
        elif kind == "hiatal_hernia":
            v = g["v_oes"] + 6.0
            t = float(t_diaphragm(p, np.float32(-8.0), np.float32(v))) - 18.0
            p = add(p, {"kind": kind, "center": [-8.0, round(v, 2), round(t, 2)], "axes": [24.0, 20.0, 26.0]})
        elif kind == "medical_material":
            p = add(p, _device(p, rng, d))
    return p


def _unit(rng: np.random.Generator) -> list[float]:
    x = rng.normal(size=3)
    return [float(v) for v in x / np.linalg.norm(x)]


def _random_waves(rng, n: int, lo: float, hi: float) -> list[list[float]]:
    return [[round(float(k) * 2 * np.pi / float(rng.uniform(lo, hi)), 5) for k in _unit(rng)]
            + [round(float(rng.uniform(0, 2 * np.pi)), 3), 1.0] for _ in range(n)]


def _place_in_lobe(p: Phantom, rng: np.random.Generator, margin: float) -> tuple[str, list[float]]:
    """A random lobe and a centre deep enough in it that a ball of ``margin`` stays in aerated lung."""
    g, H = p._geo, p.lung_height
    offsets = np.vstack([np.zeros(3), np.eye(3) * margin, -np.eye(3) * margin]).astype(np.float32)  # (7, 3)
    for lobe in rng.permutation(list(LOBES.values())):
        side = 1 if lobe.startswith("R") else -1
        n = 600
        cand = np.column_stack([side * rng.uniform(p.mediastinum_mm, g["ca"], n), rng.uniform(-g["cb"], g["cb"], n),
                                rng.uniform(0.05 * H, H, n)]).astype(np.float32)
        pts = (cand[:, None, :] + offsets[None]).reshape(-1, 3)
        _, tissue, lobes = p.paint_local(pts)
        ok = (np.isin(tissue, np.asarray(LUNGISH, np.uint8)) & (lobes == LOBE_CODE[lobe])).reshape(n, 7).all(axis=1)
        if ok.any():
            return str(lobe), [round(float(x), 2) for x in cand[np.argmax(ok)]]
    raise RuntimeError(f"no room for a finding of {margin:.1f} mm in any lobe")


def _aortic_plaques(p: Phantom, rng: np.random.Generator) -> list[list[float]]:
    """Plaques centred on the aortic wall of the arch and the thoracic descending aorta."""
    segs = p._geo["aorta"][1:]
    out = []
    for _ in range(int(rng.integers(3, 8))):
        i = int(rng.integers(0, len(segs)))
        a, b, r = np.asarray(segs[i][0]), np.asarray(segs[i][1]), segs[i][2]
        if i == len(segs) - 1:  # descending: stay in the chest
            b = np.array([a[0], a[1], p.lung_height - p.dome_mm])
        axis = (b - a) / np.linalg.norm(b - a)
        n = np.cross(axis, _unit(rng))
        pt = a + rng.uniform(0, 1) * (b - a) + r * n / np.linalg.norm(n)
        out.append([round(float(x), 2) for x in pt])
    return out


def _coronary_plaques(p: Phantom, rng: np.random.Generator) -> list[list[float]]:
    """Plaques on the upper (atrioventricular groove) surface of the heart ellipsoid."""
    g = p._geo
    al = np.radians(p.heart["angle_deg"])
    out = []
    for _ in range(int(rng.integers(2, 5))):
        d = np.array([rng.uniform(-1, 1), rng.uniform(0.2, 1.0), rng.uniform(-0.8, -0.3)])
        d /= np.sqrt(((d / g["heart_axes"]) ** 2).sum())  # onto the surface (heart frame)
        du, dv = d[0] * np.cos(al) - d[1] * np.sin(al), d[0] * np.sin(al) + d[1] * np.cos(al)
        hc = g["heart_center"]
        out.append([round(float(x), 2) for x in (hc[0] + du, hc[1] + dv, hc[2] + d[2])])
    return out


def _device(p: Phantom, rng: np.random.Generator, d: float) -> dict:
    """A pacemaker in the left pectoral fat with a lead to the heart, or sternotomy wires."""
    g, H = p._geo, p.lung_height
    r = round(max(3.0, d + 0.3), 2)
    if rng.random() < 0.5:
        a, b = p.body_axes
        u = -0.55 * a
        v = b * np.sqrt(1 - (u / a) ** 2) - max(6.5, 0.5 * p.fat_mm)
        gen = [round(u, 2), round(float(v), 2), round(0.22 * H, 2)]
        via = [round(-0.5 * p.mediastinum_mm, 2), round(g["v_tr"] + 25.0, 2), round(0.3 * H, 2)]
        hc = g["heart_center"]
        tip = [round(hc[0] + 0.5 * g["heart_axes"][0], 2), round(hc[1], 2), round(hc[2], 2)]
        parts = [{"shape": "ellipsoid", "center": gen, "axes": [22.0, max(6.5, d + 0.5), 18.0]},
                 {"shape": "capsule", "a": gen, "b": via, "radius_mm": 2.0},
                 {"shape": "capsule", "a": via, "b": tip, "radius_mm": 2.0}]
        return {"kind": "medical_material", "device": "pacemaker", "parts": parts}
    vs = g["cb"] + 0.45 * p.muscle_mm
    parts = [{"shape": "capsule", "a": [-6.0, round(vs, 2), round(t, 2)], "b": [6.0, round(vs, 2), round(t, 2)],
              "radius_mm": r}
             for t in np.linspace(0.3 * H, 0.75 * H, int(rng.integers(4, 7)))]
    return {"kind": "medical_material", "device": "sternotomy wires", "parts": parts}
