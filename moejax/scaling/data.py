"""Tables for the fitter: read .csv/.csv.gz columns, safe row expressions.

`evaluate(expr, cols)` evaluates a small expression language elementwise over
columns, for `--where` filters and `--col VAR=expr` mappings. It parses with
`ast` and walks only: numbers, strings, column names, arithmetic (+ - * / **,
unary -), comparisons (chained too), and/or/not. Anything else (calls,
attributes, subscripts, lambdas, comprehensions...) is rejected before
evaluation, so no user code ever runs. Column names that are not identifiers
(`moe.num_experts`) are also reachable with non-identifier characters replaced
by `_` (`moe_num_experts`).
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import operator
import re
from collections.abc import Mapping

import numpy as np

Array = np.ndarray

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
        ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}


class ExprError(ValueError):
  """An expression outside the allowed language, or naming an unknown column."""


def alias(name: str) -> str:
  """Identifier form of a column name: non-identifier characters -> '_'."""
  s = re.sub(r"\W", "_", name.strip())
  return "_" + s if s and s[0].isdigit() else s


def read_table(path: str) -> dict[str, Array]:
  """Columns of a .csv or .csv.gz: float64 where every cell parses, else str.

  Empty cells in numeric columns become NaN.
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", newline="") as f:
    rows = list(csv.reader(io.StringIO(f.read())))
  if not rows:
    raise ValueError(f"{path}: empty file")
  header, body = rows[0], rows[1:]
  cols: dict[str, Array] = {}
  for j, name in enumerate(header):
    cells = [r[j] if j < len(r) else "" for r in body]
    try:
      cols[name] = np.array([float(c) if c.strip() else np.nan for c in cells])
    except ValueError:
      cols[name] = np.array(cells, dtype=object)
  return cols


def namespace(cols: Mapping[str, Array]) -> dict[str, Array]:
  """Columns by name plus identifier aliases (not overriding real names)."""
  ns = dict(cols)
  for k, v in cols.items():
    ns.setdefault(alias(k), v)
  return ns


def names_in(expr: str) -> set[str]:
  """Column names an expression refers to (after validating it)."""
  tree = _parse(expr)
  return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _parse(expr: str) -> ast.Expression:
  try:
    tree = ast.parse(expr.strip(), mode="eval")
  except SyntaxError as e:
    raise ExprError(f"cannot parse expression {expr!r}: {e.msg}") from None
  for node in ast.walk(tree):
    ok = isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp,
                           ast.Not, ast.USub, ast.UAdd, ast.BinOp, ast.Compare, ast.Name,
                           ast.Load, ast.Constant, *_BIN, *_CMP))
    if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str)):
      ok = False
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
      ok = False
    if not ok:
      raise ExprError(f"expression {expr!r}: {type(node).__name__} is not allowed "
                      "(only column names, numbers, strings, + - * / **, comparisons, "
                      "and/or/not)")
  return tree


def evaluate(expr: str, cols: Mapping[str, Array]) -> Array:
  """Evaluate `expr` elementwise over the columns `cols` (a `namespace`)."""
  tree = _parse(expr)

  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant):
      return node.value
    if isinstance(node, ast.Name):
      if node.id not in cols:
        raise ExprError(f"expression {expr!r}: unknown column {node.id!r}; "
                        f"columns: {sorted(cols)}")
      return cols[node.id]
    if isinstance(node, ast.BinOp):
      return _BIN[type(node.op)](_num(ev(node.left)), _num(ev(node.right)))
    if isinstance(node, ast.UnaryOp):
      v = ev(node.operand)
      if isinstance(node.op, ast.Not):
        return np.logical_not(_bool(v))
      return -_num(v) if isinstance(node.op, ast.USub) else _num(v)
    if isinstance(node, ast.BoolOp):
      vals = [_bool(ev(v)) for v in node.values]
      red = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
      out = vals[0]
      for v in vals[1:]:
        out = red(out, v)
      return out
    if isinstance(node, ast.Compare):
      left, out = ev(node.left), True
      for op, right in zip(node.ops, node.comparators):
        r = ev(right)
        out = np.logical_and(out, np.asarray(_CMP[type(op)](left, r), dtype=bool))
        left = r
      return out
    raise ExprError(f"expression {expr!r}: {type(node).__name__} is not allowed")

  return ev(tree)


def _num(v):
  if isinstance(v, str) or (isinstance(v, np.ndarray) and v.dtype == object):
    raise ExprError("arithmetic on a string column or value")
  return v


def _bool(v):
  return np.asarray(v, dtype=bool)
