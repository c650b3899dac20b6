"""meshproxy: a service-mesh data-plane proxy, drop-in compatible with linkerd2-proxy."""

__version__ = "0.1.0"
