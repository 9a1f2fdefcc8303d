"""A fault-injecting HTTP proxy on loopback in front of a real endpoint: every `fail_every`-th request is answered
with `status` (429 or 5xx) instead of being forwarded, the way an overloaded server or a gateway answers. The labeller
under test must retry those; everything else reaches the real server unchanged."""
from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request


class FlakyProxy:
    def __init__(self, upstream: str, *, fail_every: int = 3, status: int = 503):
        self.upstream = upstream.rstrip("/")
        self.fail_every, self.status = fail_every, status
        self.requests = self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.requests % proxy.fail_every == 0
                    proxy.failed += fail
                if fail:
                    payload = b'{"error": {"message": "injected fault", "type": "server_error"}}'
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                req = urllib.request.Request(proxy.upstream + self.path, data=body or None, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                try:
                    with urllib.request.urlopen(req, timeout=300) as r:
                        status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as err:
                    status, data, ctype = err.code, err.read(), err.headers.get("Content-Type", "application/json")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _relay

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
