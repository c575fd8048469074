"""A real FTP backend for the FTP recipe tests: pyftpdlib, anonymous read-only, with a passive
port range and the address to advertise (the balancer's). Prints 'ready' when listening.

    python -m tests.support.ftp_server --listen 127.0.0.2:2121 --passive 23000-23019 \
        --masquerade 127.0.0.1 --root DIR
"""

from __future__ import annotations

import argparse
import logging

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--passive", required=True, help="first-last")
    ap.add_argument("--masquerade", required=True, help="the address clients reach (l4lb's)")
    ap.add_argument("--root", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    host, _, port = args.listen.rpartition(":")
    first, _, last = args.passive.partition("-")
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(args.root)
    handler = FTPHandler
    handler.authorizer = authorizer
    handler.passive_ports = range(int(first), int(last) + 1)
    handler.masquerade_address = args.masquerade
    server = FTPServer((host, int(port)), handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
