"""TLS on the NBD server: the `userdm daemon` options, their rules, and what each listener does.

Options (nbdkit's spelling and meaning):
- `--tls=off|on|require`: off refuses NBD_OPT_STARTTLS (NBD_REP_ERR_POLICY); on lets each
  client choose; require answers every option with NBD_REP_ERR_TLS_REQD until the client
  has done STARTTLS. Without `--tls`, TLS is `require` when `--tls-certificates` is given and
  off otherwise.
- `--tls-certificates DIR`: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (optional
  `ca-crl.pem`), as nbdkit lays them out.
- `--tls-verify-peer`: a client must present a certificate signed by that CA.
- `--tls-psk FILE`: refused, Python 3.11's `ssl` has no pre-shared keys.

Rules: the TCP listener (`--nbd-listen`) serves only with TLS, unless `--tls=off` is given
explicitly, which is logged as a warning (any local or remote user could then read and write
every device); `--tls=on` with it is logged as a warning too (clients may choose plaintext). The Unix socket `nbd.sock` (mode 0600) keeps TLS optional: `on` when
certificates are configured, whatever `--tls` says, off otherwise. Sockets the control
socket hands out never use TLS. Every refusal is EINVAL (ENOENT for a missing file) with a
sentence naming the option.
"""

from __future__ import annotations

import argparse
import errno
import logging
import ssl
from dataclasses import dataclass

from ...errors import DMError
from ...nbd.handshake import TLS_MODES
from ...nbd.tls import server_context

log = logging.getLogger("userdm.nbd")

PLAINTEXT_WARNING = ("--tls=off with --nbd-listen serves every device in plaintext, without "
                     "authentication, to anyone who can connect to the TCP port")


@dataclass(frozen=True)
class ServerTLS:
    """The NBD server's TLS: `mode` for TCP, `context` (None when off), the certificate
    directory and whether client certificates are checked."""

    mode: str = "off"
    context: ssl.SSLContext | None = None
    directory: str | None = None
    verify_peer: bool = False

    def mode_for(self, tcp: bool) -> str:
        """The TLS mode of a connection from the TCP listener or from the Unix socket."""
        if tcp:
            return self.mode
        return "on" if self.context is not None else "off"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `userdm daemon` options of TLS on the NBD server."""
    parser.add_argument("--tls", choices=TLS_MODES, default=None,
                        help="daemon: TLS on NBD connections, as nbdkit: off, on (the client "
                        "chooses), require (default when --tls-certificates is given). "
                        "--nbd-listen needs TLS unless --tls=off is given; WARNING: "
                        f"{PLAINTEXT_WARNING}")
    parser.add_argument("--tls-certificates", metavar="DIR",
                        help="daemon: ca-cert.pem, server-cert.pem, server-key.pem (optional "
                        "ca-crl.pem), laid out as for nbdkit")
    parser.add_argument("--tls-verify-peer", action="store_true",
                        help="daemon: NBD clients must present a certificate signed by ca-cert.pem")
    parser.add_argument("--tls-psk", metavar="FILE",
                        help="daemon: refused: Python's ssl module has no pre-shared keys; "
                        "use --tls-certificates")


def from_options(opts: argparse.Namespace) -> ServerTLS:
    """The server's TLS from the daemon's options, refusing what does not make sense."""
    listen = getattr(opts, "nbd_listen", None)
    explicit = opts.tls
    directory = opts.tls_certificates
    if opts.tls_psk:
        raise DMError(errno.EINVAL, f"--tls-psk {opts.tls_psk}: TLS with pre-shared keys is not "
                      "supported: Python 3.11's ssl module has no PSK API; use --tls-certificates")
    mode = explicit or ("require" if directory else "off")
    if mode == "off":
        if directory:
            raise DMError(errno.EINVAL, f"--tls-certificates {directory} with --tls=off: the "
                          "certificates would not be used")
        if opts.tls_verify_peer:
            raise DMError(errno.EINVAL, "--tls-verify-peer with TLS off: give --tls-certificates DIR")
        if listen and explicit is None:
            raise DMError(errno.EINVAL, f"--nbd-listen {listen}: TCP is served only with TLS: give "
                          "--tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem), "
                          "or --tls=off to serve every device in plaintext to anyone who can connect")
        if listen:
            log.warning("WARNING: %s (%s)", PLAINTEXT_WARNING, listen)
        return ServerTLS()
    if not directory:
        raise DMError(errno.EINVAL, f"--tls={mode} needs --tls-certificates DIR (ca-cert.pem, "
                      "server-cert.pem, server-key.pem)")
    ctx = server_context(directory, opts.tls_verify_peer)
    if listen and mode == "on":
        log.warning("WARNING: --tls=on lets clients of --nbd-listen %s choose plaintext, without "
                    "authentication; --tls=require refuses them", listen)
    return ServerTLS(mode, ctx, str(directory), bool(opts.tls_verify_peer))
