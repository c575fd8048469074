"""The pure core: keys, the affinity table, schedulers, routing, health state, the configuration's
types. No sockets, no event loop; every clock is injected (docs/architecture.md)."""
