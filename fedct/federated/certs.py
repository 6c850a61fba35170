"""A private CA and a SuperLink certificate, for TLS between SuperLink, SuperNodes and `flwr`.

For tests and small deployments; a hospital network with its own PKI should use that instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from fedct.errors import FedctError

FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


def make_certificates(out: str | Path, hosts: list[str], *, days: int = 365,
                      force: bool = False) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.pem, server.key; the server certificate names `hosts`.

    An existing CA is kept unless `force`: replacing it breaks the trust of every node that
    holds the old ca.crt. Private keys are created readable by their owner only.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise FedctError("making certificates needs the flower extra: pip install 'fedct[flower]'") from None
    if not hosts:
        raise FedctError("--host: name at least one host or IP address the SuperLink is reached at")
    if days < 1:
        raise FedctError(f"--days {days}: must be >= 1")
    out = Path(out)
    existing = [name for name in FILES if (out / name).exists()]
    if existing and not force:
        raise FedctError(f"{out / existing[0]}: exists; replacing the CA breaks every node's trust "
                         "in it (use --force to make a new CA anyway)")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedct"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("fedct private CA"))
               .issuer_name(name("fedct private CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    alt_names = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder().subject_name(name(hosts[0]))
                   .issuer_name(ca_cert.subject).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    private = {"encoding": pem, "format": serialization.PrivateFormat.PKCS8,
               "encryption_algorithm": serialization.NoEncryption()}
    files = {"ca.crt": ca_cert.public_bytes(pem), "ca.key": ca_key.private_bytes(**private),
             "server.pem": server_cert.public_bytes(pem),
             "server.key": server_key.private_bytes(**private)}
    paths = {}
    for filename, payload in files.items():
        path = out / filename
        path.unlink(missing_ok=True)
        mode = 0o600 if filename.endswith(".key") else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        paths[filename] = path
    return paths
