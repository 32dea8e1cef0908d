"""Agreement measures shared by export parity, tests and benchmarks."""

from __future__ import annotations

import numpy as np


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - test|^2); a length mismatch counts as error (zero-padded). inf if identical."""
    n = max(len(reference), len(test))
    ref = np.zeros(n, np.float64)
    out = np.zeros(n, np.float64)
    ref[: len(reference)] = reference
    out[: len(test)] = test
    noise = float(np.sum((ref - out) ** 2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.sum(ref**2)), 1e-30) / noise))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def relative_l2_error(reference: np.ndarray, test: np.ndarray) -> float:
    """||test - reference|| / ||reference||, in float64."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return float(np.linalg.norm(test - reference) / max(float(np.linalg.norm(reference)), 1e-30))


def relative_max_error(reference: np.ndarray, test: np.ndarray) -> float:
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return float(np.max(np.abs(reference - test)) / max(float(np.max(np.abs(reference))), 1e-30))
