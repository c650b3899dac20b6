"""The proxy-init rule set (proxy.iptables), checked as data and through main().

No root needed: rules are built by pure functions, and the runner is replaced by
FakeIptables, a small in-memory model of `iptables -t nat` (chains, -A/-D/-F/-X/-N/-S)
that fails the way the real tool does (unknown chain, duplicate chain, bad delete).
"""

from __future__ import annotations

import ipaddress
import shlex

import pytest

from proxy import iptables
from proxy.iptables import (
    CommandFailed,
    PortRange,
    Settings,
    UsageError,
    build_rules,
    chunk_ports,
    install_commands,
    ip6tables_for,
    main,
    parse_port_set,
    proxy_init_lines,
    removal_commands,
)

DEFAULT_V4_NAMES = [
    "ignore-port-4190,4191,4567,4568",
    "redirect-all-incoming-to-proxy-port",
    "install-proxy-init-prerouting",
    "ignore-proxy-user-id",
    "ignore-loopback",
    "ignore-port-4567,4568",
    "redirect-all-outgoing-to-proxy-port",
    "install-proxy-init-output",
]


def names(rules: list[iptables.Rule]) -> list[str]:
    return [rule.name for rule in rules]


def ports(text: str) -> tuple[PortRange, ...]:
    return parse_port_set(text)


# --- port sets ------------------------------------------------------------------


def test_port_set_keeps_ranges_and_order() -> None:
    assert parse_port_set("25,587,4000-4100") == (
        PortRange(25, 25),
        PortRange(587, 587),
        PortRange(4000, 4100),
    )
    assert [p.iptables() for p in parse_port_set("4000-4100, 25")] == ["4000:4100", "25"]


def test_port_set_empty_duplicates_and_degenerate_range() -> None:
    assert parse_port_set("") == ()
    assert parse_port_set(" , ") == ()
    assert parse_port_set("80,80,81") == (PortRange(80, 80), PortRange(81, 81))
    assert parse_port_set("7-7")[0].iptables() == "7"


@pytest.mark.parametrize("bad", ["0", "65536", "http", "10-5", "1-", "-3", "1-2-3"])
def test_port_set_rejects_bad_entries(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_port_set(bad)


def test_ip6tables_name_follows_the_iptables_variant() -> None:
    assert ip6tables_for("iptables") == "ip6tables"
    assert ip6tables_for("iptables-legacy") == "ip6tables-legacy"
    assert ip6tables_for("/usr/sbin/iptables-nft") == "/usr/sbin/ip6tables-nft"


# --- multiport chunking ---------------------------------------------------------


def test_fifteen_single_ports_fit_one_rule() -> None:
    chunks = chunk_ports(ports(",".join(str(p) for p in range(1000, 1015))))
    assert [len(c) for c in chunks] == [15]


def test_twenty_ports_split_fifteen_and_five() -> None:
    listed = ",".join(str(p) for p in range(1000, 1020))
    rules = iptables.ignore_port_rules("PROXY_INIT_REDIRECT", ports(listed))
    assert len(rules) == 2
    first = rules[0].match[rules[0].match.index("--dports") + 1].split(",")
    second = rules[1].match[rules[1].match.index("--dports") + 1].split(",")
    assert first == [str(p) for p in range(1000, 1015)]
    assert second == [str(p) for p in range(1015, 1020)]
    assert rules[0].name == "ignore-port-" + ",".join(first)


def test_a_range_uses_two_multiport_slots() -> None:
    # iptables refuses 8 ranges in one multiport match ("too many ports specified").
    eight_ranges = ",".join(f"{p}-{p + 1}" for p in range(100, 116, 2))
    assert [len(c) for c in chunk_ports(ports(eight_ranges))] == [7, 1]
    # 7 ranges (14 slots) plus one single port (1 slot) still fit.
    assert [len(c) for c in chunk_ports(ports(eight_ranges + ",9"))[:1]] == [7]
    assert [len(c) for c in chunk_ports(ports("1-2,3-4,5-6,7-8,9-10,11-12,13-14,15"))] == [8]


def test_ranges_are_written_with_colons() -> None:
    rule = iptables.ignore_port_rules("PROXY_INIT_OUTPUT", ports("25,4000-4100"))[0]
    assert rule.match == ("-p", "tcp", "-m", "multiport", "--dports", "25,4000:4100")
    assert rule.comment == "proxy-init/ignore-port-25,4000:4100"


def test_no_ignore_rule_for_an_empty_port_set() -> None:
    rules = build_rules(Settings(inbound_ports_to_ignore=(), outbound_ports_to_ignore=()))
    assert not any(name.startswith("ignore-port-") for name in names(rules))


# --- the rule set ---------------------------------------------------------------


def test_default_rules_in_proxy_init_order() -> None:
    rules = build_rules(Settings())
    assert names(rules) == DEFAULT_V4_NAMES
    chains = [rule.chain for rule in rules]
    assert chains == ["PROXY_INIT_REDIRECT"] * 2 + ["PREROUTING"] + ["PROXY_INIT_OUTPUT"] * 4 + [
        "OUTPUT"
    ]


def test_every_rule_carries_its_proxy_init_comment() -> None:
    for rule in build_rules(
        Settings(proxy_gid=7, subnets_to_ignore=(ipaddress.ip_network("10.0.0.0/8"),))
    ):
        args = rule.append_args()
        i = args.index("--comment")
        assert args[i - 2 : i] == ("-m", "comment")
        assert args[i + 1] == "proxy-init/" + rule.name
        assert args[-len(rule.target) :] == rule.target


def test_rule_details() -> None:
    by_name = {rule.name: rule for rule in build_rules(Settings())}
    assert by_name["ignore-proxy-user-id"].append_args() == (
        "-A", "PROXY_INIT_OUTPUT", "-m", "owner", "--uid-owner", "2102",
        "-m", "comment", "--comment", "proxy-init/ignore-proxy-user-id", "-j", "RETURN",
    )  # fmt: skip
    assert by_name["ignore-loopback"].match == ("-o", "lo")
    assert by_name["redirect-all-incoming-to-proxy-port"].target == (
        "-j", "REDIRECT", "--to-port", "4143",
    )  # fmt: skip
    assert by_name["redirect-all-outgoing-to-proxy-port"].target == (
        "-j", "REDIRECT", "--to-port", "4140",
    )  # fmt: skip
    assert by_name["install-proxy-init-prerouting"].append_args() == (
        "-A", "PREROUTING", "-m", "comment", "--comment",
        "proxy-init/install-proxy-init-prerouting", "-j", "PROXY_INIT_REDIRECT",
    )  # fmt: skip
    assert by_name["install-proxy-init-output"].target == ("-j", "PROXY_INIT_OUTPUT")


def test_custom_ports_and_uid() -> None:
    rules = build_rules(Settings(proxy_uid=1234, inbound_proxy_port=5143, outbound_proxy_port=5140))
    text = [" ".join(rule.append_args()) for rule in rules]
    assert any("--uid-owner 1234" in line for line in text)
    assert any("--to-port 5143" in line and "incoming" in line for line in text)
    assert any("--to-port 5140" in line and "outgoing" in line for line in text)


def test_group_rule_only_when_a_gid_is_given() -> None:
    assert "ignore-proxy-group-id" not in names(build_rules(Settings()))
    with_gid = build_rules(Settings(proxy_gid=2102))
    order = names(with_gid)
    i = order.index("ignore-proxy-group-id")
    assert order[i - 1] == "ignore-proxy-user-id" and order[i + 1] == "ignore-loopback"
    assert with_gid[i].match == ("-m", "owner", "--gid-owner", "2102")


def test_subnets_go_after_ports_and_only_to_their_family() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    v4 = build_rules(Settings(subnets_to_ignore=nets), 4)
    v6 = build_rules(Settings(subnets_to_ignore=nets), 6)
    assert names(v4)[:3] == [
        "ignore-port-4190,4191,4567,4568",
        "ignore-subnet-10.0.0.0/8",
        "redirect-all-incoming-to-proxy-port",
    ]
    assert v4[1].match == ("-s", "10.0.0.0/8")
    assert "ignore-subnet-fd00::/8" in names(v6)
    assert "ignore-subnet-10.0.0.0/8" not in names(v6)


def test_redirect_listed_mode() -> None:
    rules = build_rules(Settings(ports_to_redirect=ports("8080,9000-9010")))
    order = names(rules)
    assert "redirect-all-incoming-to-proxy-port" not in order
    assert order[1:3] == [
        "redirect-port-8080-to-proxy-port",
        "redirect-port-9000:9010-to-proxy-port",
    ]
    assert rules[1].match == ("-p", "tcp", "--dport", "8080")
    assert rules[2].match == ("-p", "tcp", "--dport", "9000:9010")
    assert rules[1].target == ("-j", "REDIRECT", "--to-port", "4143")
    # Outbound is unaffected by the inbound mode.
    assert "redirect-all-outgoing-to-proxy-port" in order


def test_install_commands_create_chains_then_fill_then_jump() -> None:
    commands = install_commands(Settings(ipv6=False))
    assert commands[0] == ("iptables", "-t", "nat", "-N", "PROXY_INIT_REDIRECT")
    assert commands[1] == ("iptables", "-t", "nat", "-N", "PROXY_INIT_OUTPUT")
    assert all(c[:3] == ("iptables", "-t", "nat") for c in commands)
    appended = [c[4] for c in commands[2:]]
    # Each jump comes after every rule of the chain it jumps to.
    assert appended.index("PREROUTING") > max(
        i for i, chain in enumerate(appended) if chain == "PROXY_INIT_REDIRECT"
    )
    assert appended.index("OUTPUT") == len(appended) - 1


def test_ipv6_twin_repeats_the_rules_with_ip6tables() -> None:
    commands = install_commands(Settings())
    v4 = [c[1:] for c in commands if c[0] == "iptables"]
    v6 = [c[1:] for c in commands if c[0] == "ip6tables"]
    assert v4 == v6 and len(v4) + len(v6) == len(commands)
    assert commands.index(("ip6tables", *v6[0])) == len(v4)  # IPv4 first, then IPv6
    assert not any(c[0] == "ip6tables" for c in install_commands(Settings(ipv6=False)))


# --- reading back the live rule set ---------------------------------------------

LISTING = """\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N OTHER
-N PROXY_INIT_OUTPUT
-N PROXY_INIT_REDIRECT
-A PREROUTING -m comment --comment "proxy-init/install-proxy-init-prerouting" -j PROXY_INIT_REDIRECT
-A PREROUTING -p udp -j OTHER
-A OUTPUT -j PROXY_INIT_OUTPUT
-A PROXY_INIT_OUTPUT -o lo -m comment --comment "proxy-init/ignore-loopback" -j RETURN
-A PROXY_INIT_REDIRECT -p tcp -m comment --comment "proxy-init/redirect-all-incoming-to-proxy-port" -j REDIRECT --to-ports 4143
"""


def test_removal_deletes_every_jump_then_flushes_and_deletes_chains() -> None:
    assert removal_commands("iptables-legacy", LISTING) == [
        ("iptables-legacy", "-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment",
         "proxy-init/install-proxy-init-prerouting", "-j", "PROXY_INIT_REDIRECT"),
        ("iptables-legacy", "-t", "nat", "-D", "OUTPUT", "-j", "PROXY_INIT_OUTPUT"),
        ("iptables-legacy", "-t", "nat", "-F", "PROXY_INIT_OUTPUT"),
        ("iptables-legacy", "-t", "nat", "-F", "PROXY_INIT_REDIRECT"),
        ("iptables-legacy", "-t", "nat", "-X", "PROXY_INIT_OUTPUT"),
        ("iptables-legacy", "-t", "nat", "-X", "PROXY_INIT_REDIRECT"),
    ]  # fmt: skip


def test_removal_of_nothing_is_nothing() -> None:
    assert removal_commands("iptables", "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n") == []


def test_show_keeps_only_proxy_init_lines() -> None:
    lines = proxy_init_lines(LISTING)
    assert "-A PREROUTING -p udp -j OTHER" not in lines
    assert "-N OTHER" not in lines
    assert "-A OUTPUT -j PROXY_INIT_OUTPUT" in lines
    assert len(lines) == 6


# --- a fake iptables for main() -------------------------------------------------

BUILTIN_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")


class FakeIptables:
    """In-memory `iptables -t nat` per binary; records every command it is given."""

    def __init__(self, fail_when: str | None = None) -> None:
        self.chains: dict[str, list[str]] = {}
        self.rules: dict[str, list[tuple[str, ...]]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.fail_when = fail_when  # substring of a command that makes it fail

    def __call__(self, command: tuple[str, ...]) -> str:
        self.calls.append(command)
        binary, table_flag, table, op, *rest = command
        assert (table_flag, table) == ("-t", "nat")
        chains = self.chains.setdefault(binary, [])
        rules = self.rules.setdefault(binary, [])
        if self.fail_when and self.fail_when in shlex.join(command):
            raise CommandFailed(command, 2, f"{binary}: simulated failure")
        if op == "-S":
            out = [f"-P {c} ACCEPT" for c in BUILTIN_CHAINS] + [f"-N {c}" for c in sorted(chains)]
            for rule in rules:
                words = [
                    f'"{w}"' if i and rule[i - 1] == "--comment" else w for i, w in enumerate(rule)
                ]
                out.append("-A " + " ".join(words))
            return "\n".join(out) + "\n"
        if op == "-N":
            if rest[0] in chains or rest[0] in BUILTIN_CHAINS:
                raise CommandFailed(command, 1, "iptables: Chain already exists.")
            chains.append(rest[0])
        elif op == "-A":
            self._need_chain(command, rest[0], chains)
            rules.append(tuple(rest))
        elif op == "-D":
            if tuple(rest) not in rules:
                raise CommandFailed(command, 1, "iptables: Bad rule (does a matching rule exist?)")
            rules.remove(tuple(rest))
        elif op == "-F":
            self._need_chain(command, rest[0], chains)
            rules[:] = [r for r in rules if r[0] != rest[0]]
        elif op == "-X":
            self._need_chain(command, rest[0], chains)
            if any(r[0] == rest[0] or rest[0] in r for r in rules):
                raise CommandFailed(command, 1, "iptables: Directory not empty.")
            chains.remove(rest[0])
        else:
            raise AssertionError(f"unexpected command {command}")
        return ""

    @staticmethod
    def _need_chain(command: tuple[str, ...], chain: str, chains: list[str]) -> None:
        if chain not in chains and chain not in BUILTIN_CHAINS:
            raise CommandFailed(command, 1, "iptables: No chain/target/match by that name.")

    def state(self, binary: str = "iptables") -> tuple[list[str], list[tuple[str, ...]]]:
        return sorted(self.chains.get(binary, [])), list(self.rules.get(binary, []))


def test_install_through_main_builds_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeIptables()
    assert main(["install"], run=fake) == 0
    for binary in ("iptables", "ip6tables"):
        chains, rules = fake.state(binary)
        assert chains == ["PROXY_INIT_OUTPUT", "PROXY_INIT_REDIRECT"]
        assert [r[r.index("--comment") + 1] for r in rules] == [
            "proxy-init/" + name for name in DEFAULT_V4_NAMES
        ]
    # The executed commands are echoed, as proxy-init logs them.
    assert "iptables -t nat -N PROXY_INIT_REDIRECT" in capsys.readouterr().out


def test_install_is_idempotent() -> None:
    fake = FakeIptables()
    assert main(["install", "--ipv6=false"], run=fake) == 0
    first = fake.state()
    assert main(["install", "--ipv6=false"], run=fake) == 0
    assert fake.state() == first
    # Reinstalling with another configuration replaces the rules rather than adding.
    assert main(["install", "--ipv6=false", "--proxy-uid", "999"], run=fake) == 0
    _, rules = fake.state()
    owners = [r for r in rules if "--uid-owner" in r]
    assert len(owners) == 1 and "999" in owners[0]
    assert len(rules) == len(first[1])


def test_remove_then_show(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeIptables()
    assert main(["install"], run=fake) == 0
    capsys.readouterr()
    assert main(["show", "--ipv6", "false"], run=fake) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "# iptables -t nat -S (proxy-init)"
    assert (
        '-A PROXY_INIT_OUTPUT -o lo -m comment --comment "proxy-init/ignore-loopback" -j RETURN'
        in shown
    )
    assert not any("ip6tables" in line for line in shown)

    assert main(["remove"], run=fake) == 0
    assert fake.state("iptables") == ([], [])
    assert fake.state("ip6tables") == ([], [])
    capsys.readouterr()
    assert main(["remove"], run=fake) == 0  # nothing left: still a success
    assert "no proxy-init rules installed" in capsys.readouterr().out


def test_failed_install_reports_the_command_and_rolls_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeIptables(fail_when="--gid-owner")
    assert main(["install", "--proxy-gid", "7"], run=fake) == 1
    err = capsys.readouterr().err
    assert "exited with status 2" in err
    assert "--gid-owner 7" in err
    assert "simulated failure" in err
    # The PREROUTING jump and the chains made before the failure are gone again.
    assert fake.state("iptables") == ([], [])


def test_missing_binary_is_a_clear_failure(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["show", "--iptables-cmd", "/nonexistent/iptables-nope", "--ipv6=false"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "/nonexistent/iptables-nope -t nat -S" in err
    assert "command not found" in err


# --- --dry-run through main -----------------------------------------------------


def test_dry_run_prints_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(command: tuple[str, ...]) -> str:
        raise AssertionError(f"dry run ran {command}")

    assert main(["install", "--dry-run"], run=refuse) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * (2 + len(DEFAULT_V4_NAMES))
    assert lines[0] == "iptables -t nat -N PROXY_INIT_REDIRECT"
    assert lines[2] == (
        "iptables -t nat -A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190,4191,4567,4568"
        " -m comment --comment proxy-init/ignore-port-4190,4191,4567,4568 -j RETURN"
    )
    assert lines[-1] == (
        "ip6tables -t nat -A OUTPUT -m comment --comment proxy-init/install-proxy-init-output"
        " -j PROXY_INIT_OUTPUT"
    )
    # Every printed line is a valid shell command.
    assert all(shlex.split(line)[0] in ("iptables", "ip6tables") for line in lines)


def test_dry_run_with_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "install", "--simulate", "--ipv6=false", "--iptables-cmd", "iptables-legacy",
        "--proxy-uid", "2102", "--proxy-gid", "2103",
        "--incoming-proxy-port", "5143", "--outgoing-proxy-port", "5140",
        "--inbound-ports-to-ignore", "22,4190-4191", "--outbound-ports-to-ignore", "25",
        "--outbound-ports-to-ignore", "587",
        "--subnets-to-ignore", "10.1.2.3/16", "--ports-to-redirect", "8080",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(line.startswith("iptables-legacy -t nat ") for line in out.splitlines())
    assert "--dports 22,4190:4191" in out
    assert "--comment proxy-init/ignore-subnet-10.1.0.0/16" in out
    assert "--gid-owner 2103" in out
    assert "--dports 25,587 -m comment --comment proxy-init/ignore-port-25,587" in out
    assert (
        "--dport 8080 -m comment --comment proxy-init/redirect-port-8080-to-proxy-port -j REDIRECT --to-port 5143"
        in out
    )
    assert "redirect-all-incoming" not in out
    assert "REDIRECT --to-port 5140" in out


def test_dry_run_gid_minus_one_means_unset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--dry-run", "--proxy-gid", "-1", "--ipv6=false"]) == 0
    assert "--gid-owner" not in capsys.readouterr().out


def test_dry_run_empty_ignore_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--dry-run", "--inbound-ports-to-ignore", "", "--ipv6=false"]) == 0
    assert "PROXY_INIT_REDIRECT -p tcp -m multiport" not in capsys.readouterr().out


def test_remove_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["remove", "--dry-run", "--iptables-cmd", "iptables-nft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:6] == [
        "iptables-nft -t nat -D PREROUTING -m comment --comment"
        " proxy-init/install-proxy-init-prerouting -j PROXY_INIT_REDIRECT",
        "iptables-nft -t nat -D OUTPUT -m comment --comment"
        " proxy-init/install-proxy-init-output -j PROXY_INIT_OUTPUT",
        "iptables-nft -t nat -F PROXY_INIT_REDIRECT",
        "iptables-nft -t nat -F PROXY_INIT_OUTPUT",
        "iptables-nft -t nat -X PROXY_INIT_REDIRECT",
        "iptables-nft -t nat -X PROXY_INIT_OUTPUT",
    ]
    assert lines[6].startswith("ip6tables-nft -t nat -D PREROUTING")


# --- usage errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["install", "--incoming-proxy-port", "0"],
        ["install", "--outgoing-proxy-port", "http"],
        ["install", "--inbound-ports-to-ignore", "9-3"],
        ["install", "--subnets-to-ignore", "10.0.0.0/33"],
        ["install", "--ipv6", "maybe"],
        ["install", "--proxy-uid", "-1"],
        ["install", "--proxy-gid", "-2"],
        ["show", "--proxy-uid", "5"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv, run=FakeIptables()) == 2
    assert "error:" in capsys.readouterr().err


def test_show_dry_run_reads_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(command: tuple[str, ...]) -> str:
        raise AssertionError(f"dry run ran {command}")

    assert main(["show", "--dry-run"], run=refuse) == 0
    assert capsys.readouterr().out.splitlines() == ["iptables -t nat -S", "ip6tables -t nat -S"]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--help"]) == 0
    assert "--inbound-ports-to-ignore" in capsys.readouterr().out
