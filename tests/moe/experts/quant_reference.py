"""Slow NumPy references of the quantized-expert format (nothing of moejax): group by group,
byte by byte, scalar float16 rounding."""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_MAX = np.float32(448.0)


def ceil_f16(target: np.float32, k: float) -> np.float16:
  """The smallest float16 h with h * k >= target (float64: exact)."""
  h = np.float16(np.float64(target) / k)
  return np.nextafter(h, np.float16(np.inf)) if np.float64(h) * k < np.float64(target) else h


def floor_f16(x: np.float32) -> np.float16:
  h = np.float16(x)
  return np.nextafter(h, np.float16(-np.inf)) if np.float32(h) > x else h


FP8_VALUES = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # 0 .. 448


def nearest_fp8(v: float) -> np.ndarray:
  """The float8_e4m3fn nearest to v by enumeration (ties: the even code)."""
  dist = np.abs(FP8_VALUES.astype(np.float64) - abs(v))
  best = np.flatnonzero(dist == dist.min())
  code = best[0] if len(best) == 1 else best[best % 2 == 0][0]
  out = FP8_VALUES[code]
  return -out if v < 0 else out


def quantize_group(g: np.ndarray, bits: int, scheme: str):
  """(codes [G] uint8 or float8_e4m3fn, scale float16, zero float16 or None) of one group;
  quotients in float64 (exact enough to round exactly)."""
  g = np.asarray(g, np.float32)
  if scheme == "sym":
    qmax = 2 ** (bits - 1) - 1
    s = ceil_f16(np.max(np.abs(g)), qmax)
    div = np.float64(s) if s > 0 else 1.0
    codes = [int(np.clip(np.round(np.float64(v) / div), -qmax, qmax)) + 2 ** (bits - 1)
             for v in g]
    return np.asarray(codes, np.uint8), s, None
  if scheme == "asym":
    qmax = 2 ** bits - 1
    z = floor_f16(np.min(g))
    x = g - np.float32(z)  # float32 subtraction
    s = ceil_f16(np.max(x), qmax)
    div = np.float64(s) if s > 0 else 1.0
    codes = [int(np.clip(np.round(np.float64(v) / div), 0, qmax)) for v in x]
    return np.asarray(codes, np.uint8), s, z
  assert scheme == "fp8" and bits == 8
  s = ceil_f16(np.max(np.abs(g)), float(FP8_MAX))
  div = np.float64(s) if s > 0 else 1.0
  codes = np.asarray([nearest_fp8(np.float64(v) / div) for v in g])
  return codes.astype(ml_dtypes.float8_e4m3fn), s, None


def dequantize_group(codes: np.ndarray, scale, zero, bits: int, scheme: str) -> np.ndarray:
  v = np.asarray(codes).astype(np.float32)
  if scheme == "sym":
    v = v - np.float32(2 ** (bits - 1))
  out = v * np.float32(scale)
  return out + np.float32(zero) if scheme == "asym" else out


def pack_bytes(codes: np.ndarray, bits: int) -> np.ndarray:
  """[K] codes -> [K * bits / 8] bytes, consecutive codes from the low bits up."""
  if bits == 8:
    return np.asarray(codes, np.uint8)
  per = 8 // bits
  out = np.zeros(len(codes) // per, np.uint8)
  for i in range(len(out)):
    byte = 0
    for j in range(per):
      byte |= int(codes[i * per + j]) << (bits * j)
    out[i] = byte
  return out


def unpack_bytes(packed: np.ndarray, bits: int) -> np.ndarray:
  if bits == 8:
    return np.asarray(packed, np.uint8)
  per, mask = 8 // bits, 2 ** bits - 1
  return np.asarray([(int(b) >> (bits * j)) & mask for b in packed for j in range(per)],
                    np.uint8)


def quantize(w: np.ndarray, bits: int, scheme: str, group: int, axis: int) -> dict:
  """The stored dict of w (groups of `group` along `axis`), built line by line."""
  w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
  lead, k = w.shape[:-1], w.shape[-1]
  fp8 = scheme == "fp8"
  width = k if fp8 else k * bits // 8
  codes = np.zeros(lead + (width,), ml_dtypes.float8_e4m3fn if fp8 else np.uint8)
  scale = np.zeros(lead + (k // group,), np.float16)
  zero = np.zeros(lead + (k // group,), np.float16)
  for idx in np.ndindex(*lead):
    line = []
    for j in range(k // group):
      c, s, z = quantize_group(w[idx][j * group:(j + 1) * group], bits, scheme)
      line.append(c)
      scale[idx + (j,)] = s
      if z is not None:
        zero[idx + (j,)] = z
    line = np.concatenate(line)
    codes[idx] = line if fp8 else pack_bytes(line, bits)
  out = {"codes": np.moveaxis(codes, -1, axis), "scale": np.moveaxis(scale, -1, axis)}
  if scheme == "asym":
    out["zero"] = np.moveaxis(zero, -1, axis)
  return out


def dequantize(stored: dict, bits: int, scheme: str, group: int, axis: int) -> np.ndarray:
  codes = np.moveaxis(np.asarray(stored["codes"]), axis, -1)
  scale = np.moveaxis(np.asarray(stored["scale"]), axis, -1)
  zero = np.moveaxis(np.asarray(stored["zero"]), axis, -1) if scheme == "asym" else None
  lead = codes.shape[:-1]
  k = codes.shape[-1] if scheme == "fp8" else codes.shape[-1] * 8 // bits
  out = np.zeros(lead + (k,), np.float32)
  for idx in np.ndindex(*lead):
    line = codes[idx] if scheme == "fp8" else unpack_bytes(codes[idx], bits)
    for j in range(k // group):
      out[idx][j * group:(j + 1) * group] = dequantize_group(
          line[j * group:(j + 1) * group], scale[idx + (j,)],
          None if zero is None else zero[idx + (j,)], bits, scheme)
  return np.moveaxis(out, -1, axis)
