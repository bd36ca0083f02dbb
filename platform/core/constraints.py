"""Rejection rules between sweep parameters, e.g. `model.dim * model.depth <= 4096`.

A rule is a Python-syntax expression over dotted config keys, numbers, arithmetic, comparisons,
`and`/`or`/`not`, `in`, and `len()`. It is parsed with `ast` and evaluated over a whitelist of
node types: no names other than config keys, no calls other than len/min/max, no attributes.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_FUNCS: dict[str, Callable[..., Any]] = {"len": len, "min": min, "max": max, "sum": sum}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def compile_rule(rule: str) -> ast.Expression:
    """Parse a rule; ValueError names what is not allowed."""
    try:
        tree = ast.parse(rule, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {rule!r}: {e.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
                raise ValueError(f"{rule!r}: only {', '.join(_FUNCS)} may be called")
        elif not isinstance(
            node,
            (
                ast.Expression,
                ast.BoolOp,
                ast.And,
                ast.Or,
                ast.UnaryOp,
                ast.Not,
                ast.USub,
                ast.UAdd,
                ast.BinOp,
                ast.Compare,
                ast.Constant,
                ast.Name,
                ast.Attribute,
                ast.Load,
                ast.List,
                ast.Tuple,
                *_BINOPS,
                *_CMPOPS,
            ),
        ):
            raise ValueError(f"{rule!r}: {type(node).__name__} is not allowed in a rule")
    return tree


def evaluate_rule(rule: str, config: dict[str, Any]) -> bool:
    """True when `config` (a nested mapping) satisfies the rule."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            key = _dotted(node)
            value: Any = config
            for part in (key or "").split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(f"rule {rule!r}: unknown config key {key!r}")
                value = value[part]
            return value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BoolOp):
            values = (ev(v) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            return (not v) if isinstance(node.op, ast.Not) else (-v if isinstance(node.op, ast.USub) else v)
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare):
            left = ev(node.left)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = ev(comp)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):  # compile_rule allows only names
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"rule {rule!r}: {type(node).__name__} is not allowed")

    return bool(ev(compile_rule(rule)))


def violated(rules: list[str], config: dict[str, Any]) -> str | None:
    """The first rule `config` breaks, or None."""
    for rule in rules:
        if not evaluate_rule(rule, config):
            return rule
    return None
