r"""Mutual TLS between a driver and TFF workers on other machines.

TFF's `worker_binary` serves plaintext, unauthenticated gRPC on all
interfaces. A worker meant for other machines therefore runs behind a TLS
front (`python -m tff_fad.local_workers serve`): the worker listens only on
the loopback interface of a private network namespace, which nothing outside
can reach, and the front accepts on the machine's network, requires a client
certificate signed by the configured CA, and copies the decrypted bytes to
the worker. The driver (`tff_fad.workers`, `--worker_tls_*` flags) verifies
the worker's certificate against the same CA and presents its own.

  # Once, on a machine you trust: a throwaway CA and certificates.
  python -m tff_fad.worker_tls make-certs --out_dir certs \
      --worker_hosts 10.0.0.5,10.0.0.6
  # On each worker machine (copy ca.pem, worker.pem, worker.key there):
  python -m tff_fad.local_workers serve --listen 0.0.0.0:8000 \
      --tls_ca certs/ca.pem --tls_cert certs/worker.pem \
      --tls_key certs/worker.key
  # On the driver (ca.pem, driver.pem, driver.key):
  python -m research.baffle.main --output_dir out/b \
      --workers=10.0.0.5:8000,10.0.0.6:8000 --worker_tls_ca certs/ca.pem \
      --worker_tls_cert certs/driver.pem --worker_tls_key certs/driver.key

Why a front written on Python's `ssl` module rather than nginx or stunnel:
the certificate checks (chain, expiry, key usage) are OpenSSL's, through the
standard library; the front only copies bytes, it parses no gRPC. nginx and
stunnel are system packages (root on every worker machine, often not given
on a shared cluster), and neither can accept on a socket opened outside the
worker's private namespace, so each would need a second relay inside it.
Twisted's port forwarder would do, but it needs a typing-extensions that
TensorFlow 2.14 refuses (< 4.6). This module needs only the standard
library (and `cryptography` for `make-certs`).
"""

import asyncio
import dataclasses
import datetime
import ipaddress
import logging
import os
import socket
import ssl
import sys
from typing import Optional, Sequence

# What the TLS front and the driver's check speak: gRPC is HTTP/2.
_ALPN = ['h2']
_HTTP2_PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'
_HTTP2_EMPTY_SETTINGS = b'\x00\x00\x00\x04\x00\x00\x00\x00\x00'
_RELAY_CHUNK_BYTES = 1 << 20

logger = logging.getLogger('tff_fad.worker_tls')


class TlsSettingsError(ValueError):
  """TLS files that are missing, unreadable or do not belong together."""


def _check_files(**paths: Optional[str]) -> None:
  for name, path in paths.items():
    if path is not None and not os.path.isfile(path):
      raise TlsSettingsError(f'{name}: no such file {path!r}.')


def _load(context: ssl.SSLContext, ca_cert: str, cert: Optional[str],
          key: Optional[str], names: Sequence[str]) -> None:
  """Loads the CA and (optionally) the certificate and key, naming the flag."""
  ca_name, cert_name, key_name = names
  _check_files(**{ca_name: ca_cert, cert_name: cert, key_name: key})
  try:
    context.load_verify_locations(cafile=ca_cert)
  except ssl.SSLError as e:
    raise TlsSettingsError(f'{ca_name}: {ca_cert!r} holds no PEM CA '
                           f'certificate ({e.reason or e}).') from None
  if cert is None:
    return
  try:
    context.load_cert_chain(cert, key)
  except ssl.SSLError as e:
    raise TlsSettingsError(
        f'{cert_name} / {key_name}: cannot load {cert!r} with {key!r} '
        f'({e.reason or e}); is the key the certificate\'s?') from None


# ---------------------------------------------------------------------------
# The driver's side.


@dataclasses.dataclass(frozen=True)
class WorkerTls:
  """How a driver connects to TLS workers.

  Attributes:
    ca_cert: PEM file of the CA that signed the workers' certificates.
    cert: PEM certificate the driver presents (workers behind
      `local_workers serve` require one signed by their CA).
    key: Its private key (PEM).
  """
  ca_cert: str
  cert: Optional[str] = None
  key: Optional[str] = None

  def __post_init__(self):
    if (self.cert is None) != (self.key is None):
      raise TlsSettingsError('Give both the client certificate and its key '
                             f'(got cert={self.cert!r}, key={self.key!r}).')
    self.ssl_context()  # Fails now, naming the file, rather than at connect.

  def ssl_context(self) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, self.ca_cert, self.cert, self.key,
          ('ca_cert', 'cert', 'key'))
    context.set_alpn_protocols(_ALPN)
    return context

  def channel_credentials(self):
    """`grpc.ssl_channel_credentials` of these files."""
    import grpc  # pylint: disable=g-import-not-at-top

    def read(path):
      with open(path, 'rb') as f:
        return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(self.ca_cert),
        private_key=read(self.key) if self.key else None,
        certificate_chain=read(self.cert) if self.cert else None)


def _alert(e: ssl.SSLError) -> str:
  reason = (e.reason or '').lower()
  for prefix in ('sslv3_alert_', 'tlsv1_alert_', 'tlsv13_alert_'):
    if reason.startswith(prefix):
      return reason[len(prefix):].replace('_', ' ')
  return ''


def _speak_http2(sock, timeout_seconds: float) -> bytes:
  """Sends HTTP/2's client preface; the first bytes of the answer ('' at EOF).

  A gRPC server answers with its SETTINGS frame.
  """
  sock.settimeout(timeout_seconds)
  sock.sendall(_HTTP2_PREFACE + _HTTP2_EMPTY_SETTINGS)
  return sock.recv(9)


def check_worker(host: str, port: int, tls: Optional[WorkerTls],
                 timeout_seconds: float = 10.0) -> Optional[str]:
  """Why the worker at `host:port` refuses this driver, or None if it accepts.

  One TLS handshake (or none, with `tls=None`) and an HTTP/2 preface: gRPC
  would only say the channel never became ready, after its timeout.

  Returns:
    A reason ('' never), or None when the worker answered as a gRPC server.
    Connection failures (nothing listening) also return None: the caller's
    gRPC connect reports those.
  """
  try:
    raw = socket.create_connection((host, port), timeout=timeout_seconds)
  except OSError:
    return None
  with raw:
    if tls is None:
      try:
        answer = _speak_http2(raw, timeout_seconds)
      except socket.timeout:
        return None  # Not a verdict: gRPC's connect will time out and say so.
      except OSError as e:
        return f'it broke the plaintext connection ({e}).'
      if answer == b'' or answer[:1] == b'\x15':  # EOF, or a TLS alert.
        return ('it closed the plaintext connection: it serves TLS (a '
                '`tff_fad.local_workers serve` worker). Give its CA and a '
                'client certificate (--worker_tls_ca, --worker_tls_cert, '
                '--worker_tls_key; or tls= in Python).')
      return None
    context = tls.ssl_context()
    try:
      with context.wrap_socket(raw, server_hostname=host) as conn:
        # TLS 1.3: the worker checks this driver's certificate after the
        # driver's side of the handshake ends; its verdict comes with the
        # first read.
        answer = _speak_http2(conn, timeout_seconds)
    except ssl.SSLCertVerificationError as e:
      return (f"its certificate does not verify against {tls.ca_cert!r}: "
              f'{e.verify_message}. Is the worker\'s certificate signed by '
              'this CA, unexpired, and made for this host name or address?')
    except ssl.SSLError as e:
      alert = _alert(e)
      if alert:
        why = {
            'certificate required': 'this driver presented no client '
                                    'certificate (--worker_tls_cert, '
                                    '--worker_tls_key)',
            'unknown ca': 'this driver\'s certificate is not signed by the '
                          "worker's CA",
            'certificate expired': "this driver's certificate has expired",
            'bad certificate': "this driver's certificate was rejected",
        }.get(alert, f'TLS alert: {alert}')
        return f'it refused this driver: {why}.'
      if 'WRONG_VERSION_NUMBER' in (e.reason or '') or 'record' in str(e):
        return ('it does not speak TLS (a plaintext TFF worker?): '
                f'{e.reason or e}. Connect without TLS settings only on '
                'loopback or a network you trust.')
      return f'TLS handshake failed: {e.reason or e}.'
    except (ConnectionResetError, BrokenPipeError) as e:
      return f'it broke the connection during the TLS handshake ({e}).'
    except socket.timeout:
      return (f'no answer to the TLS handshake within {timeout_seconds:g} s.')
    except OSError as e:
      return f'TLS connection failed: {e}.'
  if answer == b'':
    return ('it accepted TLS, then closed the connection: its TFF worker is '
            'not running (see the worker\'s log).')
  return None


# ---------------------------------------------------------------------------
# The worker's side: the TLS front.


def server_ssl_context(ca_cert: str, cert: str, key: str) -> ssl.SSLContext:
  """TLS for a worker: its certificate, and client certificates required."""
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.minimum_version = ssl.TLSVersion.TLSv1_2
  _load(context, ca_cert, cert, key, ('--tls_ca', '--tls_cert', '--tls_key'))
  context.verify_mode = ssl.CERT_REQUIRED
  context.set_alpn_protocols(_ALPN)
  return context


class _ServerTls:
  """The worker's end of one TLS connection, on OpenSSL memory buffers.

  asyncio's own TLS (`start_tls`) drops the alert OpenSSL writes when it
  refuses a client certificate, so the driver would only see the connection
  close; here every byte OpenSSL produces is sent, the alert included, and
  the driver's error says why it was refused.
  """

  def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader,
               writer: asyncio.StreamWriter):
    self._incoming = ssl.MemoryBIO()
    self._outgoing = ssl.MemoryBIO()
    self._tls = context.wrap_bio(self._incoming, self._outgoing,
                                 server_side=True)
    self._reader = reader
    self._writer = writer

  async def _send_pending(self) -> None:
    data = self._outgoing.read()
    if data:
      self._writer.write(data)
      await self._writer.drain()

  async def _receive(self) -> bool:
    data = await self._reader.read(_RELAY_CHUNK_BYTES)
    if not data:
      self._incoming.write_eof()
      return False
    self._incoming.write(data)
    return True

  async def handshake(self) -> None:
    while True:
      try:
        self._tls.do_handshake()
      except ssl.SSLWantReadError:
        await self._send_pending()
        if not await self._receive():
          raise ConnectionResetError('closed during the TLS handshake')
        continue
      except ssl.SSLError:
        await self._send_pending()  # The alert: the driver learns why.
        raise
      await self._send_pending()
      return

  @property
  def peer_certificate(self) -> Optional[dict]:
    return self._tls.getpeercert()

  async def read(self) -> bytes:
    """Decrypted bytes; b'' once the driver has closed the connection."""
    while True:
      try:
        chunks = [self._tls.read(_RELAY_CHUNK_BYTES)]
      except ssl.SSLWantReadError:
        await self._send_pending()
        if not await self._receive():
          return b''
        continue
      except ssl.SSLError:  # close_notify, or EOF without it.
        return b''
      # A read returns one TLS record (16 kB at most): decrypt all that has
      # arrived, so the worker gets one write, not one per record.
      while self._incoming.pending:
        try:
          chunks.append(self._tls.read(_RELAY_CHUNK_BYTES))
        except ssl.SSLError:  # A partial record, or the end: next time.
          break
      await self._send_pending()  # E.g. a key update's answer.
      return b''.join(chunks)

  async def write(self, data: bytes) -> None:
    self._tls.write(data)
    await self._send_pending()


async def _copy(read, write, close) -> None:
  try:
    while True:
      data = await read()
      if not data:
        break
      await write(data)
  except (ConnectionError, ssl.SSLError):
    pass
  finally:
    close()


def _peer(writer: asyncio.StreamWriter) -> str:
  peer = writer.get_extra_info('peername') or ('?', '?')
  return f'{peer[0]}:{peer[1]}'


def _subject(certificate: Optional[dict]) -> str:
  if not certificate:
    return '(none)'
  return ','.join(f'{k}={v}' for rdn in certificate.get('subject', ())
                  for k, v in rdn)


async def serve_front(listening: socket.socket, backend_port: int,
                      context: Optional[ssl.SSLContext], *,
                      handshake_timeout_seconds: float = 30.0,
                      started: Optional[asyncio.Event] = None) -> None:
  """Accepts on `listening`, with TLS unless `context` is None, and copies
  each connection to and from `127.0.0.1:backend_port`; runs until cancelled.

  A connection reaches the worker only after its TLS handshake, client
  certificate included, has passed. Each refusal is logged with the peer
  and the reason, and told to the peer as a TLS alert.
  """

  async def handle(reader, writer):
    peer = _peer(writer)
    try:
      if context is None:
        read = lambda: reader.read(_RELAY_CHUNK_BYTES)

        async def write(data):
          writer.write(data)
          await writer.drain()
      else:
        tls = _ServerTls(context, reader, writer)
        await asyncio.wait_for(tls.handshake(), handshake_timeout_seconds)
        logger.info('%s: accepted, client certificate %s', peer,
                    _subject(tls.peer_certificate))
        read, write = tls.read, tls.write
      backend_reader, backend_writer = await asyncio.open_connection(
          '127.0.0.1', backend_port)
    except (ssl.SSLError, ConnectionError, asyncio.TimeoutError) as e:
      reason = (getattr(e, 'verify_message', None) or getattr(e, 'reason', None)
                or str(e) or type(e).__name__)
      logger.warning('%s: refused: %s', peer, reason)
      writer.close()
      return
    except OSError as e:
      logger.error('%s: the TFF worker on port %d cannot be reached: %s', peer,
                   backend_port, e)
      writer.close()
      return

    async def write_backend(data):
      backend_writer.write(data)
      await backend_writer.drain()

    await asyncio.gather(
        _copy(read, write_backend, backend_writer.close),
        _copy(lambda: backend_reader.read(_RELAY_CHUNK_BYTES), write,
              writer.close))

  server = await asyncio.start_server(handle, sock=listening,
                                      limit=_RELAY_CHUNK_BYTES)
  if started is not None:
    started.set()
  async with server:
    await server.serve_forever()


# ---------------------------------------------------------------------------
# Certificates for a test cluster.


def make_certificates(out_dir: str, worker_hosts: Sequence[str], *,
                      days: int = 30, ca_name: str = 'tff_fad test CA',
                      driver_name: str = 'tff_fad driver',
                      not_before: Optional[datetime.datetime] = None,
                      ca: Optional[tuple] = None) -> dict:
  """Writes a throwaway CA and a worker and a driver certificate.

  Files in `out_dir`: ca.pem and ca.key (the CA; keep ca.key off the
  workers), worker.pem and worker.key (valid for every name and address in
  `worker_hosts`), driver.pem and driver.key (a client certificate).

  Args:
    out_dir: Created if missing; existing files of these names are replaced.
    worker_hosts: Host names or IP addresses the driver connects to.
    days: Validity of every certificate, from `not_before`.
    ca_name: Common name of the CA.
    driver_name: Common name of the driver's certificate.
    not_before: Start of validity (default: now minus a minute). A past
      `not_before` with a short `days` makes expired certificates for tests.
    ca: (certificate, key) of an existing CA (cryptography objects) to sign
      with instead of a new one.

  Returns:
    The paths, by file name without extension and suffix (ca_cert, ca_key,
    worker_cert, worker_key, driver_cert, driver_key); and 'ca' (the
    (certificate, key) pair).
  """
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID
  from cryptography.x509.oid import NameOID
  # pylint: enable=g-import-not-at-top

  if not worker_hosts:
    raise ValueError('Give at least one worker host name or address.')
  if days < 1:
    raise ValueError(f'days must be >= 1, got {days}.')
  start = not_before or (datetime.datetime.now(datetime.timezone.utc)
                         - datetime.timedelta(minutes=1))
  end = start + datetime.timedelta(days=days)

  def name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

  def builder(subject, issuer, public_key):
    return (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end))

  if ca is None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (builder(name(ca_name), name(ca_name), ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                              critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False,
                   key_encipherment=False, data_encipherment=False,
                   key_agreement=False, key_cert_sign=True, crl_sign=True,
                   encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                   ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
  else:
    ca_cert, ca_key = ca

  def leaf(common_name, usage, alt_names=None):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (builder(name(common_name), ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False))
    if alt_names:
      cert = cert.add_extension(x509.SubjectAlternativeName(alt_names),
                                critical=False)
    return cert.sign(ca_key, hashes.SHA256()), key

  alt_names = []
  for host in worker_hosts:
    try:
      alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
      alt_names.append(x509.DNSName(host))
  worker = leaf(f'tff_fad worker {worker_hosts[0]}',
                ExtendedKeyUsageOID.SERVER_AUTH, alt_names)
  driver = leaf(driver_name, ExtendedKeyUsageOID.CLIENT_AUTH)

  os.makedirs(out_dir, exist_ok=True)
  paths = {}

  def write(stem, cert, key):
    paths[f'{stem}_cert'] = os.path.join(out_dir, f'{stem}.pem')
    paths[f'{stem}_key'] = os.path.join(out_dir, f'{stem}.key')
    with open(paths[f'{stem}_cert'], 'wb') as f:
      f.write(cert.public_bytes(serialization.Encoding.PEM))
    # Private keys readable by their owner only.
    fd = os.open(paths[f'{stem}_key'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 0o600)
    with os.fdopen(fd, 'wb') as f:
      f.write(key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))

  write('ca', ca_cert, ca_key)
  write('worker', *worker)
  write('driver', *driver)
  paths['ca'] = (ca_cert, ca_key)
  return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m tff_fad.worker_tls',
      description='Certificates for TLS between a driver and its workers.')
  commands = parser.add_subparsers(dest='action', required=True)
  make = commands.add_parser(
      'make-certs', help='a throwaway CA, a worker and a driver certificate '
      'for a test cluster (use your organisation\'s CA for anything else)')
  make.add_argument('--out_dir', required=True)
  make.add_argument('--worker_hosts', required=True,
                    help='comma-separated host names or IP addresses the '
                    'driver uses in --workers')
  make.add_argument('--days', type=int, default=30)
  args = parser.parse_args(argv)
  hosts = [h.strip() for h in args.worker_hosts.split(',') if h.strip()]
  try:
    paths = make_certificates(args.out_dir, hosts, days=args.days)
  except ValueError as e:
    parser.error(str(e))
  print(f'tff_fad.worker_tls: CA, worker and driver certificates for '
        f'{",".join(hosts)} in {args.out_dir} (valid {args.days} days). '
        f'Workers: {paths["ca_cert"]}, {paths["worker_cert"]}, '
        f'{paths["worker_key"]}. Driver: {paths["ca_cert"]}, '
        f'{paths["driver_cert"]}, {paths["driver_key"]}. Keep '
        f'{paths["ca_key"]} off both.', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
