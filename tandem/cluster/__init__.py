"""The cluster: gateway, router, worker placement on Ray, and the serve config."""
