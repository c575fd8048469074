"""The data plane: the relay, UDP flows, the dialer, listening sockets, the connection log, the
shared store; every connection is given a `context.DataPlane`, never the runtime."""
