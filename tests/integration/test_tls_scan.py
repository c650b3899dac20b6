"""testssl.sh (Debian package) against the inbound port: TLS 1.3 only, no weak cipher."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from proxy.tls import ca
from tests.integration.test_identity_mtls import SERVER_ID, write_identity
from tests.support import ThreadedServer, make_proxy


@pytest.mark.timeout(240)
def test_testssl_finds_tls13_only_and_no_weak_cipher(tmp_path):
    if shutil.which("testssl") is None:
        pytest.skip("testssl (Debian package testssl.sh) is not installed")
    app = ThreadedServer(lambda conn: conn.recv(10))
    proxy = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}",
                       **write_identity(tmp_path / "id", ca.make_ca("cluster.local"), SERVER_ID)).start()
    try:
        # The SNI is the host part of the target; --ip keeps the scan on loopback.
        out = subprocess.run(["testssl", "--quiet", "--color", "0", "--sneaky", "--protocols", "--std",
                              "--ip", "127.0.0.1", f"{SERVER_ID}:{proxy.inbound}"],
                             capture_output=True, text=True, timeout=220).stdout
        def line_of(prefix: str) -> str:
            return next(x for x in out.splitlines() if x.strip().startswith(prefix))

        for old in ("SSLv2 ", "SSLv3 ", "TLS 1 ", "TLS 1.1 ", "TLS 1.2 "):
            assert "not offered" in line_of(old), line_of(old)
        assert any(x.strip().startswith("TLS 1.3") and "offered (OK)" in x for x in out.splitlines()), out
        for weak in ("NULL ciphers", "Anonymous NULL", "Export ciphers", "LOW: 64 Bit", "Triple DES", "Obsolete CBC"):
            line = next(x for x in out.splitlines() if weak in x)
            assert "not offered" in line, line
    finally:
        proxy.stop()
        app.close()
