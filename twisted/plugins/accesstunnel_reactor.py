from twisted.application.reactors import Reactor

accesstunnelEpoll = Reactor(
    "accesstunnel-epoll",
    "accesstunnel.reactor",
    "epoll, dispatching each event without the legacy log context (Access Tunnel)",
)
