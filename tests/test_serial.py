"""The agent finds the board serial where each kind of board keeps it."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from agent.serial import readSerial


class ReadSerialTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def test_raspberryPiCpuinfo(self) -> None:
        """A Raspberry Pi's Serial line in /proc/cpuinfo wins over everything else."""
        self.write("/proc/cpuinfo", "processor\t: 0\nSerial\t\t: 10000000abcdef01\nModel\t: Pi\n")
        self.write("/etc/machine-id", "f" * 32 + "\n")
        self.assertEqual(readSerial(self.root), "10000000abcdef01")

    def test_deviceTreeWithNul(self) -> None:
        """The device-tree serial ends in NUL, which is dropped."""
        self.write("/proc/cpuinfo", "processor\t: 0\n")
        self.write("/sys/firmware/devicetree/base/serial-number", "ABC123\x00")
        self.assertEqual(readSerial(self.root), "ABC123")

    def test_placeholdersSkipped(self) -> None:
        """Firmware placeholders ('To be filled by O.E.M.', zeros) do not count as serials."""
        self.write("/proc/cpuinfo", "Serial : 0000000000000000\n")
        self.write("/sys/class/dmi/id/product_serial", "To be filled by O.E.M.\n")
        self.write("/etc/machine-id", "0123456789abcdef0123456789abcdef\n")
        self.assertEqual(readSerial(self.root), "0123456789abcdef0123456789abcdef")

    def test_nothingFound(self) -> None:
        """With no source readable, there is no serial (the flag must supply one)."""
        self.assertIsNone(readSerial(self.root))

    def test_controlCharactersStripped(self) -> None:
        """A serial is printable text of bounded length."""
        self.write("/sys/class/dmi/id/product_serial", "SN\x1b[31m42" + "x" * 300)
        serial = readSerial(self.root)
        assert serial is not None
        self.assertTrue(serial.startswith("SN[31m42"))
        self.assertEqual(len(serial), 128)
