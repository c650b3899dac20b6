"""Identity sources: where the proxy's certificate comes from, kept fresh forever.

Theory of operation: a source is an object with ``async def run(install)``. It
obtains ``Credentials``, verifies them (key matches leaf, leaf names us, chain
reaches the trust anchors, not expired) and calls ``install(credentials)``;
then it waits for the next renewal and does it again, until cancelled. Nothing
before the first ``install`` is ready: the caller keeps ``/ready`` at 503 and
accepts no traffic until then (SPEC section 4). A failed renewal never removes
what is installed; it logs, counts an error, and retries.

  * ``LinkerdIdentitySource``: Linkerd's identity service (ref 5.3). key.p8 and
    csr.der from LINKERD2_PROXY_IDENTITY_DIR, the token re-read on every call,
    ``io.linkerd.proxy.identity.Identity/Certify`` over TLS (plaintext when the
    address is loopback), then sleep 70 % of the remaining lifetime clamped
    to [MIN_REFRESH, MAX_REFRESH]; after an error, MIN_REFRESH.
  * ``SpireSource``: the SPIFFE Workload API of a SPIRE agent (ref 11.2):
    ``FetchX509SVID`` on its unix socket; every message that carries our SPIFFE
    ID is installed; reconnects with a 100 ms to 1 s backoff.
  * ``FilesSource``: standalone PEM files (SPEC section 6), polled every second
    by mtime, size and inode; a broken update keeps the old credentials.

``source_from_config`` picks one as Linkerd does: SPIRE when its address is
set, else the identity service, else files. ``IdentityMetrics`` exports the
expiry and refresh metrics and logs the approach of any expiry.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from proxy import log as logging_
from proxy.control import protowire
from proxy.control.grpc_client import GrpcChannel, GrpcError, StatusCode
from proxy.metrics.registry import Counter, Gauge, Registry
from proxy.tls.credentials import (
    Credentials,
    CredentialsError,
    cert_identities,
    der_to_pem,
    load_pem_certs,
    roots_client_context,
    split_der_certs,
)

log = logging_.get_logger("proxy.tls.identity")

Install = Callable[[Credentials], None]

# Linkerd renews at 70 % of the remaining lifetime (ref 5.3): a 24 h leaf lives ~16.8 h
# before renewal, leaving 7 h for retries if the identity service is down.
REFRESH_FRACTION = 0.7
# The identity service makes a TokenReview round trip to the API server per call; 30 s
# lets a slow API server answer while a hung connection still cannot stall renewal for long.
CERTIFY_TIMEOUT_S = 30.0
# SPIRE reconnect backoff, Linkerd's spire-client: 100 ms doubling to 1 s, 10 % jitter (ref 11.2).
SPIRE_BACKOFF_MIN_S, SPIRE_BACKOFF_MAX_S, SPIRE_BACKOFF_JITTER = 0.1, 1.0, 0.1
# Files are polled once a second: a rotated certificate is live within about a second,
# and a stat of two files per second costs nothing (users.md A16: reload without restart).
FILES_POLL_INTERVAL_S = 1.0
# Expiry warnings at 30, 7 and 1 days left (users.md A16).
EXPIRY_WARNINGS_S = (30 * 86400, 7 * 86400, 86400)
# How often a source that does not renew by itself re-checks the approach of expiry.
EXPIRY_CHECK_INTERVAL_S = 60.0


class IdentitySource(Protocol):
    async def run(self, install: Install) -> None: ...


def refresh_delay(expiry: float, now: float, min_refresh: float, max_refresh: float) -> float:
    """Seconds until the next renewal: 70 % of the remaining lifetime, clamped."""
    remaining = max(0.0, expiry - now)
    return min(max(remaining * REFRESH_FRACTION, min_refresh), max_refresh)


# ---------------------------------------------------------------- metrics and warnings

class IdentityMetrics:
    """Expiry and refresh metrics, plus log warnings as expiry nears.

    Every family is exported twice: with the ``control_`` prefix that current
    linkerd2-proxy uses (since April 2024, ref 5.3) and without it, the names
    of Jan-Apr 2024 proxies that Linkerd's docs, dashboards and many alert
    rules still query. Both sets are cheap, and neither kind of user has to
    rewrite a query. Register this in ONE process (the one running the
    source): the supervisor's merge sums series across workers, which is
    wrong for timestamps.
    """

    PREFIXES = ("control_", "")

    def __init__(self, registry: Registry | None = None) -> None:
        self._expiration: list[Any] = []
        self._refresh: list[Any] = []
        self._refreshes: list[Any] = []
        self._warned: set[tuple[str, int]] = set()
        if registry is None:
            return
        for prefix in self.PREFIXES:
            self._expiration.append(registry.add(Gauge(f"{prefix}identity_cert_expiration_timestamp_seconds", "Time when this proxy's current mTLS identity certificate will expire (in seconds since the UNIX epoch)", ())))
            self._refresh.append(registry.add(Gauge(f"{prefix}identity_cert_refresh_timestamp_seconds", "Time when this proxy's mTLS identity certificate was last refreshed (in seconds since the UNIX epoch)", ())))
            self._refreshes.append(registry.add(Counter(f"{prefix}identity_cert_refreshes_total", "The total number of times this proxy's mTLS identity certificate has been refreshed by the identity provider", ("result",))))
        # Counters idle for METRICS_RETAIN_IDLE would be dropped; these must stay.
        registry.before_snapshot.append(self._keep_alive)

    def _keep_alive(self) -> None:
        for family in self._refreshes:
            for key in list(family.series):
                family.labels(*key)

    def refreshed(self, creds: Credentials, renewing: bool = True, now: float | None = None) -> None:
        """A new certificate was installed."""
        now = time.time() if now is None else now
        for gauge in self._expiration:
            gauge.labels().value = creds.not_after
        for gauge in self._refresh:
            gauge.labels().value = now
        for counter in self._refreshes:
            counter.labels("ok").value += 1
        self.check_expiry(creds, include_leaf=not renewing, now=now)

    def failed(self, error: BaseException | str, current: Credentials | None, now: float | None = None) -> None:
        """A renewal (or a load) failed; ``current`` stays installed, if any."""
        now = time.time() if now is None else now
        for counter in self._refreshes:
            counter.labels("error").value += 1
        if current is None:
            log.warning("identity certificate not available yet; retrying", error=str(error))
        else:
            log.warning(
                "identity certificate refresh failed; keeping the current certificate",
                error=str(error), expires_in=_human(current.not_after - now), identity=current.name,
            )
            self.check_expiry(current, include_leaf=True, now=now)

    def check_expiry(self, creds: Credentials, include_leaf: bool = True, now: float | None = None) -> None:
        """Warn once per certificate and threshold when one of ours (leaf,
        intermediates, trust anchors) expires within 30, 7 or 1 days and is
        past half its lifetime. A leaf that is renewed automatically is left
        out while renewals succeed (``include_leaf=False``)."""
        now = time.time() if now is None else now
        try:
            chain = load_pem_certs(creds.chain_pem)
            roots = load_pem_certs(creds.roots_pem)
        except ValueError:
            return
        labelled = [("issuer", c) for c in chain[1:]] + [("trust anchor", c) for c in roots]
        if include_leaf and chain:
            labelled.insert(0, ("leaf", chain[0]))
        for role, cert in labelled:
            left = cert.not_valid_after_utc.timestamp() - now
            subject = _subject_text(cert)
            if left <= 0:
                if (subject, 0) not in self._warned:
                    self._warned.add((subject, 0))
                    log.error(f"{role} certificate has EXPIRED; meshed connections will fail", subject=subject, expired=cert.not_valid_after_utc.isoformat())
                continue
            # Only past half its life: a freshly issued 24 h leaf is not "expiring soon",
            # the same leaf that nobody renewed by its 12th hour is.
            half_life = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 2
            crossed = [t for t in EXPIRY_WARNINGS_S if left <= t and left <= half_life]
            if crossed:
                threshold = min(crossed)
                if (subject, threshold) not in self._warned:
                    self._warned.add((subject, threshold))
                    log.warning(f"{role} certificate expires soon", subject=subject, expires_in=_human(left), expires=cert.not_valid_after_utc.isoformat())


def _subject_text(cert: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # cryptography warns about CNs over 64 characters
        return cert.subject.rfc4514_string() or str(cert.serial_number)


def _human(seconds: float) -> str:
    if seconds < 0:
        return "expired"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds:.0f}s"


# ---------------------------------------------------------------- files (standalone)

class FilesSource:
    """PEM files: ``cert_file`` (leaf then intermediates), ``key_file``, and
    trust anchors as PEM text (``roots_pem``; when empty, ``roots.pem`` beside
    the certificate, as ``meshproxy identity issue`` writes it). ``name``
    empty means the leaf's first SAN."""

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        roots_pem: str,
        name: str,
        *,
        server_name: str = "",
        metrics: IdentityMetrics | None = None,
        poll_interval: float = FILES_POLL_INTERVAL_S,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.roots_pem = roots_pem
        self.roots_file = "" if roots_pem.strip() else os.path.join(os.path.dirname(os.path.abspath(cert_file)), "roots.pem")
        self.name = name
        self.server_name = server_name
        self.metrics = metrics or IdentityMetrics()
        self.poll_interval = poll_interval
        self.current: Credentials | None = None

    def _signature(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for path in (self.cert_file, self.key_file, self.roots_file):
            if not path:
                continue
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def load(self) -> Credentials:
        """Read and verify the files; raises OSError or CredentialsError."""
        with open(self.cert_file) as f:
            chain_pem = f.read()
        with open(self.key_file) as f:
            key_pem = f.read()
        roots_pem = self.roots_pem
        if self.roots_file:
            with open(self.roots_file) as f:
                roots_pem = f.read()
        name = self.name
        if not name:
            certs = load_pem_certs(chain_pem)
            names = cert_identities(certs[0]) if certs else []
            if not names:
                raise CredentialsError(f"{self.cert_file}: no DNS or URI SAN to take the identity from")
            name = names[0]
        try:
            creds = Credentials.from_pem(name, key_pem, chain_pem, roots_pem, self.server_name)
        except ValueError as exc:
            raise CredentialsError(f"{self.cert_file}: {exc}") from None
        creds.verify()
        return creds

    async def run(self, install: Install) -> None:
        seen: tuple[Any, ...] | None = None
        failed = False
        next_check = 0.0
        while True:
            signature = self._signature()
            if signature != seen or failed:
                changed, seen = signature != seen, signature
                try:
                    creds = self.load()
                except (OSError, ValueError) as exc:
                    failed = True
                    if changed:  # once per change, not once per poll
                        self.metrics.failed(exc, self.current)
                else:
                    failed = False
                    if creds != self.current:
                        install(creds)
                        self.current = creds
                        log.info("identity certificate loaded", identity=creds.name, file=self.cert_file, expires=_iso(creds.not_after))
                        self.metrics.refreshed(creds, renewing=False)
            now = time.monotonic()
            if self.current is not None and now >= next_check:
                next_check = now + EXPIRY_CHECK_INTERVAL_S
                self.metrics.check_expiry(self.current, include_leaf=True)
            await asyncio.sleep(self.poll_interval)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()


# ---------------------------------------------------------------- Linkerd identity service

class LinkerdIdentitySource:
    """Certificates from Linkerd's identity service (ref 5.3)."""

    def __init__(self, config: Any, *, metrics: IdentityMetrics | None = None, tls: bool | None = None, certify_timeout: float = CERTIFY_TIMEOUT_S) -> None:
        self.name: str = config.identity_local_name or config.identity_server_id
        if not self.name:
            raise ValueError("LINKERD2_PROXY_IDENTITY_LOCAL_NAME is required with the identity service")
        self.server_name: str = config.identity_server_name or self.name
        self.identity_dir: str = config.identity_dir
        self.token_file: str = config.identity_token_file
        self.roots_pem: str = config.identity_trust_anchors
        if not load_pem_certs(self.roots_pem):
            raise ValueError("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS holds no certificate")
        self.svc_addr: str = config.identity_svc_addr
        self.svc_name: str = config.identity_svc_name
        self.min_refresh: float = config.identity_min_refresh
        self.max_refresh: float = config.identity_max_refresh
        self.metrics = metrics or IdentityMetrics()
        self.tls = tls  # None: TLS unless the address is loopback (Linkerd's rule)
        self.certify_timeout = certify_timeout
        self.current: Credentials | None = None

    def _client_context(self) -> Any:
        # Before the first certificate we present none (ref 5.3); after, our own.
        if self.current is not None:
            return self.current.client_context()
        return roots_client_context(self.roots_pem)

    def _read_token(self) -> bytes:
        with open(self.token_file, "rb") as f:
            token = f.read()
        if not token.strip():
            raise CredentialsError(f"the identity token file {self.token_file} is empty")
        return token

    async def certify(self, now: Callable[[], float] = time.time) -> tuple[Credentials, float]:
        """One Certify call; returns the verified credentials and the expiry
        the refresh is scheduled from (``valid_until``)."""
        with open(os.path.join(self.identity_dir, "key.p8"), "rb") as f:
            key_der = f.read()
        with open(os.path.join(self.identity_dir, "csr.der"), "rb") as f:
            csr_der = f.read()
        request = protowire.CertifyRequest(identity=self.name, token=self._read_token(), certificate_signing_request=csr_der)
        channel = GrpcChannel(self.svc_addr, ssl_context=self._client_context, server_name=self.svc_name or None, tls=self.tls)
        try:
            raw = await channel.unary(protowire.CERTIFY_METHOD, request.encode(), timeout=self.certify_timeout)
        finally:
            await channel.close()
        response = protowire.CertifyResponse.decode(raw)
        if not response.leaf_certificate:
            raise CredentialsError("the identity service sent no leaf certificate")
        t = now()
        creds = Credentials.from_der(self.name, key_der, [response.leaf_certificate, *response.intermediate_certificates], self.roots_pem, self.server_name)
        expiry = response.valid_until.to_epoch() if response.valid_until is not None else creds.not_after
        if expiry <= t:
            raise CredentialsError(f"the identity service sent a certificate valid only until {_iso(expiry)}")
        creds.verify(t)
        return creds, min(expiry, creds.not_after)

    async def run(self, install: Install) -> None:
        while True:
            try:
                creds, expiry = await self.certify()
            except (GrpcError, OSError, ValueError) as exc:
                # ValueError covers CredentialsError and protobuf DecodeError.
                self.metrics.failed(exc, self.current)
                delay = self.min_refresh
            else:
                install(creds)
                first = self.current is None
                self.current = creds
                self.metrics.refreshed(creds, renewing=True)
                delay = refresh_delay(expiry, time.time(), self.min_refresh, self.max_refresh)
                log.info("identity certificate issued" if first else "identity certificate renewed", identity=creds.name, expires=_iso(creds.not_after), refresh_in=_human(delay))
            await asyncio.sleep(delay)


# ---------------------------------------------------------------- SPIRE

def spire_socket_path(addr: str) -> str:
    """``unix:///run/spire.sock``, ``unix:/run/spire.sock`` or a bare path -> the path."""
    for prefix in ("unix://", "unix:"):
        if addr.startswith(prefix):
            return addr[len(prefix):]
    return addr


class SpireSource:
    """X.509-SVIDs from a SPIRE agent's Workload API (ref 11.2)."""

    def __init__(self, config: Any, *, metrics: IdentityMetrics | None = None) -> None:
        self.socket_path = spire_socket_path(config.identity_spire_addr)
        self.server_id: str = config.identity_server_id or config.identity_local_name
        if not self.server_id:
            raise ValueError("LINKERD2_PROXY_IDENTITY_SERVER_ID (a spiffe:// ID) is required with SPIRE")
        self.server_name: str = config.identity_server_name or config.identity_local_name or self.server_id
        # Linkerd verifies SVIDs against its own trust anchors (which must be SPIRE's
        # upstream CA); without any, the SVID's own bundle is used.
        self.roots_pem: str = config.identity_trust_anchors
        self.metrics = metrics or IdentityMetrics()
        self.current: Credentials | None = None

    def credentials_from(self, response: protowire.X509SVIDResponse) -> Credentials | None:
        """Our SVID from one Workload API message, verified; None when absent."""
        for svid in response.svids:
            if svid.spiffe_id == self.server_id:
                break
        else:
            log.warning("no matching SVID found", spiffe_id=self.server_id, offered=[s.spiffe_id for s in response.svids])
            return None
        chain = split_der_certs(svid.x509_svid)
        roots = self.roots_pem if load_pem_certs(self.roots_pem) else der_to_pem(split_der_certs(svid.bundle))
        creds = Credentials.from_der(self.server_id, svid.x509_svid_key, chain, roots, self.server_name)
        creds.verify()
        return creds

    async def run(self, install: Install) -> None:
        backoff = SPIRE_BACKOFF_MIN_S
        while True:
            channel = GrpcChannel(f"unix:{self.socket_path}")
            try:
                async with channel.server_stream(protowire.FETCH_X509_SVID_METHOD, protowire.X509SVIDRequest().encode(), metadata=protowire.WORKLOAD_API_METADATA) as stream:
                    async for raw in stream:
                        backoff = SPIRE_BACKOFF_MIN_S  # the agent answers: start over at the shortest wait
                        self._update(raw, install)
                log.info("the SPIRE agent ended the Workload API stream; reconnecting")
            except GrpcError as exc:
                if exc.code == StatusCode.INVALID_ARGUMENT:
                    # Linkerd stops here; we keep trying at the slowest pace, so a fixed
                    # agent is picked up without restarting the proxy.
                    log.error("the SPIRE agent rejected the Workload API call", error=str(exc))
                    backoff = SPIRE_BACKOFF_MAX_S
                else:
                    log.warning("SPIRE Workload API unavailable; retrying", error=str(exc), socket=self.socket_path)
            finally:
                await channel.close()
            await asyncio.sleep(backoff * (1 + random.uniform(0, SPIRE_BACKOFF_JITTER)))
            backoff = min(backoff * 2, SPIRE_BACKOFF_MAX_S)

    def _update(self, raw: bytes, install: Install) -> None:
        try:
            creds = self.credentials_from(protowire.X509SVIDResponse.decode(raw))
        except ValueError as exc:  # DecodeError, CredentialsError
            self.metrics.failed(exc, self.current)
            return
        if creds is None or creds == self.current:
            return
        install(creds)
        first = self.current is None
        self.current = creds
        self.metrics.refreshed(creds, renewing=True)
        log.info("SPIFFE identity installed" if first else "SPIFFE identity rotated", identity=creds.name, expires=_iso(creds.not_after))


# ---------------------------------------------------------------- choosing

def source_from_config(config: Any, metrics: IdentityMetrics | None = None) -> IdentitySource | None:
    """SPIRE if its address is set, else the identity service if its address is
    set, else files if both files are set, else None (no identity)."""
    if config.identity_spire_addr:
        return SpireSource(config, metrics=metrics)
    if config.identity_svc_addr:
        return LinkerdIdentitySource(config, metrics=metrics)
    if config.identity_cert_file and config.identity_key_file:
        return FilesSource(
            config.identity_cert_file,
            config.identity_key_file,
            config.identity_trust_anchors,
            config.identity_local_name or config.identity_server_id,
            server_name=config.identity_server_name,
            metrics=metrics,
        )
    return None
