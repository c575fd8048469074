"""The runtime's two errors, raised by start and reload and caught by whoever runs them (the
CLI, a worker, the admin API's reload)."""


class StartupError(Exception):
    """The balancer cannot start (a port it cannot bind, say); the message is one line."""


class ReloadError(Exception):
    """A reload was refused and nothing changed; `lines` say why."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
