"""
Times as the admin CLI and the control shell write them: L{accesstunnel.timetext}, which
the agent shares (one copy of the formatter; this name is kept for groundcontrol's modules).
"""

from __future__ import annotations

from accesstunnel.timetext import absoluteTime, isoTime, relativeTime, whenText

__all__ = ["absoluteTime", "isoTime", "relativeTime", "whenText"]
