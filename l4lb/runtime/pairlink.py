"""The HA pair's link: calls to the peer's admin API (runtime/pair.py), with this host's admin
token (the peer takes the same one), bounded in time and in what the answer may hold."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..config.files import read_text
from ..core.spec import HaSpec

MAX_ANSWER = 1 << 20  # bytes: the peer's answers are a few lines of JSON


class LinkError(Exception):
    """The peer could not be reached, or refused: the message says which and why."""


class PeerLink:
    def __init__(self, spec: HaSpec, token_file: str) -> None:
        host = f"[{spec.peer_host}]" if ":" in spec.peer_host else spec.peer_host
        self.base = f"http://{host}:{spec.peer_port}"
        self.token_file = token_file

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, within: float = 5.0
    ) -> dict[str, Any]:
        """The peer's answer to `method path` (with `body` as JSON): a JSON object."""
        import aiohttp  # (loaded with the admin API: an HA pair has one)

        try:
            token = (await asyncio.to_thread(read_text, self.token_file, 4096)).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise LinkError(f"cannot read the admin token {self.token_file}: {exc}") from None
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=within)) as session,
                session.request(method, self.base + path, data=data, headers=headers) as answer,
            ):
                raw = await answer.content.read(MAX_ANSWER + 1)
                status = answer.status
        except TimeoutError:
            raise LinkError(f"the peer {self.base} did not answer {path} in {within:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise LinkError(f"the peer {self.base}: {exc}") from None
        try:
            parsed = json.loads(raw) if len(raw) <= MAX_ANSWER else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise LinkError(f"the peer {self.base} answered {path} with no JSON object ({status})")
        if status != 200:
            why = str(parsed.get("error", ""))[:300]
            raise LinkError(f"the peer refused {path} ({status}): {why}")
        return parsed
