"""The ``meshproxy`` command: run, worker (internal), demo, await, iptables."""

from __future__ import annotations

import argparse
import os
import sys

from proxy.config import EX_USAGE, ConfigError, parse

USAGE = """usage: meshproxy <command> [options]

commands:
  run [--config FILE.toml]     the proxy, configured by LINKERD2_PROXY_* variables
  demo [--duration S]          a proxy pair, an app and traffic on loopback
  await [--timeout T] [--port P] [--shutdown] -- CMD...
                               wait for /ready, run CMD, exit with its status
  iptables {install,remove,show} [--dry-run] ...
                               Linkerd's proxy-init rules for a pod namespace or a VM
  identity init --dir D        a trust anchor and issuer for a standalone mesh
  identity issue --dir D --name NAME --out O
                               a workload certificate (cert.pem, key.pem, roots.pem)
"""


def load_config(config_file: str | None) -> object:
    toml_text = None
    if config_file:
        try:
            with open(config_file) as f:
                toml_text = f.read()
        except OSError as exc:
            print(f"meshproxy: cannot read --config {config_file}: {exc}", file=sys.stderr)
            sys.exit(EX_USAGE)
    try:
        return parse(os.environ, toml_text)
    except ConfigError as exc:
        print(f"meshproxy: {exc}", file=sys.stderr)
        sys.exit(EX_USAGE)


def cmd_run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="meshproxy run")
    ap.add_argument("--config", help="TOML file with the standalone extras (environment wins)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    from proxy import log

    for name in config.unknown_variables:  # type: ignore[attr-defined]
        print(f"meshproxy: warning: unknown variable {name} is ignored", file=sys.stderr)
    from proxy.tls.identity import source_from_config

    if config.identity_disabled:  # type: ignore[attr-defined]
        print("meshproxy: WARNING: identity is disabled (MESHPROXY_IDENTITY_DISABLED=true): "
              "no mTLS, every connection between proxies is PLAINTEXT", file=sys.stderr)
    elif source_from_config(config) is None:
        print("meshproxy: no identity source: set LINKERD2_PROXY_IDENTITY_SVC_ADDR (Linkerd identity), "
              "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS (SPIRE), or MESHPROXY_IDENTITY_CERT_FILE and "
              "MESHPROXY_IDENTITY_KEY_FILE (files); or MESHPROXY_IDENTITY_DISABLED=true to run plaintext", file=sys.stderr)
        return EX_USAGE
    if config.workers == 1:  # type: ignore[attr-defined]
        from proxy.app import worker

        return worker.run(config)  # type: ignore[arg-type]
    from proxy import supervisor

    del log
    return supervisor.run(config)  # type: ignore[arg-type]


def cmd_worker(argv: list[str]) -> int:
    """Started by the supervisor; not for people."""
    from proxy.app import worker

    config = load_config(None)
    return worker.run(config, int(os.environ["MESHPROXY_WORKER_INDEX"]), os.environ["MESHPROXY_SUPERVISOR_SOCKET"])  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EX_USAGE
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "worker":
        return cmd_worker(rest)
    if command == "iptables":
        from proxy import iptables

        return iptables.main(rest)
    if command == "await":
        from proxy import await_ready

        return await_ready.main(rest)
    if command == "identity":
        from proxy import identity_cmd

        return identity_cmd.main(rest)
    if command == "demo":
        from proxy import demo

        return demo.main(rest)
    print(f"meshproxy: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return EX_USAGE
