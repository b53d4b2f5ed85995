"""Helpers for the engine's tests (no tests here): a scripted HTTP server and a forwarding proxy.

The scripted server stands in for a manager only where the real one cannot misbehave
on purpose (malformed answers, 4xx/5xx, a short outage of keep-alives); the proxy
sits in front of the real manager to change what the engine sees.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

# handler(route, fields) -> (status, body): body is JSON-encoded unless it is bytes
Handler = Callable[[str, dict[str, Any]], tuple[int, Any]]


class ScriptedServer:
    """A real HTTP server on loopback whose answers a test decides."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[tuple[float, str, dict[str, Any], dict[str, str]]] = []
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _serve(self):
                parts = urlsplit(self.path)
                fields: dict[str, Any] = {k: v[0] for k, v in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    fields.update(json.loads(self.rfile.read(length)))
                outer.requests.append((time.monotonic(), parts.path, fields, dict(self.headers)))
                status, body = outer.handler(parts.path, fields)
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def routes(self, route: str) -> list[dict[str, Any]]:
        return [fields for _, path, fields, _ in self.requests if path == route]


def forwarder(upstream: str, rewrite: Callable[[str, dict[str, Any], Any], Any] | None = None
              ) -> Handler:
    """A handler that forwards GET/POST to `upstream` (optionally rewriting the answer)."""

    def handle(route: str, fields: dict[str, Any]) -> tuple[int, Any]:
        data = json.dumps(fields).encode()
        req = urllib.request.Request(upstream + route, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, body = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            status, body = err.code, json.loads(err.read())
        if rewrite is not None and status == 200:
            body = rewrite(route, fields, body)
        return status, body

    return handle
