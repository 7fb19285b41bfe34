"""Shared plotting helpers: figures built without pyplot (Agg canvas), saved as PNG."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
  """A Figure detached from pyplot (no global state; notebooks still display it)."""
  return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, path: str | None) -> Figure:
  """Write `fig` as PNG to `path` (directories created) when given; return it."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
  return fig


def heatmap(ax, m_HxW: np.ndarray, *, xlabel: str, ylabel: str, title: str,
            yticks: list[str] | None = None, xticks: list[str] | None = None,
            cmap: str = "viridis", **kw) -> None:
  """An annotated-axis image of a matrix with a colour bar."""
  im = ax.imshow(m_HxW, aspect="auto", interpolation="nearest", cmap=cmap, **kw)
  ax.figure.colorbar(im, ax=ax)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if yticks is not None:
    ax.set_yticks(range(len(yticks)), yticks, fontsize=7 if len(yticks) > 16 else None)
  if xticks is not None:
    ax.set_xticks(range(len(xticks)), xticks, fontsize=7 if len(xticks) > 16 else None)


def token_label(token_id: int) -> str:
  """Printable label of a byte-level token id (BOS/EOS named, control bytes as hex)."""
  if token_id == 256:
    return "<bos>"
  if token_id == 257:
    return "<eos>"
  if 33 <= token_id < 127:
    return chr(token_id)
  return {32: "␣", 10: "\\n"}.get(token_id, f"0x{token_id:02x}")
