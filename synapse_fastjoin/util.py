"""Small helpers with no dependency beyond the standard library (the admin
CLI imports them without Synapse installed)."""

import math


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when unknown (for the progress
    line and the admin CLI alike)."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
