"""A real backend process for end-to-end tests: HTTP, HTTPS (the demo certificate) and a TCP
echo port, each optional. Every HTTP answer is the server's name. Prints 'ready' when bound.

    python -m tests.support.backend_server --name web1 --http 127.0.0.1:18081 --https 127.0.0.1:18441
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TLS = Path(__file__).resolve().parents[2] / "l4lb" / "demo_tls"


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--http")
    ap.add_argument("--https")
    ap.add_argument("--echo")
    ap.add_argument(
        "--udp", action="append", default=[], help="answers NAME, a space, the datagram"
    )
    args = ap.parse_args()
    name = args.name.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(name) + 1))
            self.end_headers()
            self.wfile.write(name + b"\n")

        def log_message(self, *a: object) -> None:
            pass

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            s: socket.socket = self.request
            while data := s.recv(1 << 20):
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)

    servers: list[socketserver.BaseServer] = []
    # A real server's backlog (nginx 511, HAProxy's maxconn), not socketserver's 5: clients held
    # back by an upgrade come at once, and a full backlog drops SYNs (a second's retry each)
    for kind in (ThreadingHTTPServer, socketserver.ThreadingTCPServer):
        kind.request_queue_size = 1024
    if args.http:
        servers.append(ThreadingHTTPServer(addr(args.http), Handler))
    if args.https:
        srv = ThreadingHTTPServer(addr(args.https), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        servers.append(srv)
    if args.echo:
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        servers.append(socketserver.ThreadingTCPServer(addr(args.echo), Echo))
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    for where in args.udp:
        host, port = addr(where)
        udp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, port))
        threading.Thread(target=_answer, args=(udp, name), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # run until the test closes our stdin or kills us


def _answer(sock: socket.socket, name: bytes) -> None:
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(name + b" " + data, peer)


if __name__ == "__main__":
    main()
