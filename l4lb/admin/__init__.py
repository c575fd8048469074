"""The control plane: the admin API, /metrics, the status page, the workers' front API and `l4lb
ctl`. It reads the process through `view.Balancer`; aiohttp loads only when it is configured."""
