"""Built-in synthetic chest-radiograph-like dataset (SPEC 5.4): the demo, the test fixture, the benchmark.

A study is a pure function of (index, seed, image_size), drawn from three independent random streams so
each part can be regenerated on its own and in any order: [seed, index, 0] the hidden truth and its
attributes (severity, side, devices), [seed, index, 1] the image (anatomy, noise), [seed, index, 2] the
radiologist's report and the two simulated NLP labelers.

Generative story: truth (Gaussian copula over three latent factors: sickness, heart failure, infection)
-> the radiologist mentions each finding as definite / hedged / negated / not at all (subtle findings get
hedged or omitted, some absent ones get "cannot exclude") -> report text; each labeler reads those
mentions with its own per-finding habits -> raw 1 / 0 / -1 / NaN like the MIMIC-CXR CSVs, from which
`findings.label_sets_from_raw` builds negbio_u0/u1 and chexpert_u0/u1.
"""

from __future__ import annotations

import functools
import hashlib
from statistics import NormalDist

import numpy as np

from aol_dist.data.findings import FINDINGS, LABELERS

AT, CM, CO, ED, EC, FR, LL, LO, NF, PE, PO, PN, PX, SD = (FINDINGS.index(n) for n in (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices"))
#: The 12 pathologies whose absence makes "No Finding" (Support Devices does not count, as in CheXpert).
_PATHOLOGIES = np.array([i for i in range(len(FINDINGS)) if i not in (NF, SD)])
_OPACITIES = np.array([AT, CO, ED, LL, PN])  # children of Lung Opacity besides its own "other opacity"

# Calibration target: the CheXpert labeler on CheXpert train (223,414 rows of
# /work/shared/data/label-stats/chexpert_train.csv.gz, measured once; not read at run time).
# finding order = FINDINGS; columns: positive rate, uncertain rate, negative rate.
CHEXPERT_RATES = np.array([
    (.149, .151, .006), (.121, .036, .050), (.066, .124, .126), (.234, .058, .093), (.048, .056, .097),
    (.040, .003, .011), (.041, .007, .006), (.473, .025, .030), (.100, .000, .000), (.386, .052, .158),
    (.016, .012, .001), (.027, .084, .013), (.087, .014, .252), (.519, .005, .027)])

# Truth, tuned so that the simulated chexpert labeler reproduces CHEXPERT_RATES: per finding
# (prevalence, loadings on (sickness, heart failure, infection)). The Lung Opacity row is its own
# "other opacity"; Lung Opacity truth is that OR any of _OPACITIES. The No Finding row is unused.
_TRUTH = np.array([
    (.26, .20, .00, .10), (.15, .00, .60, .00), (.09, .10, .00, .50), (.30, .25, .60, .00),
    (.07, .10, .20, .00), (.05, .00, .00, .00), (.05, .00, .00, .00), (.10, .20, .00, .20),
    (.00, .00, .00, .00), (.43, .40, .40, .10), (.025, .0, .00, .00), (.06, .10, .00, .50),
    (.095, .15, .00, .00), (.53, .55, .00, .00)])
_THRESHOLD = np.array([NormalDist().inv_cdf(1 - p) if p > 0 else np.inf for p in _TRUTH[:, 0]])
_LOADINGS = _TRUTH[:, 1:]
_IDIO = np.sqrt(1 - (_LOADINGS ** 2).sum(1))

# Radiologist, per finding: (hedge a true finding, omit a true finding) -- both scaled by 2*(1-severity),
# so subtle findings are the ones hedged or missed -- (hedge an absent one: "cannot exclude", negate an
# absent one: "no pneumothorax"). The hedge rates set which way uncertain mentions lean: mostly true for
# Atelectasis, Edema, Effusion, Pleural Other (u1 better); mostly false for Consolidation, Pneumonia,
# Enlarged Cardiomediastinum (u0 better).
_RADIOLOGIST = np.array([
    (.45, .04, .035, .01), (.12, .03, .025, .06), (.30, .05, .11, .14), (.20, .03, .015, .12),
    (.15, .05, .05, .10), (.05, .20, .002, .012), (.12, .08, .004, .006), (.08, .05, .02, .03),
    (0, 0, 0, 0), (.10, .02, .02, .26), (.35, .10, .004, .001), (.50, .05, .065, .014),
    (.10, .12, .008, .27), (.01, .04, .005, .06)])

# Labelers, per finding: (miss a definite mention, call a definite one uncertain) -- both scaled by
# 2*(1-severity): "mild ..." wording is what trips labelers -- then (hedge read as positive, hedge not
# parsed, negation missed -> positive, hallucinated positive from unrelated text). They disagree on
# purpose: negbio calls mild cardiomegaly uncertain, drops "cannot exclude" for consolidation/pneumonia/
# mediastinum, misses devices and fractures, misreads "no large effusion"; chexpert hedges on pneumonia
# and consolidation, and hallucinates opacities, devices and pneumothorax ("pneumothorax has resolved").
_LABELER = {
    "negbio": np.array([
        (.06, .01, .30, .05, .01, 0), (.02, .35, .02, .02, .01, 0), (.03, .01, .10, .45, .01, 0),
        (.03, .02, .10, .05, .01, .002), (.06, .02, .05, .40, .01, 0), (.12, 0, .10, .05, 0, 0),
        (.03, .02, .10, .05, 0, .004), (.04, .02, .10, .05, .01, .005), (0, 0, 0, 0, 0, 0),
        (.02, .01, .05, .02, .04, 0), (.03, .02, .10, .05, 0, 0), (.03, .02, .10, .45, .01, 0),
        (.02, .02, .05, .05, .005, 0), (.12, 0, .30, .05, 0, 0)]),
    "chexpert": np.array([
        (.02, .02, .05, .02, 0, 0), (.02, .03, .05, .05, .01, 0), (.02, .05, .02, .02, .01, 0),
        (.12, .03, .08, .03, .01, .002), (.03, .05, .05, .05, .01, 0), (.03, 0, .10, .05, 0, 0),
        (.15, .02, .10, .05, 0, .001), (.02, .01, .10, .05, .02, .04), (0, 0, 0, 0, 0, 0),
        (.01, .01, .05, .02, .01, 0), (.15, .02, .10, .05, 0, 0), (.02, .10, .02, .02, .01, 0),
        (.02, .02, .05, .05, .025, .002), (.02, 0, .30, .05, 0, .02)]),
}
assert set(_LABELER) == set(LABELERS)
_NONE, _NEG, _HEDGE, _DEF = 0, 1, 2, 3  # how the report mentions a finding


def synth_split_indices(split: str, n_train: int, n_validate: int, n_test: int) -> range:
    """Disjoint study-index ranges: train = [0, n_train), validate next, test after."""
    sizes = {"train": n_train, "validate": n_validate, "test": n_test}
    if split not in sizes:
        raise ValueError(f"unknown split {split!r}: expected one of {list(sizes)}")
    if min(sizes.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    start = {"train": 0, "validate": n_train, "test": n_train + n_validate}[split]
    return range(start, start + sizes[split])


def synth_study(index: int, seed: int, image_size: int = 64) -> dict:
    """One synthetic study, a pure function of (index, seed, image_size).

    Returns {"key", "ids": {subject_id, study_id, dicom_id}, "image": uint8 (size, size), "truth": uint8
    (14,) in FINDINGS order, "raw": {labeler: float32 (14,) of 1 / 0 / -1 / NaN}, "report": str}.
    """
    if index < 0 or not 16 <= image_size <= 2048:
        raise ValueError(f"need index >= 0 and 16 <= image_size <= 2048, got {index}, {image_size}")
    truth, sev, attrs = _sample_truth(np.random.default_rng([seed, index, 0]))
    image = _render(truth, sev, attrs, np.random.default_rng([seed, index, 1]), image_size)
    rng = np.random.default_rng([seed, index, 2])
    states = _mentions(truth, sev, attrs, rng)
    raw = {name: _read(states, attrs["sev"], _LABELER[name], rng) for name in LABELERS}
    return {"key": f"synth-{index:08d}", "ids": _ids(index), "image": image, "truth": truth,
            "raw": raw, "report": _report(states, attrs, rng)}


def _ids(index: int) -> dict:
    # Affine maps with multipliers coprime to the moduli: unique, MIMIC-looking 8-digit ids per index.
    dicom = hashlib.sha1(f"synth-dicom-{index}".encode()).hexdigest()
    return {"subject_id": 10_000_000 + (index * 7_919_993 + 1_234_567) % 89_999_999,
            "study_id": 50_000_000 + (index * 3_713_711 + 2_718_281) % 49_999_999,
            "dicom_id": "-".join(dicom[i:i + 8] for i in range(0, 40, 8))}


def _sample_truth(rng):
    z = _LOADINGS @ rng.standard_normal(3) + _IDIO * rng.standard_normal(len(FINDINGS))
    truth = (z > _THRESHOLD).astype(np.uint8)
    sev = np.where(truth == 1, rng.random(len(FINDINGS)), 0.0)
    attrs = {"own_opacity": bool(truth[LO]), "side": rng.integers(0, 3, len(FINDINGS)),
             "devices": rng.random(4) < (.55, .4, .45, .12), "rib": int(rng.integers(3, 9)), "sev": sev}
    unilateral = [PX, LL, FR, PO, CO]  # side: 0 right, 1 left, 2 bilateral
    attrs["side"][unilateral] = rng.integers(0, 2, len(unilateral))
    attrs["side"][ED] = 2
    if truth[SD] and not attrs["devices"].any():
        attrs["devices"][0] = True
    kids = truth[_OPACITIES] == 1
    if kids.any():  # Lung Opacity is the parent of every airspace finding
        truth[LO] = 1
        sev[LO] = max(sev[LO], sev[_OPACITIES][kids].max())
        if not attrs["own_opacity"]:  # the "opacity" the report names is where the child finding is
            attrs["side"][LO] = attrs["side"][_OPACITIES[kids][0]]
    truth[NF] = 0 if truth[_PATHOLOGIES].any() else 1
    return truth, sev, attrs


def _mentions(truth, sev, attrs, rng):
    """How the radiologist mentions each finding (_NONE/_NEG/_HEDGE/_DEF)."""
    hp, om, hn, nn = _RADIOLOGIST.T
    u = rng.random(len(FINDINGS))
    p_omit = np.minimum(om * 2 * (1 - sev), .9)
    p_hedge = np.minimum(hp * 2 * (1 - sev), .95 - p_omit)
    # "cannot exclude pneumonia" is written when something else clouds the lungs; "mediastinum may be
    # widened" on portable ICU films: hedges on absent findings depend on the rest of the study.
    ctx = np.ones(len(FINDINGS))
    ctx[[CO, PN]] = .25 + 1.2 * bool(truth[[AT, PE, ED]].any() or attrs["own_opacity"])
    ctx[EC] = .4 + 1.2 * truth[SD]
    p_hn = hn * ctx
    present = np.where(u < p_omit, _NONE, np.where(u < p_omit + p_hedge, _HEDGE, _DEF))
    absent = np.where(u < p_hn, _HEDGE, np.where(u < p_hn + nn, _NEG, _NONE))
    states = np.where(truth == 1, present, absent)
    if truth[LO] and not attrs["own_opacity"]:  # children described as "opacity" more often when marked
        states[LO] = _DEF if u[LO] < .5 + .45 * sev[LO] else _NONE
    states[NF] = _NONE
    return states


def _read(states, sev, params, rng):
    """One labeler's raw output (1, 0, -1, NaN) from the report's mentions."""
    miss, d2u, h2p, h2n, nf, hal = params.T
    u = rng.random(len(FINDINGS))
    p_miss, p_d2u = miss * 2 * (1 - sev), d2u * 2 * (1 - sev)
    nan = np.nan
    raw = np.select(
        [states == _DEF, states == _HEDGE, states == _NEG],
        [np.where(u < p_miss, nan, np.where(u < p_miss + p_d2u, -1.0, 1.0)),
         np.where(u < h2p, 1.0, np.where(u < h2p + h2n, nan, -1.0)),
         np.where(u < nf, 1.0, 0.0)],
        np.where(u < hal, 1.0, nan))
    # CheXpert/NegBio rule: No Finding is positive iff no pathology is positive or uncertain, else blank.
    raw[NF] = nan if np.isin(raw[_PATHOLOGIES], (1.0, -1.0)).any() else 1.0
    return raw.astype(np.float32)


_NOUN = ("atelectasis", "cardiomegaly", "consolidation", "pulmonary edema", "widening of the mediastinum",
         "rib fracture", "pulmonary nodule", "airspace opacity", "", "pleural effusion", "pleural thickening",
         "pneumonia", "pneumothorax", "support device")
_NEGATED = {CM: "The heart size is normal.", EC: "The cardiomediastinal silhouette is within normal limits.",
            SD: "No lines or tubes.", FR: "No displaced rib fracture.", PE: "No pleural effusion."}
_DEVICES = ("Endotracheal tube terminates about {d} cm above the carina.",
            "Enteric tube courses below the diaphragm out of view.",
            "{S} internal jugular central venous catheter ends in the mid SVC.",
            "Left chest wall pacemaker with leads in the right atrium and ventricle.")
_HEDGES = ("Possible {s}{n}.", "{N} cannot be excluded.", "Findings may represent {n}.",
           "Questionable {s}{n}.", "Cannot exclude {n}.", "Subtle {s}{n} is suspected.")
_SIDES = ("right ", "left ", "bilateral ")
_SIDED = (AT, CO, LL, LO, PE, PO, PN, PX)


def _report(states, attrs, rng):
    """A short FINDINGS / IMPRESSION report; hedged where the finding is subtle, negated where absent."""
    sev, side = attrs["sev"], attrs["side"]
    portable = attrs["devices"].any() and states[SD] != _NONE
    text = ["Portable AP chest radiograph." if portable else "PA and lateral views of the chest."]
    impression = []
    for i in (SD,) + tuple(i for i in range(len(FINDINGS)) if i != SD):  # devices first, as radiologists do
        n, s = _NOUN[i], _SIDES[side[i]] if i in _SIDED else ""
        if states[i] == _DEF and i == SD:
            text += [_DEVICES[k].format(d=int(rng.integers(2, 7)), S=_SIDES[side[SD] % 2].strip().title())
                     for k in np.flatnonzero(attrs["devices"])]
        elif states[i] == _DEF:
            grade = ("small", "moderate", "large") if i in (PE, PX, LL) else ("mild", "moderate", "severe")
            phrase = f"{grade[min(int(sev[i] * 3), 2)]} {s}{n}"
            if i == FR:
                rib = attrs["rib"]
                phrase = (f"{'non' if sev[i] < .5 else ''}displaced fracture of the {_SIDES[side[FR]]}"
                          f"{rib}{'rd' if rib == 3 else 'th'} rib")
            text.append(phrase[0].upper() + phrase[1:] + ".")
            impression.append(phrase)
        elif states[i] == _HEDGE:
            text.append(_HEDGES[rng.integers(len(_HEDGES))].format(n=n, N=n.capitalize(), s=s))
            impression.append(f"possible {n}")
        elif states[i] == _NEG:
            text.append(_NEGATED.get(i, f"No {n}."))
    summary = "; ".join(impression) or "no acute cardiopulmonary process"
    return "FINDINGS: " + " ".join(text) + "\nIMPRESSION: " + summary[0].upper() + summary[1:] + "."


# ---------------------------------------------------------------- image -----------------------------
@functools.lru_cache(maxsize=16)
def _grid(n):
    c = ((np.arange(n, dtype=np.float32) + .5) / n * 2 - 1)
    c.setflags(write=False)  # cached and shared between calls (and threads)
    return c[None, :], c[:, None]


@functools.lru_cache(maxsize=32)
def _interp(n, m):
    pos = (np.arange(n) + .5) / n * (m - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, m - 2)
    w = (pos - lo).astype(np.float32)
    return lo, w, 1 - w


def _smooth(rng, n, m):
    """Smooth random field: m x m white noise bilinearly upsampled to n x n (gathers, not BLAS, which
    spends milliseconds waking its threads between small products)."""
    lo, w, v = _interp(n, m)
    g = rng.standard_normal((m, m), dtype=np.float32)
    g = g[lo] * v[:, None] + g[lo + 1] * w[:, None]
    return g[:, lo] * v + g[:, lo + 1] * w


def _ramp(d, w):
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over width w (anti-aliased edges)."""
    return np.clip(d * (1.0 / w) + .5, 0, 1)


def _segment(X, Y, p, q, w):
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((X - p[0]) * dx + (Y - p[1]) * dy) * (1.0 / (dx * dx + dy * dy)), 0, 1)
    return np.exp(-((X - p[0] - t * dx) ** 2 + (Y - p[1] - t * dy) ** 2) * (1.0 / (w * w)))


def _render(truth, sev, attrs, rng, n):
    """Chest-like template plus one visible sign per present finding, strength growing with severity."""
    f = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731  python floats keep arrays float32
    xs, ys = _grid(n)
    px = 2.0 / n
    cx, cy, sc, th = f(-.06, .06), f(-.06, .04), f(.9, 1.05), f(-.07, .07)
    c, s = float(np.cos(th)), float(np.sin(th))
    X = ((xs - cx) * c + (ys - cy) * s) * (1 / sc)  # patient coordinates: image left = patient right
    Y = ((ys - cy) * c - (xs - cx) * s) * (1 / sc)
    edge = max(.05, 1.5 * px)
    amp = lambda i, lo, hi: (lo + hi * float(sev[i])) * float(truth[i])  # noqa: E731
    img = .08 + .55 * _ramp(1 - (X * (1 / .92)) ** 4 - ((Y - .2) * (1 / 1.25)) ** 4, .15)

    lw, lh = f(.29, .33), f(.56, .64)
    lung, ell = {}, {}
    for k in (0, 1):  # 0 = patient right (image left, higher hemidiaphragm), 1 = patient left
        lx = (2 * k - 1) * f(.4, .44)
        ell[k] = ((X - lx) * (1 / lw)) ** 2 + ((Y + .08) * (1 / lh)) ** 2
        dome = (.38 if k == 0 else .43) + f(-.04, .04) + 1.2 * (X - lx) ** 2
        lung[k] = _ramp(1 - ell[k], .15) * _ramp(dome - Y, edge)
        lung[k, "x"] = lx
    hw = f(.26, .34) * (1 + .45 * amp(CM, .2, .8))  # heart grows mostly toward patient's left
    hh = .24 * (1 + .15 * amp(CM, .3, .7))
    heart = _ramp(1 - ((X - .08 - .7 * (hw - .3)) * (1 / hw)) ** 2 - ((Y - .26) * (1 / hh)) ** 2, .15)
    mw = f(.08, .12) + .14 * amp(EC, .2, .8) * np.clip((.25 - Y) * (1 / .6), 0, 1)
    med = _ramp(mw - np.abs(X - .01), .04) * _ramp(.35 - Y, .1)
    # Heart and mediastinum are soft tissue in front of the lungs: they hide the lung's darkness.
    cover = 1 - .8 * np.maximum(heart, med)
    for k in (0, 1):
        lung[k] = lung[k] * cover
    lungs = lung[0] + lung[1]
    img += .05 * np.maximum(heart, med) - .36 * lungs
    # Vascular markings; removed where air replaces lung (pneumothorax), coarser with edema.
    tex = (_smooth(rng, n, 10) * .02 + _smooth(rng, n, 20) * .025) * (1 + amp(ED, .2, .8))
    patch = np.clip(.6 + .5 * _smooth(rng, n, 8), 0, 1.2)

    sides = lambda i: (0, 1) if attrs["side"][i] == 2 else (int(attrs["side"][i]),)  # noqa: E731
    if truth[PX]:  # dark, texture-free air at the apex, outside a collapsed lung; thin pleural line
        k = sides(PX)[0]
        shrink = .12 + .3 * float(sev[PX])
        lx = lung[k, "x"] + (1 - 2 * k) * shrink * lw * .6
        e2 = ((X - lx) * (1 / (lw * (1 - shrink)))) ** 2 + ((Y + .08 - shrink * .4) * (1 / (lh * (1 - shrink)))) ** 2
        air = lung[k] * _ramp(e2 - 1, .1) * _ramp(.15 - Y, .2)
        img += -.18 * air + .15 * air * np.exp(-((e2 - 1) * (1 / .08)) ** 2)
        tex *= 1 - air
    img += lungs * tex

    period, phase = f(.15, .18), f(0, 1)
    Yr = Y + .45 * np.abs(X) - .5 * X * X  # posterior ribs rise laterally, then fall
    gap = 1.0
    if truth[FR]:  # a rib stripe broken and stepped: both ends shifted apart around the break
        k, fx = sides(FR)[0], lung[sides(FR)[0], "x"] + f(-.1, .1)
        fy = period * (round((-.35 + .07 * attrs["rib"]) / period - phase) + phase)
        near = np.exp(-((X - fx) * (1 / .12)) ** 2 - ((Yr - fy) * (1 / (.7 * period))) ** 2)
        Yr = Yr + period * (.25 + .25 * float(sev[FR])) * near * np.tanh((X - fx) * (1 / max(px, .02)))
        gap = 1 - near * np.exp(-((X - fx) * (1 / max(1.5 * px, .04))) ** 2)
    ribs = (.5 + .5 * np.cos((2 * np.pi / period) * Yr - 2 * np.pi * phase)) ** 6
    img += ribs * gap * (.015 + .08 * lungs)

    for k in sides(PE) if truth[PE] else ():  # basal fluid, meniscus climbing laterally
        t = np.clip((2 * k - 1) * (X - lung[k, "x"]) * (1 / lw), -1, 1)
        top = .5 - (.06 + .35 * float(sev[PE])) * (1 + .6 * t)
        img += .28 * lung[k] * _ramp(Y - top, .06)
    for k in sides(CO) if truth[CO] else ():  # dense lobar blob
        r2 = (.1 + .12 * float(sev[CO])) ** 2
        b = np.exp(-((X - lung[k, "x"] - f(-.08, .08)) ** 2 + (Y - f(-.1, .3)) ** 2) * (1 / r2))
        img += amp(CO, .12, .25) * b * lung[k] * (.75 + .25 * patch)
    for k in sides(PN) if truth[PN] else ():  # patchy lower-zone airspace disease, two foci
        for _ in range(2):
            r2 = (.07 + .08 * float(sev[PN])) ** 2
            b = np.exp(-((X - lung[k, "x"] - f(-.1, .1)) ** 2 + (Y - f(.05, .35)) ** 2) * (1 / r2))
            img += amp(PN, .1, .2) * b * lung[k] * patch
    if truth[LO] and attrs["own_opacity"]:  # ill-defined hazy opacity anywhere in one lung
        k = sides(LO)[0]
        r2 = (.15 + .1 * float(sev[LO])) ** 2
        b = np.exp(-((X - lung[k, "x"] - f(-.1, .1)) ** 2 + (Y - f(-.3, .3)) ** 2) * (1 / r2))
        img += amp(LO, .06, .14) * b * lung[k] * patch
    if truth[ED]:  # bilateral perihilar "bat wing" haze
        haze = sum(np.exp(-((X - (2 * k - 1) * .2) * (1 / .25)) ** 2 - (Y * (1 / .3)) ** 2) for k in (0, 1))
        img += amp(ED, .04, .14) * haze * lungs
    for k in sides(AT) if truth[AT] else ():  # plate-like bright bands at the base
        x0, y0, slope = lung[k, "x"] + f(-.08, .08), f(.15, .3), f(-.3, .3)
        w = max(.025 + .025 * float(sev[AT]), .8 * px)
        band = np.exp(-(((Y - y0) - slope * (X - x0)) * (1 / w)) ** 2 - ((X - x0) * (1 / .16)) ** 2)
        img += amp(AT, .15, .25) * band * lung[k]
    if truth[LL]:  # small round well-defined nodule
        k = sides(LL)[0]
        r = max(.035 + .04 * float(sev[LL]), 1.5 * px)
        d = np.sqrt((X - lung[k, "x"] - f(-.1, .1)) ** 2 + (Y - f(-.4, .2)) ** 2)
        img += amp(LL, .2, .2) * _ramp(r - d, max(.015, px))
    if truth[PO]:  # lateral pleural thickening along the lung edge
        k = sides(PO)[0]
        lat = _ramp((2 * k - 1) * (X - lung[k, "x"]) * (1 / lw) - .2, .3)
        img += .3 * lung[k] * lat * _ramp(ell[k] - 1 + .15 + .25 * float(sev[PO]), .08)
    if truth[SD]:  # thin radio-opaque tubes and lines
        w, lines = max(.012, .45 * px), []
        dev = attrs["devices"]
        x0 = f(-.03, .03)
        if dev[0]:
            lines.append(((x0, -1.2), (x0, f(-.45, -.25))))
        if dev[1]:
            lines += [((x0 + .03, -1.2), (x0 + .03, .5)), ((x0 + .03, .5), (f(.2, .4), .65))]
        if dev[2]:
            sx = .45 * (2 * (attrs["side"][SD] % 2) - 1)
            lines += [((sx, -.7), (.03, -.45)), ((.03, -.45), (.03, f(-.2, -.05)))]
        if dev[3]:
            lines.append(((.55, -.6), (.1, .3)))
            img += .45 * _ramp(.06 - np.maximum(np.abs(X - .55), np.abs(Y + .62)), px)
        img += .45 * functools.reduce(np.maximum, [_segment(X, Y, p, q, w) for p, q in lines])

    # Acquisition: exposure gradient, contrast, gamma and quantum noise.
    img += f(-.05, .05) * X + f(-.05, .05) * Y + .03 * _smooth(rng, n, 4)
    img = np.clip(img * f(.85, 1.15) + f(-.05, .05), 0, 1) ** f(.85, 1.2)
    img += f(.015, .04) * rng.standard_normal((n, n), dtype=np.float32)
    return np.clip(img * 255 + .5, 0, 255).astype(np.uint8)
