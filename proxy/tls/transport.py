"""mTLS connections whose records are protected by proxy.tls.records, after an OpenSSL handshake.

Theory of operation: ``handshake`` runs Python's ``ssl.SSLObject`` (OpenSSL,
the same contexts, the same verification) over memory BIOs on a plain TCP
transport, feeding it one record at a time, so that when OpenSSL reports the
handshake done it has read nothing past its peer's Finished. The traffic
secrets come from the context's key log (``KeyLog``: an anonymous in-memory
file, matched to the connection by the ClientHello's random). From then on a
``TlsTransport`` seals and opens application records itself: one AEAD call per
16 KiB record, reads straight from the socket into one buffer, and plaintext
written straight into the next protocol's buffer when it has one. To the
protocols above it is an ordinary asyncio transport (``get_extra_info`` gives
the ``ssl_object`` and its peer certificate, as an SSL transport does).

Whenever the fast path cannot be taken safely (no key log in this process, the
secrets not found, a suite or version it does not know, a server context that
sends tickets) the same transport protects records through the SSLObject and
its BIOs instead, which is the ordinary OpenSSL path; ``TlsTransport.offloaded``
tells which one runs. A record that does not authenticate, an unexpected alert
or message ends the connection with an error; close_notify is the end of the
stream.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from proxy.log import get_logger
from proxy.native import load
from proxy.tls import records
from proxy.tls.records import RecordError

log = get_logger("proxy.tls")
# Sealer and Opener: the compiled twin (libcrypto EVP) or the pure one (cryptography's AEADs).
_twin, RECORDS_IMPLEMENTATION = load("records", "proxy.tls.records")

_CLIENT_HELLO_RANDOM = slice(11, 43)  # record header 5, handshake header 4, legacy_version 2
_KEYLOG_MAX_ENTRIES = 4096  # handshakes that never finish leave entries; keep the newest
_PLAIN_SIZE = 256 * 1024 + records.MAX_PLAINTEXT  # plaintext of one socket read's records


class KeyLog:
    """The TLS secrets of this process's handshakes, written by OpenSSL to an anonymous
    in-memory file (``SSLContext.keylog_filename``; Python offers no key log callback)
    and taken out by client random as soon as a handshake is done. The file is emptied
    on every read, so secrets do not pile up; nothing reaches a disk."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.fd = os.memfd_create("meshproxy-tls-keylog", os.MFD_CLOEXEC)
        self.path = f"/proc/{self.pid}/fd/{self.fd}"
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._secrets: dict[bytes, dict[str, list[bytes]]] = {}
        self._offset = 0  # bytes of the file already read

    def attach(self, ctx: ssl.SSLContext) -> None:
        ctx.keylog_filename = self.path
        self._contexts.add(ctx)

    def covers(self, ctx: ssl.SSLContext) -> bool:
        """True when ``ctx`` logs its secrets here, in this process (not in a parent's file)."""
        return os.getpid() == self.pid and ctx in self._contexts

    def take(self, client_random: bytes) -> dict[str, bytes]:
        """The secrets logged for ``client_random`` (label -> secret), forgotten here. Each
        side of a handshake logs its own copy, so a connection to ourselves takes one each."""
        self._read()
        entry = self._secrets.get(client_random)
        if not entry:
            return {}
        taken = {label: copies.pop(0) for label, copies in entry.items() if copies}
        if not any(entry.values()):
            del self._secrets[client_random]
        return taken

    def _read(self) -> None:
        size = os.fstat(self.fd).st_size
        if size <= self._offset:
            return
        data = os.pread(self.fd, size - self._offset, self._offset)
        # Whole lines only (OpenSSL writes and flushes one line at a time, from this thread).
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        if self._offset == size:
            os.ftruncate(self.fd, 0)  # the writer appends (O_APPEND): it goes on at 0
            self._offset = 0
        for line in data[:cut].split(b"\n"):
            parts = line.split()
            if len(parts) != 3 or line.startswith(b"#"):
                continue
            try:
                random, secret = bytes.fromhex(parts[1].decode()), bytes.fromhex(parts[2].decode())
            except ValueError:
                continue
            entry = self._secrets.get(random)
            if entry is None:
                if len(self._secrets) >= _KEYLOG_MAX_ENTRIES:
                    del self._secrets[next(iter(self._secrets))]
                entry = self._secrets[random] = {}
            entry.setdefault(parts[0].decode(), []).append(secret)


_keylog: KeyLog | None = None


def keylog() -> KeyLog | None:
    """This process's key log (made on first use; None where memfd is missing)."""
    global _keylog
    if _keylog is None or _keylog.pid != os.getpid():
        if not hasattr(os, "memfd_create"):
            return None
        _keylog = KeyLog()
    return _keylog


# ------------------------------------------------------------------ record backends


class _OpenSslRecords:
    """The ordinary path: records through the SSLObject and its memory BIOs. Same
    interface as the pair (records.Sealer, records.Opener) the fast path uses."""

    def __init__(self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self.sslobj, self.incoming, self.outgoing = sslobj, incoming, outgoing
        self._in = memoryview(bytearray(256 * 1024))
        self.closed = False
        self.update_requested = False
        self.pending_output = b""

    # sealing
    def seal(self, data: Any) -> bytes:
        self.sslobj.write(data)
        return self.outgoing.read()

    def lend(self) -> None:
        pass  # every output is a new bytes object

    def close_notify(self) -> bytes:
        try:
            self.sslobj.unwrap()
        except ssl.SSLError:
            pass
        return self.outgoing.read()

    # opening
    def space(self) -> memoryview:
        return self._in

    def received(self, nbytes: int) -> None:
        self.incoming.write(self._in[:nbytes])

    def feed(self, data: Any) -> None:
        self.incoming.write(data)

    def read_into(self, out: memoryview) -> int:
        written = 0
        while written < len(out) and not self.closed:
            try:
                n: Any = self.sslobj.read(len(out) - written, out[written:])  # into the buffer: an int
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            except ssl.SSLError as exc:
                raise RecordError(records.BAD_RECORD_MAC, f"TLS error: {exc}") from None
            if not n:
                break
            written += n
        if self.outgoing.pending:
            self.pending_output = self.outgoing.read()  # e.g. a KeyUpdate answered by OpenSSL
        return written

    @property
    def pending(self) -> int:
        return int(self.incoming.pending)


# ------------------------------------------------------------------ the transport


class _RawSide:
    """The protocol of the TCP transport under a TlsTransport: reads straight into the
    record buffer and passes every event up."""

    __slots__ = ("tls",)

    def __init__(self, tls: TlsTransport) -> None:
        self.tls = tls

    def connection_made(self, transport: Any) -> None:
        pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.tls._records_in.space()

    def buffer_updated(self, nbytes: int) -> None:
        self.tls._records_in.received(nbytes)
        self.tls._deliver()

    def data_received(self, data: bytes) -> None:
        self.tls._records_in.feed(data)
        self.tls._deliver()

    def eof_received(self) -> bool:
        self.tls._raw_eof()
        return True

    def pause_writing(self) -> None:
        if self.tls._app is not None:
            self.tls._app.pause_writing()

    def resume_writing(self) -> None:
        if self.tls._app is not None:
            self.tls._app.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.tls._raw_lost(exc)


class TlsTransport(asyncio.Transport):
    """An established TLS 1.3 connection over a TCP transport."""

    def __init__(self, raw: Any, sslobj: ssl.SSLObject, sealer: Any, opener: Any, offloaded: bool) -> None:
        super().__init__()
        self._raw = raw
        self._sslobj = sslobj
        self._sealer = sealer
        self._records_in = opener
        self.offloaded = offloaded
        self._app: Any = None
        self._app_buffered = False
        self._plain: memoryview | None = None
        self._backlog = b""  # opened, not yet taken by a protocol with small buffers
        self._paused = False
        self._started = False  # reading waits for the first protocol (start())
        self._closing = False
        self._eof = False  # the protocol was told the stream ended
        self._tcp_eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._handshake_end: tuple[bool, tuple[BaseException | None] | None] = (False, None)
        raw.set_protocol(_RawSide(self))
        # Nothing reads the records until start(): stop reading the socket so they cannot pile up.
        raw.pause_reading()

    # -- asyncio.BaseTransport
    def set_protocol(self, protocol: Any) -> None:
        self._app = protocol
        self._app_buffered = hasattr(protocol, "get_buffer") and not isinstance(protocol, asyncio.Protocol)

    def get_protocol(self) -> Any:
        return self._app

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._send_close_notify()
        self._raw.close()  # after what is still buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "sslcontext":
            return self._sslobj.context
        if name == "compression":
            return None
        return self._raw.get_extra_info(name, default)

    # -- asyncio.ReadTransport
    def is_reading(self) -> bool:
        return not self._paused and not self.is_closing()

    def pause_reading(self) -> None:
        self._paused = True
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._started and not self._raw.is_closing():
            self._raw.resume_reading()
        # Records that arrived before the pause go out on the next loop turn, never from inside
        # this call: as with asyncio's transports, a protocol may resume and then write what it
        # held (the relay's link() does), and a synchronous delivery would overtake those bytes.
        asyncio.get_running_loop().call_soon(self._deliver_if_reading)

    def _deliver_if_reading(self) -> None:
        if not self._paused and self._started and not self._lost:
            self._deliver()

    # -- asyncio.WriteTransport
    def write(self, data: Any) -> None:
        if not data:
            return
        if self._closing or self._sealer.closed:
            return  # as asyncio's transports: writes after close are dropped
        raw = self._raw
        raw.write(self._sealer.seal(data))
        if raw.get_write_buffer_size():
            self._sealer.lend()  # the TCP transport keeps a view of what it could not send yet

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # as ssl transports: TLS has no half-close that TCP peers would see

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot write EOF")

    def get_write_buffer_size(self) -> int:
        return int(self._raw.get_write_buffer_size())

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    # -- from the raw side
    def _deliver(self) -> None:
        """Open the records received so far and hand the plaintext to the protocol, in
        order, then the end of the stream once everything before it is delivered."""
        opener = self._records_in
        while not self._paused and not self._eof:
            app = self._app  # read each time: the protocol may hand the transport on
            if app is None:
                return
            try:
                if self._backlog:
                    self._push_backlog(app)
                    continue
                if self._app_buffered:
                    view = memoryview(app.get_buffer(_PLAIN_SIZE)).cast("B")
                    if len(view) >= records.MAX_PLAINTEXT + 256:
                        n = opener.read_into(view)
                        if n:
                            app.buffer_updated(n)
                    else:
                        n = self._deliver_copied(opener, app)
                else:
                    plain = self._plain_buffer(opener.pending)
                    n = opener.read_into(plain)
                    if n:
                        app.data_received(bytes(plain[:n]))
            except RecordError as exc:
                self._fatal(exc)
                return
            if opener.update_requested:
                opener.update_requested = False
                self._raw.write(self._sealer.key_update())
            if opener.pending_output:
                self._raw.write(opener.pending_output)
                opener.pending_output = b""
            if opener.closed:
                self._peer_closed()
                return
            if not n:
                if self._tcp_eof and not self._paused:
                    if opener.pending:
                        self._fatal(RecordError(records.DECODE_ERROR, "the TCP stream ended inside a TLS record"))
                        return
                    self._peer_closed()  # TCP ended without close_notify: an EOF all the same
                return

    def _deliver_copied(self, opener: Any, app: Any) -> int:
        # A protocol whose buffers are smaller than a record: open into our own, then copy.
        plain = self._plain_buffer(opener.pending)
        n = opener.read_into(plain)
        self._backlog = bytes(plain[:n])
        self._push_backlog(app)
        return n

    def _plain_buffer(self, pending: int) -> memoryview:
        # Sized by what arrives (plaintext is never longer than its records), so a connection
        # of small messages keeps a small buffer; at least one record's worth.
        plain = self._plain
        if plain is None or (len(plain) < pending and len(plain) < _PLAIN_SIZE):
            size = min(_PLAIN_SIZE, max(pending, records.MAX_PLAINTEXT + 256, 2 * len(plain) if plain is not None else 0))
            plain = self._plain = memoryview(bytearray(size))
        return plain

    def _push_backlog(self, app: Any) -> None:
        """Copy opened plaintext into the protocol's buffers for as long as it reads."""
        data, pos = self._backlog, 0
        while pos < len(data) and not self._paused and self._app is app:
            view = memoryview(app.get_buffer(len(data) - pos)).cast("B")
            k = min(len(view), len(data) - pos)
            if k == 0:
                raise RecordError(records.UNEXPECTED_MESSAGE, "the protocol gave an empty buffer")
            view[:k] = data[pos:pos + k]
            pos += k
            app.buffer_updated(k)
        self._backlog = data[pos:]

    def _peer_closed(self) -> None:
        """close_notify, or the TCP stream ended: the peer sends no more."""
        if self._eof:
            return
        self._eof = True
        keep_open = self._app.eof_received()
        if not keep_open:
            self.close()

    def _raw_eof(self) -> None:
        self._tcp_eof = True
        self._deliver()  # what is still buffered goes first; the EOF follows it

    def _raw_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        app = self._app
        if app is not None:
            app.connection_lost(self._error or exc)

    def _fatal(self, exc: RecordError) -> None:
        log.info("TLS connection closed on a record error", error=str(exc), alert=exc.alert)
        self._error = ConnectionError(f"TLS: {exc}")
        self._closing = True
        self._raw.abort()

    def _send_close_notify(self) -> None:
        sealer = self._sealer
        if sealer.closed or self._raw.is_closing():
            return
        try:
            self._raw.write(sealer.close_notify())
        except (RecordError, ssl.SSLError, RuntimeError):
            pass


# ------------------------------------------------------------------ the handshake


class _Handshake:
    """The protocol of a TCP transport during the TLS handshake: OpenSSL over memory BIOs,
    fed one record at a time so it never reads past its peer's Finished."""

    def __init__(self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool) -> None:
        self.sslobj, self.incoming, self.outgoing = sslobj, incoming, outgoing
        self.server_side = server_side
        self.transport: Any = None
        self.buf = bytearray()  # received, not yet given to OpenSSL; after the handshake: records
        self.client_random = b""
        self.eof = False
        self.lost: tuple[BaseException | None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self.server_side:
            self._step()  # the ClientHello

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done.done():
            return  # records: the TlsTransport takes them over
        buf = self.buf
        while len(buf) >= records.HEADER and not self.done.done():
            size = records.HEADER + ((buf[3] << 8) | buf[4])
            if len(buf) < size:
                break
            record = bytes(buf[:size])
            del buf[:size]
            if self.server_side and not self.client_random and record[0] == records.HANDSHAKE and len(record) >= 43 and record[5] == 1:
                self.client_random = record[_CLIENT_HELLO_RANDOM]
            self.incoming.write(record)
            self._step()

    def _step(self) -> None:
        try:
            self.sslobj.do_handshake()
            finished = True
        except ssl.SSLWantReadError:
            finished = False
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._fail(exc)
            return
        self._flush()
        if finished and not self.done.done():
            # Records from here on are the TlsTransport's: hold them in the socket until it exists.
            self.transport.pause_reading()
            self.done.set_result(None)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            if not self.server_side and not self.client_random and data[0] == records.HANDSHAKE and len(data) >= 43 and data[5] == 1:
                self.client_random = data[_CLIENT_HELLO_RANDOM]
            self.transport.write(data)

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def eof_received(self) -> bool:
        self.eof = True
        self._fail(ConnectionResetError("the peer closed the connection during the TLS handshake"))
        return True  # after a finished handshake the TlsTransport passes the EOF on

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = (exc,)
        self._fail(exc or ConnectionResetError("connection lost during the TLS handshake"))

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def _records_for(hs: _Handshake, ctx: ssl.SSLContext) -> tuple[Any, Any, bool]:
    """(sealer, opener, offloaded) for a finished handshake."""
    sslobj = hs.sslobj
    suite, version = (sslobj.cipher() or ("", "", 0))[:2]
    secrets: dict[str, bytes] = {}
    klog = keylog()
    if klog is not None and klog.covers(ctx) and hs.client_random:
        secrets = klog.take(hs.client_random)
    ours, theirs = ("SERVER_TRAFFIC_SECRET_0", "CLIENT_TRAFFIC_SECRET_0") if hs.server_side else ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")
    # A server that sends tickets has already used its first sequence numbers: not ours to guess.
    tickets_sent = hs.server_side and getattr(ctx, "num_tickets", 0) != 0
    if version == "TLSv1.3" and suite in records.SUITES and ours in secrets and theirs in secrets and not tickets_sent:
        try:
            return _twin.Sealer(suite, secrets[ours]), _twin.Opener(suite, secrets[theirs]), True
        except ValueError as exc:
            log.info("TLS record offload not used", reason=str(exc))
    else:
        log.debug("TLS record offload not used", suite=suite, version=version, secrets=sorted(secrets))
    backend = _OpenSslRecords(sslobj, hs.incoming, hs.outgoing)
    return backend, backend, False


def usable(ctx: Any) -> bool:
    """Whether ``handshake`` may be used with this context (its secrets are logged here)."""
    klog = keylog()
    return klog is not None and isinstance(ctx, ssl.SSLContext) and klog.covers(ctx)


async def handshake(
    connect: Callable[[Callable[[], Any]], Any],
    ctx: ssl.SSLContext,
    server_side: bool,
    server_hostname: str | None = None,
) -> TlsTransport:
    """Run the handshake over the TCP transport ``connect(protocol_factory)`` makes (a
    coroutine: ``loop.create_connection`` or ``loop.connect_accepted_socket``, bound to
    their address or socket) and return the TlsTransport. The caller bounds it in time."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
    hs = _Handshake(sslobj, incoming, outgoing, server_side)
    raw = None
    try:
        raw, _ = await connect(lambda: hs)
        await hs.done
    except BaseException:
        if raw is not None:
            raw.abort()
        elif hs.transport is not None:
            hs.transport.abort()
        raise
    sealer, opener, offloaded = _records_for(hs, ctx)
    tls = TlsTransport(raw, sslobj, sealer, opener, offloaded)
    if hs.buf:
        opener.feed(hs.buf)  # records that came with (or after) the peer's Finished
    tls._handshake_end = (hs.eof, hs.lost)
    return tls


def start(tls: TlsTransport, protocol: Any) -> None:
    """Give the transport its protocol and deliver what arrived with the handshake."""
    tls.set_protocol(protocol)
    protocol.connection_made(tls)
    tls._started = True
    tls._deliver()
    if not tls._paused and not tls._raw.is_closing():
        tls._raw.resume_reading()
    eof, lost = tls._handshake_end
    if eof:
        tls._raw_eof()
    if lost is not None:
        tls._raw_lost(lost[0])
