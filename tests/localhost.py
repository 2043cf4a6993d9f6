"""What the multi-worker tests share: free ports on this machine for a cluster on localhost."""

import socket


def free_ports(count):
    """`count` TCP ports that were free a moment ago (bound, read, released)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
