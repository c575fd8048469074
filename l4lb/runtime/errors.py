"""The runtime's two errors, raised by start and reload and caught by whoever runs them (the
CLI, a worker, the admin API's reload)."""


class StartupError(Exception):
    """The balancer cannot start (a port it cannot bind, say); the message is one line."""


class AsTree(StartupError):
    """An upgrade's new process with `workers: 1` taking over from a tree of workers: it runs
    as a supervisor of one worker instead (cli.py), so that the tree's sockets stay a group."""

    def __init__(self) -> None:
        super().__init__("the previous l4lb runs workers: this one runs as a tree of one")


class ReloadError(Exception):
    """A reload was refused and nothing changed; `lines` say why. `partial`: with workers, some
    applied it and some did not (stopped, say), and `lines` say which."""

    def __init__(self, lines: list[str], partial: bool = False) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.partial = partial


class UpgradeError(Exception):
    """The upgrade did not happen; the old process serves on. The message says why."""
