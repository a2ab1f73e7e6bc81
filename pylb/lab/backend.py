"""The service every lab backend runs, on every VIP bound to its loopback:

- HTTP on port 80: a JSON body naming the backend and the client address it
  saw (DSR leaves the client's address intact);
- an echo on port 7 that first sends one line with the backend's name, then
  returns every byte it receives, so a client learns which backend holds
  its connection and can check every byte of the stream.

Run inside a backend namespace: python -m pylb.lab.backend NAME VIP [VIP...]
It prints "ready" once every socket listens.
"""
from __future__ import annotations

import http.server
import json
import socket
import socketserver
import sys
import threading

HTTP_PORT, ECHO_PORT = 80, 7


def serve(name: str, vips: list[str]) -> list[socketserver.BaseServer]:
    class Web(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"backend": name, "peer": list(self.client_address[:2])}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # thousands of requests: no log per request
            pass

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            # An idle client is not an error, but a connection the balancer
            # moved elsewhere must not hold a thread for ever.
            self.request.settimeout(120)
            self.request.sendall(name.encode() + b"\n")
            try:
                while data := self.request.recv(65536):
                    self.request.sendall(data)
            except OSError:
                pass  # reset or timed out: the client's report says which

    servers = []
    for vip in vips:
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        for port, handler, base in ((HTTP_PORT, Web, http.server.ThreadingHTTPServer),
                                    (ECHO_PORT, Echo, socketserver.ThreadingTCPServer)):
            cls = type("Server", (base,), {"address_family": family, "daemon_threads": True,
                                           "allow_reuse_address": True,
                                           "request_queue_size": 512})
            servers.append(cls((vip, port), handler))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


def main(argv: list[str]) -> None:
    serve(argv[0], argv[1:])
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
