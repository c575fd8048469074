"""Health checks: one probe of each kind, and the monitor that runs them and feeds the routers."""
