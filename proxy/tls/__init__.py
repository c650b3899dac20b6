"""This proxy's identity and TLS: credentials, sources, CA, inbound termination."""
