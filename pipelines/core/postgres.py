"""PostgreSQL as loopline's shared parts use it: the prediction log, the registry's
promotion lock, and the stores of MLflow, Optuna and Prefect that teams point at it.

URLs come in two spellings: libpq's (`postgresql://…`, what psycopg connects to) and
SQLAlchemy's with a driver (`postgresql+psycopg://…`, what MLflow, Optuna and Prefect take).
Both name the same database here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.core.errors import LooplineError

CONNECT_TIMEOUT_S = 10


def is_postgres(location: str | Path) -> bool:
    """A PostgreSQL URL in either spelling."""
    return isinstance(location, str) and location.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def libpq_dsn(url: str) -> str:
    """The URL psycopg connects to: SQLAlchemy's `+driver` dropped from the scheme."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def with_driver(url: str, driver: str) -> str:
    """The URL in SQLAlchemy's spelling with `driver` (psycopg for MLflow and Optuna, asyncpg
    for Prefect's server)."""
    return f"postgresql+{driver}://{url.split('://', 1)[1]}"


def describe(location: str | Path) -> str:
    """The location as messages show it: a PostgreSQL URL without its password."""
    if not is_postgres(location):
        return str(location)
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    parts = {k: v for k, v in conninfo_to_dict(libpq_dsn(str(location))).items() if k != "password"}
    return make_conninfo(**parts)  # type: ignore[arg-type]


def connect(url: str, setting: str, **kwargs):
    """A psycopg connection, or an error naming the setting and the unreachable database."""
    import psycopg

    try:
        return psycopg.connect(libpq_dsn(url), connect_timeout=CONNECT_TIMEOUT_S, **kwargs)
    except psycopg.OperationalError as err:
        detail = " ".join(str(err).split())
        raise LooplineError(setting, f"cannot reach PostgreSQL at {describe(url)}: {detail}") from None


@contextmanager
def advisory_lock(url: str, name: str, setting: str) -> Iterator[None]:
    """An exclusive lock named `name`, held in the database for the block: every process on
    every machine that takes it on that database waits its turn. PostgreSQL releases it
    when the holding session ends, however the process ends."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with connect(url, setting, autocommit=True) as db:
        db.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            db.execute("SELECT pg_advisory_unlock(%s)", (key,))
