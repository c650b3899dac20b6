"""``meshproxy iptables install|remove|show``: the proxy-init rules for a pod or VM.

Theory of operation
-------------------
Linkerd's proxy-init (reference section 1.4) makes every TCP connection into and
out of a network namespace pass through the proxy by installing NAT REDIRECT rules:

* ``PREROUTING -> PROXY_INIT_REDIRECT``: connections arriving from outside go to the
  inbound listener (4143), except skipped ports and subnets.
* ``OUTPUT -> PROXY_INIT_OUTPUT``: connections the namespace opens go to the
  outbound listener (4140), except the proxy's own (by uid/gid), loopback, and
  skipped ports.  Exempting the proxy's uid is what stops the proxy from
  redirecting its own upstream connections back to itself.

The listeners then read ``SO_ORIGINAL_DST`` to learn where the connection was going.

This module is split in two, like a sans-IO protocol core and its driver:

* pure functions (``parse_port_set``, ``build_rules``, ``install_commands``,
  ``removal_commands``, ``proxy_init_lines``) turn settings into rules and
  ``iptables`` argv lists, and ``iptables -S`` text into the commands that undo
  them.  They need no root and are what the unit tests exercise;
* a small runner executes those argv lists with :mod:`subprocess`.

Every rule carries ``-m comment --comment proxy-init/<name>`` so the rules can be
recognised (``show``) and so they read the same as the ones Linkerd installs.

``install`` is idempotent: it first removes whatever proxy-init chains and jumps
already exist, then installs the new set, so running it twice (or with a changed
configuration) leaves exactly one current rule set.  If an install command fails,
the half-installed rules are removed again before the error is reported.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

# --- names and defaults ---------------------------------------------------------

TABLE = "nat"
# Chain names are Linkerd's, so `iptables -S` on a meshproxy pod matches a Linkerd pod.
REDIRECT_CHAIN = "PROXY_INIT_REDIRECT"
OUTPUT_CHAIN = "PROXY_INIT_OUTPUT"
PROXY_INIT_CHAINS = (REDIRECT_CHAIN, OUTPUT_CHAIN)
# Built-in chain each of ours is jumped to from, with the jump rule's comment name.
JUMPS = (
    ("PREROUTING", REDIRECT_CHAIN, "install-proxy-init-prerouting"),
    ("OUTPUT", OUTPUT_CHAIN, "install-proxy-init-output"),
)
COMMENT_PREFIX = "proxy-init/"

# Linkerd chart value proxy.uid: the proxy runs as 2102, the app must not.
DEFAULT_PROXY_UID = 2102
# Linkerd proxy defaults for the inbound and outbound listeners (reference 1.1).
DEFAULT_INBOUND_PROXY_PORT = 4143
DEFAULT_OUTBOUND_PROXY_PORT = 4140
# The chart passes the proxy's own tap (4190) and admin (4191) ports plus
# proxyInit.ignoreInboundPorts (4567,4568: the policy controller's admission and
# metrics ports), so kubelet probes and scrapes reach the admin server directly.
DEFAULT_INBOUND_PORTS_TO_IGNORE = "4190,4191,4567,4568"
# proxyInit.ignoreOutboundPorts default in the Linkerd chart.
DEFAULT_OUTBOUND_PORTS_TO_IGNORE = "4567,4568"
# xt_multiport accepts at most 15 port "slots" per rule, and a range a:b uses
# two of them (iptables: "too many ports specified"), so chunks are weighed.
MULTIPORT_MAX_SLOTS = 15

# Largest uid/gid the kernel accepts ((uid_t)-1 is reserved as "no id").
MAX_ID = 2**32 - 2

EXIT_OK = 0
EXIT_FAILED = 1  # an iptables command failed or could not be run
EXIT_USAGE = 2  # bad arguments (argparse uses 2 as well)

Command = tuple[str, ...]


class UsageError(ValueError):
    """A setting that cannot be turned into rules (bad port, subnet, uid...)."""


# --- settings -------------------------------------------------------------------


@dataclass(frozen=True)
class PortRange:
    """One entry of a Linkerd port set: a single port (first == last) or a range."""

    first: int
    last: int

    @property
    def slots(self) -> int:
        """How many of multiport's 15 slots this entry uses."""
        return 1 if self.first == self.last else 2

    def iptables(self) -> str:
        """The entry as iptables writes it (``25`` or ``4000:4100``)."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


@dataclass(frozen=True)
class Settings:
    """Everything that decides the rule set; built by :func:`settings_from_args`."""

    proxy_uid: int = DEFAULT_PROXY_UID
    proxy_gid: int | None = None
    inbound_proxy_port: int = DEFAULT_INBOUND_PROXY_PORT
    outbound_proxy_port: int = DEFAULT_OUTBOUND_PROXY_PORT
    inbound_ports_to_ignore: tuple[PortRange, ...] = field(
        default_factory=lambda: parse_port_set(DEFAULT_INBOUND_PORTS_TO_IGNORE)
    )
    outbound_ports_to_ignore: tuple[PortRange, ...] = field(
        default_factory=lambda: parse_port_set(DEFAULT_OUTBOUND_PORTS_TO_IGNORE)
    )
    subnets_to_ignore: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Empty: redirect every inbound port ("redirect-all" mode); otherwise only these.
    ports_to_redirect: tuple[PortRange, ...] = ()
    ipv6: bool = True
    iptables_cmd: str = "iptables"
    ip6tables_cmd: str = "ip6tables"

    def binaries(self) -> list[tuple[int, str]]:
        """(IP version, binary) for every family the rules are installed for."""
        out = [(4, self.iptables_cmd)]
        if self.ipv6:
            out.append((6, self.ip6tables_cmd))
        return out


def parse_port(text: str) -> int:
    """A TCP port number, 1..65535."""
    try:
        port = int(text.strip(), 10)
    except ValueError:
        raise UsageError(f"invalid port {text.strip()!r}: not a number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"invalid port {port}: must be between 1 and 65535")
    return port


def parse_port_set(text: str) -> tuple[PortRange, ...]:
    """Parse Linkerd port-set syntax (``25,587,4000-4100``) keeping ranges intact.

    Order is kept (rules are emitted in the order given) and exact duplicates are
    dropped.  An empty string is the empty set.
    """
    out: list[PortRange] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "-" in item:
            lo_text, _, hi_text = item.partition("-")
            lo, hi = parse_port(lo_text), parse_port(hi_text)
            if lo > hi:
                raise UsageError(f"invalid port range {item!r}: {lo} is greater than {hi}")
        else:
            lo = hi = parse_port(item)
        entry = PortRange(lo, hi)
        if entry not in out:
            out.append(entry)
    return tuple(out)


def parse_subnets(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated CIDRs; host bits are tolerated (``10.1.2.3/8`` -> ``10.0.0.0/8``)."""
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise UsageError(f"invalid subnet {item!r}: {exc}") from None
        if net not in out:
            out.append(net)
    return tuple(out)


def parse_bool(text: str) -> bool:
    """Go-flag style booleans, as proxy-init accepts them (``--ipv6=false``)."""
    value = text.strip().lower()
    if value in ("true", "t", "1", "yes"):
        return True
    if value in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true or false)")


def ip6tables_for(iptables_cmd: str) -> str:
    """The IPv6 twin of an iptables binary: iptables-legacy -> ip6tables-legacy."""
    head, base = os.path.split(iptables_cmd)
    if base.startswith("iptables"):
        base = "ip6tables" + base[len("iptables") :]
    return os.path.join(head, base) if head else base


# --- rules (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One ``-A`` rule: matches, then the comment, then the target (``-S`` order)."""

    chain: str
    match: tuple[str, ...]
    target: tuple[str, ...]
    name: str

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + self.name

    def spec(self) -> tuple[str, ...]:
        """The rule without ``-A CHAIN``, usable after ``-A``, ``-D`` or ``-C``."""
        return (*self.match, "-m", "comment", "--comment", self.comment, *self.target)

    def append_args(self) -> tuple[str, ...]:
        return ("-A", self.chain, *self.spec())


def chunk_ports(ports: Sequence[PortRange]) -> list[tuple[PortRange, ...]]:
    """Split ports into groups that each fit in one multiport rule (15 slots)."""
    chunks: list[tuple[PortRange, ...]] = []
    current: list[PortRange] = []
    used = 0
    for entry in ports:
        if current and used + entry.slots > MULTIPORT_MAX_SLOTS:
            chunks.append(tuple(current))
            current, used = [], 0
        current.append(entry)
        used += entry.slots
    if current:
        chunks.append(tuple(current))
    return chunks


def ignore_port_rules(chain: str, ports: Sequence[PortRange]) -> list[Rule]:
    """``ignore-port-<list>`` RETURN rules, one per multiport chunk."""
    rules = []
    for chunk in chunk_ports(ports):
        listed = ",".join(entry.iptables() for entry in chunk)
        rules.append(
            Rule(
                chain,
                ("-p", "tcp", "-m", "multiport", "--dports", listed),
                ("-j", "RETURN"),
                f"ignore-port-{listed}",
            )
        )
    return rules


def build_rules(settings: Settings, ip_version: int = 4) -> list[Rule]:
    """The whole rule set for one address family, in installation order.

    Chains are filled before the built-in chains jump to them, so no packet ever
    meets a half-built chain.
    """
    rules: list[Rule] = []

    # PROXY_INIT_REDIRECT: connections arriving from the network.
    rules += ignore_port_rules(REDIRECT_CHAIN, settings.inbound_ports_to_ignore)
    for net in settings.subnets_to_ignore:
        if net.version == ip_version:  # an IPv4 CIDR means nothing to ip6tables
            rules.append(
                Rule(REDIRECT_CHAIN, ("-s", str(net)), ("-j", "RETURN"), f"ignore-subnet-{net}")
            )
    inbound_to = ("-j", "REDIRECT", "--to-port", str(settings.inbound_proxy_port))
    if settings.ports_to_redirect:
        for entry in settings.ports_to_redirect:
            port = entry.iptables()
            rules.append(
                Rule(
                    REDIRECT_CHAIN,
                    ("-p", "tcp", "--dport", port),
                    inbound_to,
                    f"redirect-port-{port}-to-proxy-port",
                )
            )
    else:
        rules.append(
            Rule(REDIRECT_CHAIN, ("-p", "tcp"), inbound_to, "redirect-all-incoming-to-proxy-port")
        )
    prerouting, _, prerouting_name = JUMPS[0]
    rules.append(Rule(prerouting, (), ("-j", REDIRECT_CHAIN), prerouting_name))

    # PROXY_INIT_OUTPUT: connections opened inside the namespace.
    rules.append(
        Rule(
            OUTPUT_CHAIN,
            ("-m", "owner", "--uid-owner", str(settings.proxy_uid)),
            ("-j", "RETURN"),
            "ignore-proxy-user-id",
        )
    )
    if settings.proxy_gid is not None:
        rules.append(
            Rule(
                OUTPUT_CHAIN,
                ("-m", "owner", "--gid-owner", str(settings.proxy_gid)),
                ("-j", "RETURN"),
                "ignore-proxy-group-id",
            )
        )
    rules.append(Rule(OUTPUT_CHAIN, ("-o", "lo"), ("-j", "RETURN"), "ignore-loopback"))
    rules += ignore_port_rules(OUTPUT_CHAIN, settings.outbound_ports_to_ignore)
    rules.append(
        Rule(
            OUTPUT_CHAIN,
            ("-p", "tcp"),
            ("-j", "REDIRECT", "--to-port", str(settings.outbound_proxy_port)),
            "redirect-all-outgoing-to-proxy-port",
        )
    )
    output, _, output_name = JUMPS[1]
    rules.append(Rule(output, (), ("-j", OUTPUT_CHAIN), output_name))
    return rules


def install_commands(settings: Settings) -> list[Command]:
    """Every command ``install`` runs after cleaning up, IPv4 first, then IPv6."""
    commands: list[Command] = []
    for version, binary in settings.binaries():
        base = (binary, "-t", TABLE)
        commands += [(*base, "-N", chain) for chain in PROXY_INIT_CHAINS]
        commands += [(*base, *rule.append_args()) for rule in build_rules(settings, version)]
    return commands


def canonical_removal_commands(binary: str) -> list[Command]:
    """What ``remove`` runs on a namespace holding exactly the rules ``install`` made.

    Used by ``remove --dry-run``, which must not read the live rule set.
    """
    base = (binary, "-t", TABLE)
    commands: list[Command] = []
    for builtin, chain, name in JUMPS:
        jump = Rule(builtin, (), ("-j", chain), name)
        commands.append((*base, "-D", builtin, *jump.spec()))
    commands += [(*base, "-F", chain) for chain in PROXY_INIT_CHAINS]
    commands += [(*base, "-X", chain) for chain in PROXY_INIT_CHAINS]
    return commands


def removal_commands(binary: str, listing: str) -> list[Command]:
    """Commands that undo proxy-init, given the live ``iptables -t nat -S`` text.

    Every rule that jumps to a proxy-init chain from elsewhere is deleted (whatever
    its comment: older installs and other tools word it differently), then the
    chains are flushed and deleted.  Nothing is returned when nothing is installed.
    """
    base = (binary, "-t", TABLE)
    jumps: list[Command] = []
    chains: list[str] = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "-N" and words[1] in PROXY_INIT_CHAINS:
            chains.append(words[1])
        elif (
            len(words) >= 2
            and words[0] == "-A"
            and words[1] not in PROXY_INIT_CHAINS
            and _jump_target(words) in PROXY_INIT_CHAINS
        ):
            jumps.append((*base, "-D", *words[1:]))
    return (
        jumps
        + [(*base, "-F", chain) for chain in chains]
        + [(*base, "-X", chain) for chain in chains]
    )


def _jump_target(words: Sequence[str]) -> str | None:
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump", "-g", "--goto"):
            return words[i + 1]
    return None


def proxy_init_lines(listing: str) -> list[str]:
    """The lines of ``iptables -t nat -S`` output that belong to proxy-init."""
    return [
        line
        for line in listing.splitlines()
        if any(chain in line for chain in PROXY_INIT_CHAINS) or COMMENT_PREFIX in line
    ]


def format_command(command: Command) -> str:
    return shlex.join(command)


# --- runner (I/O) ---------------------------------------------------------------


class CommandFailed(Exception):
    """An iptables command exited non-zero or could not be started."""

    def __init__(self, command: Command, returncode: int | None, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        status = "could not be run" if returncode is None else f"exited with status {returncode}"
        super().__init__(f"command {status}: {format_command(command)}")

    def report(self) -> str:
        detail = self.stderr.strip()
        return f"{self}\n{detail}" if detail else str(self)


# Runs one command and returns its stdout; raises CommandFailed.  Injectable for tests.
Run = Callable[[Command], str]

# One iptables call should take milliseconds; a stuck xtables lock must not hang
# an init container forever.
COMMAND_TIMEOUT_SECONDS = 30.0


def run_command(command: Command) -> str:
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        raise CommandFailed(command, None, f"{command[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(
            command, None, f"timed out after {COMMAND_TIMEOUT_SECONDS:g}s"
        ) from None
    except OSError as exc:
        raise CommandFailed(command, None, str(exc)) from None
    if done.returncode != 0:
        raise CommandFailed(command, done.returncode, done.stderr)
    return done.stdout


def list_nat(run: Run, binary: str) -> str:
    return run((binary, "-t", TABLE, "-S"))


def remove_installed(run: Run, binary: str, echo: Callable[[str], None]) -> int:
    """Remove proxy-init from one family; returns how many commands ran."""
    commands = removal_commands(binary, list_nat(run, binary))
    for command in commands:
        echo(format_command(command))
        run(command)
    return len(commands)


def do_install(settings: Settings, run: Run, echo: Callable[[str], None]) -> None:
    for _, binary in settings.binaries():
        remove_installed(run, binary, echo)
    try:
        for command in install_commands(settings):
            echo(format_command(command))
            run(command)
    except CommandFailed:
        # Do not leave half a rule set behind (e.g. a PREROUTING jump without
        # the OUTPUT one); the original failure is what gets reported.
        for _, binary in settings.binaries():
            try:
                remove_installed(run, binary, lambda _line: None)
            except CommandFailed:
                pass
        raise


def do_remove(binaries: Iterable[str], run: Run, echo: Callable[[str], None]) -> None:
    for binary in binaries:
        if remove_installed(run, binary, echo) == 0:
            echo(f"# {binary}: no proxy-init rules installed")


def do_show(binaries: Iterable[str], run: Run, echo: Callable[[str], None]) -> None:
    for binary in binaries:
        echo(f"# {binary} -t {TABLE} -S (proxy-init)")
        for line in proxy_init_lines(list_nat(run, binary)):
            echo(line)


# --- command line ---------------------------------------------------------------


def _port_arg(text: str) -> int:
    try:
        return parse_port(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _id_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid id {text!r}: not a number") from None
    if not -1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(
            f"invalid id {value}: must be between 0 and {MAX_ID} (-1 means unset)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    backend = argparse.ArgumentParser(add_help=False)
    backend.add_argument(
        "--iptables-cmd",
        default="iptables",
        help="iptables binary, e.g. iptables-legacy or iptables-nft (default: iptables)",
    )
    backend.add_argument(
        "--ip6tables-cmd",
        help="ip6tables binary (default: derived from --iptables-cmd, iptables-X -> ip6tables-X)",
    )
    backend.add_argument(
        "--ipv6",
        type=parse_bool,
        default=True,
        metavar="true|false",
        help="also manage the IPv6 rules with ip6tables (default: true)",
    )

    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument(
        "--dry-run",
        "--simulate",
        dest="dry_run",
        action="store_true",
        help="print the commands instead of running them (needs no root)",
    )

    parser = argparse.ArgumentParser(
        prog="meshproxy iptables",
        description="Install, remove or show Linkerd proxy-init's NAT rules.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{install,remove,show}")
    commands.required = True

    install = commands.add_parser(
        "install",
        parents=[backend, dry],
        help="(re)install the redirect rules",
        description="Replace any proxy-init rules with a fresh set.",
    )
    install.add_argument(
        "--proxy-uid",
        type=_id_arg,
        default=DEFAULT_PROXY_UID,
        help=f"uid the proxy runs as; its traffic is not redirected (default: {DEFAULT_PROXY_UID})",
    )
    install.add_argument(
        "--proxy-gid",
        type=_id_arg,
        default=None,
        help="gid whose traffic is not redirected (default: none; -1 = none)",
    )
    install.add_argument(
        "--incoming-proxy-port",
        type=_port_arg,
        default=DEFAULT_INBOUND_PROXY_PORT,
        help=f"inbound listener port (default: {DEFAULT_INBOUND_PROXY_PORT})",
    )
    install.add_argument(
        "--outgoing-proxy-port",
        type=_port_arg,
        default=DEFAULT_OUTBOUND_PROXY_PORT,
        help=f"outbound listener port (default: {DEFAULT_OUTBOUND_PROXY_PORT})",
    )
    install.add_argument(
        "--inbound-ports-to-ignore",
        action="append",
        metavar="PORTS",
        help=f"inbound ports not redirected, port-set syntax (default: {DEFAULT_INBOUND_PORTS_TO_IGNORE}); repeatable",
    )
    install.add_argument(
        "--outbound-ports-to-ignore",
        action="append",
        metavar="PORTS",
        help=f"outbound ports not redirected (default: {DEFAULT_OUTBOUND_PORTS_TO_IGNORE}); repeatable",
    )
    install.add_argument(
        "--subnets-to-ignore",
        action="append",
        metavar="CIDRS",
        help="source subnets whose inbound connections are not redirected; repeatable",
    )
    install.add_argument(
        "--ports-to-redirect",
        action="append",
        metavar="PORTS",
        help="redirect only these inbound ports (default: all); repeatable",
    )

    commands.add_parser("remove", parents=[backend, dry], help="delete the jumps and chains")
    commands.add_parser("show", parents=[backend, dry], help="print the installed proxy-init rules")
    return parser


def _joined(values: list[str] | None, default: str) -> str:
    return default if values is None else ",".join(values)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validate parsed arguments into Settings; raises UsageError."""
    gid = args.proxy_gid if args.proxy_gid is not None and args.proxy_gid >= 0 else None
    if args.proxy_uid < 0:
        raise UsageError("--proxy-uid must be a uid (>= 0)")
    return Settings(
        proxy_uid=args.proxy_uid,
        proxy_gid=gid,
        inbound_proxy_port=args.incoming_proxy_port,
        outbound_proxy_port=args.outgoing_proxy_port,
        inbound_ports_to_ignore=parse_port_set(
            _joined(args.inbound_ports_to_ignore, DEFAULT_INBOUND_PORTS_TO_IGNORE)
        ),
        outbound_ports_to_ignore=parse_port_set(
            _joined(args.outbound_ports_to_ignore, DEFAULT_OUTBOUND_PORTS_TO_IGNORE)
        ),
        subnets_to_ignore=parse_subnets(_joined(args.subnets_to_ignore, "")),
        ports_to_redirect=parse_port_set(_joined(args.ports_to_redirect, "")),
        ipv6=args.ipv6,
        iptables_cmd=args.iptables_cmd,
        ip6tables_cmd=args.ip6tables_cmd or ip6tables_for(args.iptables_cmd),
    )


def main(argv: list[str], run: Run = run_command) -> int:
    """Entry point for ``meshproxy iptables``; ``run`` is replaceable for tests."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    def echo(line: str) -> None:
        print(line, flush=True)

    binaries = [args.iptables_cmd]
    if args.ipv6:
        binaries.append(args.ip6tables_cmd or ip6tables_for(args.iptables_cmd))

    try:
        if args.command == "install":
            try:
                settings = settings_from_args(args)
            except UsageError as exc:
                parser.print_usage(sys.stderr)
                print(f"meshproxy iptables install: error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            if args.dry_run:
                for command in install_commands(settings):
                    echo(format_command(command))
            else:
                do_install(settings, run, echo)
        elif args.command == "remove":
            if args.dry_run:
                for binary in binaries:
                    for command in canonical_removal_commands(binary):
                        echo(format_command(command))
            else:
                do_remove(binaries, run, echo)
        elif args.dry_run:
            for binary in binaries:
                echo(format_command((binary, "-t", TABLE, "-S")))
        else:
            do_show(binaries, run, echo)
    except CommandFailed as exc:
        print(f"meshproxy iptables {args.command}: {exc.report()}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
