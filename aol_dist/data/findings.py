"""The 14 CXR findings, the label-set names, and the uncertain -> u0/u1 mapping (paper 000, Sec. 4)."""

from __future__ import annotations

import numpy as np

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

LABELERS: tuple[str, ...] = ("negbio", "chexpert")

#: The four label sets of MIMIC-CXR in the paper's order of Listing 1 is u1 first; we keep labeler-major order.
LABEL_SETS: tuple[str, ...] = ("negbio_u0", "negbio_u1", "chexpert_u0", "chexpert_u1")

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0


def uncertain_to(raw: np.ndarray, value: int) -> np.ndarray:
    """Map one labeler's raw mentions to a binary label vector.

    ``raw`` holds 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or NaN (not mentioned),
    exactly as in the MIMIC-CXR / CheXpert CSVs. Uncertain becomes ``value`` (0 for *_u0,
    1 for *_u1); not mentioned becomes 0 (Sec. 4).
    """
    raw = np.asarray(raw, dtype=np.float64)
    known = np.isnan(raw) | np.isin(raw, (POSITIVE, NEGATIVE, UNCERTAIN))
    if not known.all():
        bad = sorted(set(raw[~known].tolist()))
        raise ValueError(f"unknown label values {bad}: expected 1, 0, -1 or blank")
    out = np.where(raw == UNCERTAIN, float(value), np.nan_to_num(raw, nan=0.0))
    return out.astype(np.uint8)


def label_sets_from_raw(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Build the ``<labeler>_u0`` and ``<labeler>_u1`` label sets from each labeler's raw mentions."""
    out = {}
    for labeler, mentions in raw.items():
        out[f"{labeler}_u0"] = uncertain_to(mentions, 0)
        out[f"{labeler}_u1"] = uncertain_to(mentions, 1)
    return out
