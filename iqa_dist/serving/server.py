"""Listening: the socket is bound before the models load (a port in use is one line at once), and
uvicorn serves the app on it until SIGINT or SIGTERM, finishing the requests in flight.
"""

from __future__ import annotations

import socket

from ..errors import UserError


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: one the OS picks); a UserError naming them when it
    cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                        "another server may hold the port (--port 0 picks a free one)") from None


def address(sock: socket.socket) -> str:
    """http://HOST:PORT of a listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(app, sock: socket.socket, access_log: bool = False) -> None:
    """Serves `app` on `sock` until the process is told to stop (uvicorn's graceful shutdown)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, access_log=access_log, log_level="info")).run(sockets=[sock])
