"""
Which devices are connected now: soft state, rebuilt as agents reconnect.

A device has at most one routable link. When a device connects again while
its old link is still registered (a half-open TCP connection the server has
not noticed yet), the new link replaces the old one and the old one is
closed: the device just proved it is on the new one.

Links of devices still waiting for approval are kept apart, by key
fingerprint, and are never routable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger

if TYPE_CHECKING:
    from groundcontrol.forwarding import RemoteForwards


class Link(Protocol):
    """
    What the registry, and those who look links up in it, need of a device's
    live connection (L{groundcontrol.avatars.DeviceLink}).
    """

    deviceName: str
    fingerprint: str
    #: The agent's avatar: promoted when a pending device is approved.
    avatar: Any
    #: The SSH connection to the agent: channels and global requests go over it.
    conn: Any
    #: The remote forwards operators hold on the device.
    remoteForwards: RemoteForwards
    #: When it connected (the clock's seconds).
    connectedAt: float

    def close(self, reason: str) -> None: ...


class Registry:
    """Live device links by name, and pending ones by key fingerprint."""

    _log = Logger()

    def __init__(self) -> None:
        self._routable: dict[str, Link] = {}
        self._pending: dict[str, Link] = {}
        #: The sessions over these links (a L{groundcontrol.sessions.SessionRegistry}),
        #: set by L{groundcontrol.sessions.attachSessions}.
        self.sessions: Any = None
        #: Channel opens waiting for devices to reconnect (a
        #: L{groundcontrol.devicewait.DeviceWaits}), told of every link that attaches.
        self.waits: Any = None

    def attach(self, link: Link) -> None:
        """Make C{link} the route to its device, replacing any older link."""
        old = self._routable.get(link.deviceName)
        self._routable[link.deviceName] = link
        self._pending.pop(link.fingerprint, None)
        if old is not None and old is not link:
            self._log.info(
                "device {device} reconnected; closing its previous link", device=link.deviceName
            )
            old.close("replaced by a newer connection from the same device")
        if self.waits is not None:
            self.waits.linkAttached(link.deviceName)

    def attachPending(self, link: Link) -> None:
        """Hold C{link} until its key is approved; it is not routable."""
        old = self._pending.get(link.fingerprint)
        self._pending[link.fingerprint] = link
        if old is not None and old is not link:
            old.close("replaced by a newer connection with the same key")

    def detach(self, link: Link) -> None:
        """Forget C{link} if it is still the registered one."""
        if self._routable.get(link.deviceName) is link:
            del self._routable[link.deviceName]
        if self._pending.get(link.fingerprint) is link:
            del self._pending[link.fingerprint]

    def lookup(self, deviceName: str) -> Link | None:
        """The live link of a routable device, or None."""
        return self._routable.get(deviceName)

    def pendingFor(self, fingerprint: str) -> Link | None:
        """The waiting link of a device with this key, if connected."""
        return self._pending.get(fingerprint)

    def drop(self, deviceName: str, reason: str) -> bool:
        """Close a device's live link (revocation). True if there was one."""
        link = self._routable.pop(deviceName, None)
        if link is None:
            return False
        link.close(reason)
        return True

    def pendingFingerprints(self) -> list[str]:
        """The key fingerprints of the devices waiting for approval that are connected now."""
        return list(self._pending)

    def pendingCount(self) -> int:
        """How many devices waiting for approval are connected now."""
        return len(self._pending)

    def connectedNames(self) -> list[str]:
        """Names of the devices routable now."""
        return sorted(self._routable)

    def __len__(self) -> int:
        return len(self._routable)
