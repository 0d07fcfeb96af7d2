"""Activation ranges from calibration data, and the int8 arithmetic both the emitted graph and
the local error model use.

Weights: symmetric int8 per output channel, scale max|W_c| / 127. Activations: asymmetric
uint8 per tensor (onnxruntime's fast u8s8 path), the clip range chosen per layer among the
min-max range and percentile ranges by the layer's own output error on the fit data (an MSE
search over candidate ranges)."""

from __future__ import annotations

import dataclasses

import numpy as np

PERCENTILES = (100.0, 99.999, 99.99, 99.9)  # 100: min-max


@dataclasses.dataclass(frozen=True)
class ActRange:
    lo: float
    hi: float
    method: str  # "minmax" or "percentile 99.99"

    @property
    def scale(self) -> np.float32:
        return np.float32(max(self.hi - self.lo, 1e-8) / 255.0)

    @property
    def zero_point(self) -> np.uint8:
        return np.uint8(np.clip(np.round(-self.lo / float(self.scale)), 0, 255))

    def fake(self, x: np.ndarray) -> np.ndarray:
        """x through QuantizeLinear -> DequantizeLinear (what the graph computes)."""
        s, z = float(self.scale), float(self.zero_point)
        return ((np.clip(np.round(x / s) + z, 0, 255) - z) * s).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SymmetricRange:
    """Symmetric int8 per tensor (signed values: attention's Q, K, V): scale bound / 127, zero
    point 0; QuantizeLinear saturates to [-128, 127]."""

    bound: float
    method: str

    @property
    def scale(self) -> np.float32:
        return np.float32(max(self.bound, 1e-8) / 127.0)

    def fake(self, x: np.ndarray) -> np.ndarray:
        s = float(self.scale)
        return (np.clip(np.round(x / s), -128, 127) * s).astype(np.float32)


def weight_scales(w: np.ndarray, axis: int) -> np.ndarray:
    """Per-output-channel symmetric scales (float32, shape [channels])."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    return np.maximum(np.abs(w).max(axis=other) / 127.0, 1e-12).astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, per-channel scales)."""
    scales = weight_scales(w, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.round(w / scales.reshape(shape)), -127, 127).astype(np.int8), scales


def fake_weight(w: np.ndarray, axis: int) -> np.ndarray:
    q, scales = quantize_weight(w, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scales.reshape(shape)


def candidates(samples: np.ndarray) -> list[ActRange]:
    """Ranges to choose from: min-max, then percentile clips of the sampled values (0 always inside)."""
    flat = samples.ravel()
    out = []
    for p in PERCENTILES:
        lo = float(np.percentile(flat, 100 - p)) if p < 100 else float(flat.min())
        hi = float(np.percentile(flat, p)) if p < 100 else float(flat.max())
        out.append(ActRange(min(lo, 0.0), max(hi, 0.0), "minmax" if p == 100 else f"percentile {p}"))
    return out


def local_error(x: np.ndarray, exact: np.ndarray, act: ActRange, fake_w: np.ndarray) -> float:
    """Relative error of x @ W with both quantized (`fake_w`), against the float product `exact` = x @ W."""
    approx = act.fake(x) @ fake_w
    return float(np.linalg.norm(approx - exact) / (np.linalg.norm(exact) + 1e-30))


def best_range(x: np.ndarray, w: np.ndarray) -> tuple[ActRange, float]:
    """The candidate range with the lowest local error of x @ w (x [rows, K], w [K, N])."""
    act, (err,) = best_shared_range(x, [w])
    return act, err


def best_shared_range(x: np.ndarray, ws: list[np.ndarray]) -> tuple[ActRange, list[float]]:
    """One range for an activation every w in `ws` reads (they share its QuantizeLinear): the
    candidate with the lowest summed local error; and each reader's error at it."""
    readers = [(fake_weight(w, 1), x @ w) for w in ws]  # shared by every candidate range
    scored = [([local_error(x, exact, r, fake_w) for fake_w, exact in readers], r) for r in candidates(x)]
    errs, act = min(scored, key=lambda t: sum(t[0]))
    return act, errs
