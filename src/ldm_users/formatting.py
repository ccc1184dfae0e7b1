"""How a number is written for people (tables, messages, log lines, the model card): one convention.

Log lines use `%.3g` (3 significant digits) directly; `fmt` is the table cell, `round_sig` a number kept as a number
(YAML/JSON written for people, e.g. the model card's model-index).
"""

from __future__ import annotations

import math


def fmt(value, digits: int = 4, missing: str = "-") -> str:
    """A table cell: `missing` for None/NaN, yes/no for booleans, integers with thousands separators (parameter
    counts are compared exactly), floats to `digits` significant digits (from 1000 on: whole, with separators,
    never `1.235e+04`), and text with '|' escaped so it cannot break a markdown table."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def round_sig(value: float, digits: int = 3) -> float:
    """`value` to `digits` significant digits, as a number (1.3045632 -> 1.3; 12345.6 -> 12300.0)."""
    return float(f"{float(value):.{digits}g}")
