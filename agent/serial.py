"""
The board's serial number, as the device itself knows it.

Single-board computers expose it in different places: the Raspberry Pi in
/proc/cpuinfo, device-tree boards under /sys/firmware/devicetree, PCs in DMI.
/etc/machine-id is the last resort: not a hardware serial, but stable for the
life of the installation. The first non-empty, plausible value wins; the
agent's --serial flag overrides all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

#: Values that firmware uses to mean "no serial".
_PLACEHOLDERS = {
    "",
    "0",
    "0000000000000000",
    "none",
    "default string",
    "to be filled by o.e.m.",
    "not specified",
    "system serial number",
    "123456789",
}


def _cpuinfoSerial(text: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "serial":
            return value.strip()
    return None


def _plain(text: str) -> str:
    return text.replace("\x00", "").strip()


#: (path, how to read the serial out of its text), in order of preference.
SOURCES: tuple[tuple[str, Callable[[str], str | None]], ...] = (
    ("/proc/cpuinfo", _cpuinfoSerial),
    ("/sys/firmware/devicetree/base/serial-number", _plain),
    ("/sys/class/dmi/id/product_serial", _plain),
    ("/etc/machine-id", _plain),
)


def _plausible(value: str | None) -> str | None:
    if value is None:
        return None
    value = "".join(c for c in value if c.isprintable()).strip()[:128]
    if value.lower() in _PLACEHOLDERS or set(value) <= {"0"}:
        return None
    return value


def readSerial(root: Path = Path("/"), sources: tuple = SOURCES) -> str | None:
    """The first plausible serial from C{sources}, read below C{root}."""
    for path, extract in sources:
        try:
            text = (root / path.lstrip("/")).read_text(errors="replace")
        except OSError:
            continue
        serial = _plausible(extract(text))
        if serial:
            return serial
    return None
