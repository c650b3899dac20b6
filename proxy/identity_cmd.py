"""``meshproxy identity init|issue``: a trust anchor, an issuer and leaves for
standalone meshes (SPEC sections 1 and 6), shaped as Linkerd's (ref 5.2).

    meshproxy identity init  --dir D [--trust-domain cluster.local] [--force]
        D/ca.crt D/ca.key (trust anchor, root.linkerd.<td>)
        D/issuer.crt D/issuer.key (issuer, identity.linkerd.<td>)
    meshproxy identity issue --dir D --name NAME --out O [--lifetime 24h]
        O/cert.pem (leaf then issuer), O/key.pem (PKCS#8), O/roots.pem

NAME is a Linkerd identity (``web.default.serviceaccount.identity.linkerd.cluster.local``)
or a SPIFFE ID (``spiffe://cluster.local/ns/default/sa/web``, a URI SAN).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from proxy.config import EX_USAGE, parse_duration
from proxy.tls import ca

_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$", re.IGNORECASE)
_SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_/]*)?$")


def valid_name(name: str) -> bool:
    return bool(_SPIFFE_ID.match(name) or _DNS_NAME.match(name))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meshproxy identity", description="Certificates for standalone meshes (ECDSA P-256, Linkerd's names).")
    sub = ap.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a trust anchor and an issuer")
    init.add_argument("--dir", required=True, help="directory for ca.crt, ca.key, issuer.crt, issuer.key")
    init.add_argument("--trust-domain", default=ca.DEFAULT_TRUST_DOMAIN, help="trust domain (default %(default)s)")
    init.add_argument("--root-lifetime", default=f"{ca.ROOT_LIFETIME_S // 3600}h", help="trust anchor lifetime (default %(default)s)")
    init.add_argument("--issuer-lifetime", default=f"{ca.ISSUER_LIFETIME_S // 3600}h", help="issuer lifetime (default %(default)s)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every leaf it issued stops verifying)")
    issue = sub.add_parser("issue", help="issue a workload leaf")
    issue.add_argument("--dir", required=True, help="the directory made by `identity init`")
    issue.add_argument("--name", required=True, help="identity: a DNS-like Linkerd name or a spiffe:// URI")
    issue.add_argument("--out", required=True, help="directory for cert.pem, key.pem, roots.pem")
    issue.add_argument("--lifetime", default="24h", help="leaf lifetime, Linkerd duration syntax (default %(default)s, Linkerd's)")
    return ap


def main(argv: list[str]) -> int:
    """Entry point for ``meshproxy identity ...`` (``argv`` after ``identity``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return 0 if exc.code == 0 else EX_USAGE

    def usage(message: str) -> int:
        print(f"meshproxy identity {args.command}: error: {message}", file=sys.stderr)
        return EX_USAGE

    if args.command == "init":
        if not _DNS_NAME.match(args.trust_domain):
            return usage(f"--trust-domain {args.trust_domain!r} is not a DNS name")
        try:
            root_life, issuer_life = parse_duration(args.root_lifetime), parse_duration(args.issuer_lifetime)
        except ValueError as exc:
            return usage(str(exc))
        existing = [n for n in (ca.CA_CERT, ca.CA_KEY, ca.ISSUER_CERT, ca.ISSUER_KEY) if os.path.exists(os.path.join(args.dir, n))]
        if existing and not args.force:
            return usage(f"{args.dir} already holds {', '.join(existing)}; --force replaces them")
        root, root_key, issuer, issuer_key = ca.make_ca(args.trust_domain, root_lifetime_s=root_life, issuer_lifetime_s=issuer_life)
        try:
            paths = ca.write_ca(args.dir, root, root_key, issuer, issuer_key)
        except OSError as exc:
            print(f"meshproxy identity init: {exc}", file=sys.stderr)
            return 1
        for path in paths:
            print(f"wrote {path}")
        print(f"trust anchor {ca.root_name(args.trust_domain)} valid until {root.not_valid_after_utc.isoformat()}")
        print(f"issuer {ca.issuer_name(args.trust_domain)} valid until {issuer.not_valid_after_utc.isoformat()}")
        return 0

    # issue
    if not valid_name(args.name):
        return usage(f"--name {args.name!r} is neither a DNS name nor a spiffe:// URI")
    try:
        lifetime = parse_duration(args.lifetime)
    except ValueError as exc:
        return usage(str(exc))
    if lifetime <= 0:
        return usage("--lifetime must be positive")
    try:
        issuer, issuer_key, roots = ca.load_issuer(args.dir)
    except (OSError, ValueError) as exc:
        print(f"meshproxy identity issue: cannot load the CA from {args.dir}: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    try:
        leaf, key = ca.issue_leaf(issuer, issuer_key, args.name, lifetime, chain=roots, now=now)
        paths = ca.write_leaf(args.out, leaf, key, issuer, roots)
    except (OSError, ValueError) as exc:
        print(f"meshproxy identity issue: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    print(f"leaf {args.name} valid until {leaf.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_after_utc.timestamp() < now + lifetime:
        print("warning: the leaf is cut short by the issuer's expiry; renew the issuer", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
