"""One process's lifecycle: the server that composes the rooms, its listeners, state file, read
models, reload and sweeps."""
