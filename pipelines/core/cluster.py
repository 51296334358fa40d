"""The Dask cluster loopline's work runs on (`execution.dask`): the candidate search's fits
(execution.runner: dask) and the data stages' partitions (execution.data: dask).

An address names a running cluster (`dask scheduler` and `dask worker`s); without one, a
LocalCluster of `execution.dask.n_workers` processes is started for the work and stopped
after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError

STAGE = "execution"
CONNECT_TIMEOUT_S = 20


@contextmanager
def dask_client(params: Params) -> Iterator[Any]:
    """A client of the configured cluster, or of a LocalCluster started here for the block."""
    import logging

    from distributed import Client, LocalCluster

    config = params.execution.dask
    security = tls_security(params)
    if not config.address:
        logging.getLogger("distributed").setLevel(logging.WARNING)
        with (
            LocalCluster(
                n_workers=config.n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=config.memory_limit,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(config.address, timeout=CONNECT_TIMEOUT_S, security=security)
    except (OSError, TimeoutError) as err:
        raise LooplineError(
            STAGE, f"execution.dask.address {config.address}: no Dask scheduler answered ({err})"
        ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise LooplineError(
                STAGE, f"execution.dask.address {config.address}: the scheduler has no workers (`dask worker` …)"
            ) from None
        yield client
    finally:
        client.close()


def tls_security(params: Params) -> Any:
    """The client's TLS credentials for a tls:// scheduler (distributed.Security), or None for
    a tcp:// one; a half-configured or mismatched set is refused before any connection."""
    config = params.execution.dask
    files = {
        "tls_ca_file": config.tls_ca_file,
        "tls_cert_file": config.tls_cert_file,
        "tls_key_file": config.tls_key_file,
    }
    given = {k: v for k, v in files.items() if v}
    tls_address = config.address.startswith("tls://")
    if not given and not tls_address:
        return None
    if tls_address and len(given) < len(files) or given and not tls_address:
        missing = [f"execution.dask.{k}" for k in files if k not in given]
        raise LooplineError(
            STAGE,
            f"execution.dask.address {config.address or '(a LocalCluster)'} with TLS needs a tls:// address and "
            f"all three files; " + (f"missing {', '.join(missing)}" if missing else "the address is not tls://"),
        )
    for key, value in given.items():
        if not Path(value).is_file():
            raise LooplineError(STAGE, f"execution.dask.{key} {value}: no such file")
    from distributed.security import Security

    return Security(
        tls_ca_file=config.tls_ca_file,
        tls_client_cert=config.tls_cert_file,
        tls_client_key=config.tls_key_file,
        require_encryption=True,
    )


def make_certificates(folder: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A certificate authority and one certificate (for the scheduler, the workers and the
    clients alike, as Dask's own temporary security does) for `hosts`, in `folder`: ca.pem,
    cert.pem and key.pem (the key readable by its owner only)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from pipelines.core.storage import write_bytes

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loopline Dask CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes(ca.public_bytes(serialization.Encoding.PEM), paths["ca"])
    write_bytes(cert.public_bytes(serialization.Encoding.PEM), paths["cert"])
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    paths["key"].unlink(missing_ok=True)
    with os.fdopen(os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        fh.write(pem)  # created readable by its owner only, never wider
    return paths


_KEPT: dict[str, Any] = {}  # LocalClusters kept for the life of the process, by configuration


@contextmanager
def kept_client(params: Params) -> Iterator[Any]:
    """`dask_client`, but a LocalCluster is started once per process and kept until it exits:
    the data stages of one `loopline run` or training share it instead of paying its start-up
    (seconds) each."""
    import atexit

    if params.execution.dask.address:
        with dask_client(params) as client:
            yield client
        return
    key = params.execution.dask.model_dump_json()
    if key not in _KEPT:
        context = dask_client(params)
        _KEPT[key] = (context, context.__enter__())
        atexit.register(_close_kept, key)
    yield _KEPT[key][1]


def close_kept_clusters() -> None:
    """Close the LocalClusters kept so far, now: for a process that goes on without Dask (idle
    workers still use CPU: heartbeats, memory monitors)."""
    for key in list(_KEPT):
        _close_kept(key)


def _close_kept(key: str) -> None:
    context, _ = _KEPT.pop(key, (None, None))
    if context is not None:
        context.__exit__(None, None, None)
