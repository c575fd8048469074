"""`workers: N`: the supervisor, its workers and the control channel between them."""
