"""
The ways SSH gets between an agent and groundcontrol: TLS, WebSocket, HTTP CONNECT
proxies, Tor, and a bound on concurrent handshakes.

Each module builds ordinary Twisted endpoints or factory wrappers, so the SSH code above
never knows which transport carries it; L{accesstunnel.addresses} turns the URLs people
write into these pieces.
"""
