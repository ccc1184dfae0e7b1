"""How a number is written in a printed table or message (ldm-report, ldm-bench, ldm-eval): one convention."""

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
