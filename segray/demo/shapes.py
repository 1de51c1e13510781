"""Noise fields and winding lines: the shapes the demo scenes are painted with (numpy only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# --------------------------------------------------------------------------- noise


def upsample(lattice: np.ndarray, h: int, w: int, cell: float, oy: float, ox: float) -> np.ndarray:
    """Smoothstep interpolation of a lattice with one node every ``cell`` px, to [h, w]."""

    def axis(n: int, off: float) -> tuple[np.ndarray, np.ndarray]:
        t = (np.arange(n, dtype=np.float32) + off) / cell
        i = t.astype(np.int64)
        f = t - i
        return i, f * f * (3 - 2 * f)

    yi, fy = axis(h, oy)
    xi, fx = axis(w, ox)
    rows = lattice[:, xi]  # separable: along x first, then y, updated in place
    rows += (lattice[:, xi + 1] - rows) * fx
    out = rows[yi]
    out += (rows[yi + 1] - out) * fy[:, None]
    return out


def fbm(
    h: int, w: int, cell: float, octaves: int, rng: np.random.Generator, gain: float = 0.5
) -> np.ndarray:
    """Multi-octave value noise, standardised to zero mean and unit std.

    Octaves are summed on the finest lattice and upsampled once, so the full-resolution
    cost is that of a single octave.
    """
    fine = max(cell / 2 ** (octaves - 1), 1.0)
    gh, gw = int(h / fine) + 3, int(w / fine) + 3
    grid = rng.random((gh, gw), dtype=np.float32)
    for k in range(1, octaves):
        step = 2.0**k
        coarse = rng.random((int(gh / step) + 3, int(gw / step) + 3), dtype=np.float32)
        grid = grid * gain + upsample(coarse, gh, gw, step, *rng.random(2) * step)
    out = upsample(grid, h, w, fine, *rng.random(2) * fine)
    return (out - out.mean()) / (out.std() + 1e-6)


def box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window via cumulative sums, edges replicated."""
    k = 2 * r + 1
    p = np.pad(a.astype(np.float32), r, mode="edge")
    c = np.cumsum(np.pad(p, ((1, 0), (0, 0))), axis=0)
    p = (c[k:] - c[:-k]) / k
    c = np.cumsum(np.pad(p, ((0, 0), (1, 0))), axis=1)
    return (c[:, k:] - c[:, :-k]) / k


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx) pixels, zero-filled (no wrap-around)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


# --------------------------------------------------------------------------- geometry


@dataclass
class Curve:
    """A gently winding line v = amp * sin(2 pi u / wavelength + phase), in a frame rotated
    by ``angle`` around (x0, y0), optionally cut to u in [u0, u1] (a street with ends)."""

    x0: float
    y0: float
    angle: float
    amp: float = 0.0
    wavelength: float = 200.0
    phase: float = 0.0
    u0: float = -np.inf
    u1: float = np.inf

    def distance(self, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(approximate perpendicular distance, along-curve coordinate u) per pixel."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xx - self.x0, yy - self.y0
        u = dx * c + dy * s
        v = -dx * s + dy * c
        if self.amp == 0:
            d = np.abs(v)
        else:
            k = 2 * math.pi / self.wavelength
            slope = (self.amp * k) * np.cos(k * u + self.phase)
            d = np.abs(v - self.amp * np.sin(k * u + self.phase)) / np.sqrt(1 + slope**2)
        if np.isfinite(self.u0):  # rounded ends beyond [u0, u1]
            d = np.hypot(d, u - np.clip(u, self.u0, self.u1))
        return d, u

    def frame(self, u: float) -> tuple[float, float, float, float]:
        """Point (x, y) and unit tangent (tx, ty) at coordinate u."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = 2 * math.pi / self.wavelength
        v = self.amp * math.sin(k * u + self.phase)
        dv = self.amp * k * math.cos(k * u + self.phase)
        tx, ty = c - dv * s, s + dv * c
        n = math.hypot(tx, ty)
        return self.x0 + u * c - v * s, self.y0 + u * s + v * c, tx / n, ty / n

    def trim_at(self, blocked: np.ndarray, clearance: float = 4.0) -> None:
        """End the curve ``clearance`` px before its centre line first meets ``blocked``."""
        us = np.arange(self.u0, self.u1, 1.0)
        pts = np.array([self.frame(u)[:2] for u in us]).round().astype(np.int64)
        h, w = blocked.shape
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
        hit = np.zeros(len(us), bool)
        hit[ok] = blocked[pts[ok, 1], pts[ok, 0]]
        if hit.any():
            self.u1 = max(self.u0, float(us[hit.argmax()]) - clearance)

    def window(self, h: int, w: int, margin: float) -> tuple[slice, slice]:
        """Pixel window that holds the curve plus ``margin``."""
        if not np.isfinite(self.u0):
            return slice(0, h), slice(0, w)
        (xa, ya, _, _), (xb, yb, _, _) = self.frame(self.u0), self.frame(self.u1)
        m = margin + abs(self.amp)
        return (
            slice(int(np.clip(min(ya, yb) - m, 0, h)), int(np.clip(max(ya, yb) + m + 1, 0, h))),
            slice(int(np.clip(min(xa, xb) - m, 0, w)), int(np.clip(max(xa, xb) + m + 1, 0, w))),
        )


def main_road(h: int, w: int, rng: np.random.Generator) -> Curve:
    curvy = rng.random() < 0.45
    return Curve(
        x0=rng.uniform(0.15, 0.85) * w,
        y0=rng.uniform(0.15, 0.85) * h,
        angle=rng.uniform(0, np.pi),
        amp=rng.uniform(6, 28) if curvy else 0.0,
        wavelength=rng.uniform(160, 420),
        phase=rng.uniform(0, 2 * np.pi),
    )


def side_street(parent: Curve, h: int, w: int, rng: np.random.Generator) -> Curve | None:
    """A street leaving ``parent`` at about a right angle and ending after a while."""
    for _ in range(8):
        if np.isfinite(parent.u0):
            u = parent.u0 + rng.uniform(0.1, 0.9) * (parent.u1 - parent.u0)
        else:
            u = rng.uniform(-0.6, 0.6) * max(h, w)
        x, y, tx, ty = parent.frame(u)
        if 0 <= x < w and 0 <= y < h:
            side = 1.0 if rng.random() < 0.5 else -1.0
            return Curve(
                x0=x, y0=y, angle=math.atan2(ty, tx) + side * np.pi / 2 + rng.normal(0, 0.06),
                amp=rng.uniform(0, 8) if rng.random() < 0.3 else 0.0, wavelength=rng.uniform(120, 300),
                u0=0.0, u1=rng.uniform(40, 150),
            )
    return None
