"""The benchmark harness behind ``bench/run.py``.

Theory of operation: a *scenario* (``scenarios.py``) starts a backend (iperf3 server,
nginx), then walks its list of *paths* (direct, meshproxy, haproxy, nginx) from the load
generator to that backend. For each path it starts the proxy (``servers.py``), meters the
proxy's process tree (``procs.py``), drives one bounded load (``loads.py``) and stops
everything it started by PID. ``report.py`` turns the rows into JSON, Markdown and a PNG.

Nothing here listens on or connects to anything but 127.0.0.1 / ::1.
"""
