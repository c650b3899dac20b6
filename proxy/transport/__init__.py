"""Sockets: listeners, original destination, connect, and the opaque relay."""
