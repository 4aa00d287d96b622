from twisted.application.service import ServiceMaker

groundcontrol = ServiceMaker(
    "groundcontrol",
    "groundcontrol.tap",
    "Access Tunnel server: relays operators' SSH sessions to device agents",
    "groundcontrol",
)
