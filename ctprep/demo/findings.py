"""Pathologies of the demo phantom: where each finding is placed and how it is painted.

:func:`sample_findings` draws the findings of a scan from its CT-RATE labels as plain dicts
(kind, lobe or side, size, centre), stored in ``Phantom.pathologies`` so a scan re-renders from
JSON; :func:`paint_findings` paints them at each stage of the anatomy pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ctprep.demo.canvas import LOBE_CODE, LOBES, LUNGISH, Canvas, Tissue, lung_back_v, t_diaphragm, waves

if TYPE_CHECKING:
    from ctprep.demo.phantom import Phantom


# --- findings ---------------------------------------------------------------------------------
def paint_findings(p: Phantom, c: Canvas, stage: str) -> None:
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


def _lung_idx(c: Canvas, lobes, extra=()) -> np.ndarray:
    ok = np.isin(c.tissue, np.asarray(LUNGISH + tuple(extra), np.uint8)) & np.isin(c.lobe, lobes)
    return np.flatnonzero(ok)


def _emphysema(p, c, f):
    """Low-attenuation holes where a random-wave field peaks, mostly in the upper lungs."""
    idx = _lung_idx(c, (1, 2, 3, 4, 5))
    idx = idx[c.P[idx, 2] < f["t_limit"]]
    field_ = waves(c.P[idx], f["waves"]) / np.float32(np.sqrt(len(f["waves"]) / 2.0))  # ~ N(0, 1)
    thr = f["threshold"] + 1.5 * c.P[idx, 2] / f["t_limit"]  # fewer holes towards the bases
    c.paint(idx[field_ > thr], -975.0, Tissue.EMPHYSEMA, only=[Tissue.LUNG])


def _mosaic(p, c, f):
    idx = _lung_idx(c, (1, 2, 3, 4, 5))
    c.hu[idx] += f["amplitude"] * np.tanh(3.0 * waves(c.P[idx], f["waves"]))


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


# --- placing findings ---------------------------------------------------------------------------
#: CT-RATE label -> finding kind drawn for it. The other three labels are never rendered (0).
#: The least cardiothoracic ratio of a demo cardiomegaly: enlarged is above 0.5 (a small heart scaled by 1.3 stayed
#: at 0.48 in 4% of the cardiomegaly scans of other seeds, and its report said "ratio of about 0.48; cardiomegaly")
MIN_CTR = 0.51
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
            scale = U(1.3, 1.4, 3)
            # the width grows with the scale: a small heart is enlarged up to the ratio the report can call enlarged
            normal_ctr = p._geo["heart_width"] / (2.0 * p._geo["ca"])
            scale = max(scale, math.ceil(MIN_CTR / normal_ctr * 1000) / 1000)
            p = add(p, {"kind": kind, "scale": scale})
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
