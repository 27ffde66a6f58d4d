"""A fault-injecting HTTP proxy in front of a real S3 endpoint (the moto server).

Every `every`-th request of each HTTP method fails instead of reaching S3, in turns: a 503
SlowDown, a 500 InternalError, and a connection closed without an answer — what S3 and the
networks in front of it do under load. All other requests pass through unchanged, so the
job talks to a real S3 implementation and only the failures are made up. With `every=None`
nothing fails, and the proxy only counts what is asked of S3 (`requests`).
"""
from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal_error", "disconnect")
ERROR_BODY = ("<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
              "<Message>injected by the test proxy</Message></Error>")
# Headers that describe one hop's connection, not the request.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class FaultyS3:
    def __init__(self, upstream: str, every: int | None = 3):
        self.upstream = urlsplit(upstream)
        self.every = every
        self.seen: Counter[str] = Counter()  # requests per method, failed or not
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, path without query)
        self.injected: Counter[tuple[str, str]] = Counter()  # (method, fault) -> count
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultyS3":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def injected_for(self, method: str) -> int:
        return sum(n for (m, _), n in self.injected.items() if m == method)

    def next_fault(self, method: str, path: str = "") -> str | None:
        with self._lock:
            self.seen[method] += 1
            self.requests[(method, urlsplit(path).path)] += 1
            n = self.seen[method]
            if self.every is None or n % self.every:
                return None
            fault = FAULTS[(n // self.every) % len(FAULTS)]
            self.injected[(method, fault)] += 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

            def log_message(self, *args) -> None:  # quiet: the test's output is for the test
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy.next_fault(self.command, self.path)
                if fault == "disconnect":
                    self.close_connection = True
                    return
                if fault:
                    status, code = (503, "SlowDown") if fault == "slowdown" else (500, "InternalError")
                    payload = ERROR_BODY.format(code=code).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                up.request(self.command, self.path, body=body, headers=headers)
                reply = up.getresponse()
                payload = reply.read()
                self.send_response(reply.status, reply.reason)
                # A HEAD answer's Content-Length is the object's size, not this reply's.
                own_length = self.command != "HEAD"
                for key, value in reply.getheaders():
                    if key.lower() not in HOP_HEADERS and not (own_length and key.lower() == "content-length"):
                        self.send_header(key, value)
                if own_length:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                up.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        return Handler
