"""An analytic chest phantom: noise-free HU at any physical (RAS) point.

The phantom lives in a patient frame ``(u, v, t)`` in mm: ``u`` towards the patient's right
(RAS +x), ``v`` anterior (RAS +y) and ``t`` the depth below the lung apices (RAS -z), centred on
the patient's axial centre. Every structure is a closed-form region (ellipses, ellipsoids,
capsules, fissure planes), so a volume can be rendered on any grid, and a test can re-render it
from the JSON in ``demo_truth.csv`` to check the geometry of a stored file.

Anatomy comes from :func:`sample_anatomy` (per patient); :func:`ctprep.demo.findings.sample_findings`
adds the findings of a scan as plain dicts in ``Phantom.pathologies`` (painted by
:func:`ctprep.demo.findings.paint_findings`). Lobes are bounded by the fissure planes, so a finding
can be put in a named lobe and reported as such. Tissue codes, the canvas and the landmark helpers
are in :mod:`ctprep.demo.canvas`.

Sections: the phantom type; anatomy; sampling a patient.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

from ctprep.demo.canvas import (LOBES, Canvas, Tissue, derive, horizontal_fissure_t, oblique_fissure_t, t_diaphragm,
                                waves)
from ctprep.demo.findings import paint_findings

__all__ = ["LOBES", "Phantom", "Tissue", "sample_anatomy"]




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
        self._geo = derive(self)

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
            c = Canvas(P[s : s + chunk])
            if len(c.P):
                _paint_anatomy(self, c)
            outs.append((c.hu, c.tissue, c.lobe))
        return tuple(np.concatenate(x) for x in zip(*outs))  # type: ignore[return-value]



# --- anatomy ----------------------------------------------------------------------------------
def _paint_anatomy(p: Phantom, c: Canvas) -> None:
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


def _paint_lungs(p: Phantom, c: Canvas, idx: np.ndarray) -> None:
    g, H = p._geo, p.lung_height
    u, v, t = c.P[idx, 0], c.P[idx, 1], c.P[idx, 2]
    taper = np.sqrt(np.clip(t / p.apex_mm, 1e-3, 1.0))
    for side in (1, -1):
        q = ((u - side * g["lc"]) / (g["lra"] * taper)) ** 2 + ((v - g["lv"]) / (g["lrb"] * taper)) ** 2
        inside = q <= 1.0
        sel, vs, ts = idx[inside], v[inside], t[inside]
        if not sel.size:
            continue
        lower = ts > oblique_fissure_t(p, vs)
        if side == 1:
            lobe = np.where(lower, 3, np.where(ts > horizontal_fissure_t(p), 2, 1))
        else:
            lobe = np.where(lower, 5, 4)
        # Dependent (posterior) lung is denser; waves give a little parenchymal texture.
        hu = -865.0 + 45.0 * np.clip(-(vs - g["lv"]) / g["lrb"], 0.0, 1.0) + waves(c.P[sel], p.texture)
        slope = 0.65 * H / (2.0 * g["lrb"])
        fis = np.abs(ts - oblique_fissure_t(p, vs)) / np.sqrt(1.0 + slope * slope) < 0.8
        if side == 1:
            fis |= ~lower & (np.abs(ts - horizontal_fissure_t(p)) < 0.8)
        hu = np.where(fis, -720.0, hu)
        c.paint(sel, hu, Tissue.LUNG)
        c.lobe[sel] = lobe


def _paint_bones(p: Phantom, c: Canvas) -> None:
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


def _paint_ribs(p: Phantom, c: Canvas) -> None:
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
