"""`l4lb quic-lb key PATH`: a new QUIC-LB key file (16 random octets as 32 hex digits, mode 0600),
the form `quic_lb.key_file` reads, for l4lb and the QUIC servers behind it to share."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("quic-lb", help="QUIC-LB: make a key file")
    qs = q.add_subparsers(dest="quic_command", required=True, metavar="{key}")
    key = qs.add_parser("key", help="write a new AES-128 key file (0600) for quic_lb.key_file")
    key.add_argument("path", help="the file to write")
    key.add_argument("--force", action="store_true", help="replace a file that exists")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    text = secrets.token_bytes(16).hex() + "\n"
    tmp = path.with_name(f".{path.name}.new")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if args.force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # (fails if the path exists: a key in use is never replaced)
            os.unlink(tmp)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        why = exc.strerror or str(exc)
        hint = " (--force replaces it)" if isinstance(exc, FileExistsError) else ""
        print(f"l4lb quic-lb key: cannot write {path}: {why}{hint}", file=sys.stderr)
        return 1
    print(
        f"wrote a new QUIC-LB key to {path} (mode 0600). Name it in the group's quic_lb.key_file,"
        " give the QUIC servers behind l4lb the same key, and reload l4lb."
    )
    return 0
