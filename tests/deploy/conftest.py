"""Debian's nginx in front of a real broker, both configured exactly as docs/deployment.md says.

- ``deployment_broker(**overrides)`` starts an in-process broker from the doc's TOML
  block (with ``port = 0``, secrets in the environment as the doc has them, and the
  test's ``overrides``).
- ``start_nginx(broker)`` renders the doc's nginx block into a minimal
  ``nginx.conf`` (its ``listen`` ports become free loopback ports, the upstream the
  broker's port and the certificate a test CA's; nothing else changes) and runs
  nginx on it, stopped when the test ends whatever happens.
- :meth:`Nginx.open_ws` connects through it as a browser would (TLS, ``Host:
  chat.example.com``, an ``Origin``) from a source address of the test's choosing:
  all of 127.0.0.0/8 is loopback on Linux, so 127.0.0.2 and 127.0.0.3 are two
  clients on two addresses.

nginx comes from ``TOKENFAN_NGINX``, the ``PATH`` or ``/usr/sbin/nginx``;
``make test`` installs it (scripts/test-prereqs). Without it the tests fail,
naming it: they are never skipped.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import wsproto
import wsproto.events as wse
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import protocol as p
from broker import Broker
from broker.config import load_config
from tests.test_docs_examples import ROOT, blocks_of

DOC = ROOT / "docs" / "deployment.md"
SITE = "chat.example.com"  # the doc's site name; clients send it as Host and TLS server name
ORIGIN = f"https://{SITE}"
JWT_SECRET = "deploy-test-secret-" * 3
API_KEY = "deploy-test-api-key-0123456789"
NGINX = os.environ.get("TOKENFAN_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"


def doc_block(lang: str) -> str:
    """The one fenced block of ``lang`` in docs/deployment.md."""
    found = [block.code for block in blocks_of(DOC) if block.lang == lang]
    assert len(found) == 1, f"docs/deployment.md should have exactly one {lang} block, has {len(found)}"
    return found[0]


# -- the broker ---------------------------------------------------------------------

StartBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
def deployment_broker(nursery: trio.Nursery, tmp_path: Path) -> StartBroker:
    """Start a broker configured by the doc's TOML block; ``overrides`` as on the command line."""

    async def start(**overrides: Any) -> Broker:
        path = tmp_path / "tokenfan.toml"
        path.write_text(doc_block("toml"))
        env = {"TOKENFAN_JWT_SECRET": JWT_SECRET, "TOKENFAN_API_KEYS": API_KEY}
        config = load_config(path, env=env, overrides={"port": 0, "ai_demo_tokens_per_second": 2000,
                                                       **overrides})
        broker = Broker(config)
        await nursery.start(broker.serve)
        return broker

    return start


# -- TLS ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """A test CA and a certificate it signed for :data:`SITE` (and 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def _make_tls(folder: Path) -> Tls:
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenfan test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SITE)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(SITE), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    tls = Tls(folder / "ca.pem", folder / "fullchain.pem", folder / "privkey.pem")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                         + ca.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return tls


# -- a WebSocket client through the proxy ------------------------------------------------


class ProxiedWs:
    """A WebSocket client over TLS through the proxy that keeps every frame it was sent."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.frames: list[p.Frame] = []
        self.accepted = False
        self.status: int | None = None  #: the HTTP status of a refused upgrade
        self.close_code: int | None = None
        self.eof = False
        self._decoder = p.Decoder(peer=p.Peer.SERVER, limits=p.SERVER_LIMITS)

    async def send(self, event: wse.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def command(self, frame: p.ClientFrame) -> None:
        await self.send(wse.Message(data=p.encode(frame)))

    async def _receive(self) -> None:
        data = bytes(await self.stream.receive_some(65536))
        if not data:
            self.eof = True
        self.ws.receive_data(data or None)
        for event in self.ws.events():
            if isinstance(event, wse.AcceptConnection):
                self.accepted = True
            elif isinstance(event, wse.RejectConnection):
                self.status = event.status_code
            elif isinstance(event, wse.BytesMessage):
                self._decoder.feed(bytes(event.data))
                self.frames += list(self._decoder)
            elif isinstance(event, wse.CloseConnection):
                self.close_code = event.code

    async def read_until(self, done: Callable[[], bool], what: str, seconds: float = 10) -> None:
        """Read until ``done()``; fail naming ``what`` if the connection ends or time runs out first."""
        with trio.move_on_after(seconds):
            while not done() and not self.eof and self.close_code is None:
                await self._receive()
        assert done(), f"{what} did not happen: frames {self.frames}, close code {self.close_code}"

    async def reply(self, frame: p.Ping | p.Sub) -> p.Frame:
        """Send ``frame`` and return the ``ok`` or ``err`` that answers it."""
        await self.command(frame)

        def answer() -> p.Frame | None:
            return next((f for f in self.frames if isinstance(f, (p.Ok, p.Err)) and f.id == frame.id), None)

        await self.read_until(lambda: answer() is not None, f"an answer to {frame}")
        found = answer()
        assert found is not None
        return found

    async def read_until_closed(self) -> None:
        await self.read_until(lambda: self.close_code is not None, "the close", seconds=5)

    def bye(self) -> p.Bye:
        return next(f for f in self.frames if isinstance(f, p.Bye))


# -- nginx ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_site(site: str, *, upstream: int, http_port: int, https_port: int, tls: Tls) -> str:
    """The doc's nginx block with its ports and certificate paths changed, and nothing else."""
    changes = {
        "server 127.0.0.1:8765;": f"server 127.0.0.1:{upstream};",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        f"/etc/letsencrypt/live/{SITE}/fullchain.pem": str(tls.cert),
        f"/etc/letsencrypt/live/{SITE}/privkey.pem": str(tls.key),
    }
    for old, new in changes.items():
        assert site.count(old) == 1, f"docs/deployment.md's nginx block no longer has {old!r} once"
        site = site.replace(old, new)
    directives = re.sub(r"#[^\n]*", "", site)
    # Only loopback ports the test picked, and no file of the machine's.
    assert all(address.startswith("127.0.0.1:")
               for address in re.findall(r"\blisten\s+(\S+)", directives)), directives
    assert "/etc/" not in directives, directives
    return site


def _main_conf(site: str, folder: Path) -> str:
    """A minimal nginx.conf around ``site``, everything it writes under ``folder``.

    One process (``master_process off``), so that run as root nginx has no worker to
    hand to another user, and nothing outlives it.
    """
    temp_paths = "\n".join(f"    {name}_temp_path {folder / name};"
                           for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\nmaster_process off;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} info;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    access_log {folder / 'access.log'};\n{temp_paths}\n\n{site}\n}}\n")


@dataclass
class Nginx:
    process: trio.Process
    folder: Path
    http_port: int
    https_port: int
    tls: Tls
    opened: list[ProxiedWs] = field(default_factory=list)

    def log(self) -> str:
        logs = [self.folder / "stderr.log", self.folder / "error.log"]
        return "\n".join(path.read_text(errors="replace") for path in logs if path.exists())

    async def open_ws(self, *, source: str = "127.0.0.1", target: str = "/ws",
                      headers: Sequence[tuple[bytes, bytes]] = ()) -> ProxiedWs:
        """Upgrade to a WebSocket through nginx (``wss://chat.example.com/ws``) from ``source``."""
        with trio.fail_after(10):
            tcp = await trio.open_tcp_stream("127.0.0.1", self.https_port, local_address=source)
            client = ProxiedWs(trio.SSLStream(tcp, self.tls.client_context(), server_hostname=SITE))
            self.opened.append(client)
            await client.stream.do_handshake()
            await client.send(wse.Request(host=SITE, target=target,
                                          extra_headers=[(b"Origin", ORIGIN.encode()), *headers]))
        await client.read_until(lambda: client.accepted or client.status is not None, "the upgrade")
        return client

    @asynccontextmanager
    async def https(self) -> AsyncIterator[httpx.AsyncClient]:
        """An HTTP client for ``https://chat.example.com`` through nginx."""
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{self.https_port}",
                                     headers={"Host": SITE}, verify=self.tls.client_context(),
                                     timeout=30) as client:
            yield client

    async def stop(self) -> None:
        """Stop nginx (SIGTERM: it closes its connections at once), killing it after 5 s."""
        with trio.CancelScope(shield=True):
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    await self.process.wait()
            if self.process.poll() is None:
                self.process.kill()
                await self.process.wait()


StartNginx = Callable[[Broker], Awaitable[Nginx]]


async def _serving(nginx: Nginx) -> bool:
    """Wait (bounded) until nginx accepts on its TLS port; False if it exited instead."""
    with trio.move_on_after(10):
        while nginx.process.poll() is None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", nginx.https_port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return True
    return False


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    folder = tmp_path / "tls"
    folder.mkdir()
    return _make_tls(folder)


@pytest.fixture
async def start_nginx(tmp_path: Path, tls: Tls) -> AsyncIterator[StartNginx]:
    """``await start_nginx(broker)``: nginx as docs/deployment.md configures it, in front of
    ``broker``; stopped (its clients closed first) when the test ends, whatever happens."""
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"nginx not found at {NGINX}: `make test` installs Debian's nginx "
                    "(scripts/test-prereqs), or set TOKENFAN_NGINX=/path/to/nginx")
    site = doc_block("nginx")
    started: list[Nginx] = []

    async def start(broker: Broker) -> Nginx:
        assert broker.port is not None, "start the broker first"
        for attempt in range(3):  # a free port may be taken between our probe and nginx's bind
            folder = tmp_path / f"nginx-{len(started)}-{attempt}"
            folder.mkdir()
            http_port, https_port = free_port(), free_port()
            conf = folder / "nginx.conf"
            conf.write_text(_main_conf(render_site(site, upstream=broker.port, http_port=http_port,
                                                   https_port=https_port, tls=tls), folder))
            with (folder / "stderr.log").open("wb") as stderr:
                process = await trio.lowlevel.open_process(
                    [NGINX, "-p", f"{folder}/", "-e", str(folder / "error.log"), "-c", str(conf)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            nginx = Nginx(process, folder, http_port, https_port, tls)
            started.append(nginx)
            if await _serving(nginx):
                return nginx
            await nginx.stop()
            if "Address already in use" not in nginx.log():
                break
        pytest.fail(f"nginx did not start:\n{nginx.log()}")

    try:
        yield start
    finally:
        for nginx in started:
            for client in nginx.opened:
                await trio.aclose_forcefully(client.stream)
            await nginx.stop()
        for nginx in started:
            for line in nginx.log().splitlines():
                assert not re.search(r"\[(emerg|alert|crit)\]", line), nginx.log()
