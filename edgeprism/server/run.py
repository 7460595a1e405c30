"""Running the app with uvicorn: in the foreground (`edgeprism serve`) or on a background thread of
a desktop app (`BackgroundServer`), which is also how the tests start the real server."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from edgeprism.api import Engine
from edgeprism.server.app import create_app

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          **app_options: Any) -> None:
    """Serve `engine` until interrupted (Ctrl-C or SIGTERM); `app_options` go to `create_app`."""
    if not is_loopback(host):
        log.warning("listening on %s: the server has no authentication, so anyone who can reach this address "
                    "can use the model.", host)
    config = uvicorn.Config(create_app(engine, **app_options), host=host, port=port, log_level=log_level)
    uvicorn.Server(config).run()


class BackgroundServer:
    """The server on a daemon thread of this process, on a loopback port (0 = a free one).

    `url` is its base address ("http://127.0.0.1:PORT"); `stop()` shuts it down gracefully. Usable
    as a context manager. The engine stays the caller's to close.
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, **app_options: Any) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(create_app(engine, **app_options), log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="edgeprism-server", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        """Start serving; returns once the server accepts connections (RuntimeError if it cannot)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}; see the log.")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
