from twisted.application.service import ServiceMaker

tunnelAgent = ServiceMaker(
    "tunnel-agent",
    "agent.tap",
    "Access Tunnel device agent: keeps one link to groundcontrol and serves sessions",
    "tunnel-agent",
)
