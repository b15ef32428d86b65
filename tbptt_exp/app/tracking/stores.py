"""The tracking store and the study storage: where they are, checked before TensorFlow
loads, secrets kept out of every file and line.

``take_secrets`` moves a password found in ``tracking.uri`` or ``hydra.sweeper.storage``
into the environment variable its client reads anyway (``MLFLOW_TRACKING_PASSWORD`` for an
MLflow server, ``PGPASSWORD`` for PostgreSQL) and leaves the URL without it, so the
password never enters the composed config: not Hydra's ``.hydra/*.yaml`` or
``multirun.yaml``, not a param, tag or artifact, not a printed line. Giving the secret in
the environment (or ``~/.pgpass``) in the first place is the documented way.

``check_tracking_uri`` and ``check_storage_url`` open each store once, with a short
timeout, and raise ``ConfigError`` (one line, the setting named) for an unknown scheme,
a server or database that does not answer, a folder that cannot be written or a SQLite
file that is not a database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from filelock import FileLock

from tbptt_exp.app.signals import deferred
from tbptt_exp.core.config import ConfigError
from tbptt_exp.paths import default_store_dir

TIMEOUT_S = 5
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql")
STORAGE_SCHEMES = ("sqlite", "postgresql")
PASSWORD_VARIABLES = {"http": "MLFLOW_TRACKING_PASSWORD", "https": "MLFLOW_TRACKING_PASSWORD",
                      "postgresql": "PGPASSWORD"}


SQLITE = "sqlite:///"  # then the path: sqlite:////abs/file.db


def sqlite_path(url: str) -> Path | None:
    """The database file a ``sqlite:///`` URL names; None for any other store."""
    return Path(url[len(SQLITE):]) if url.startswith(SQLITE) else None


def scheme(url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql``; ``sqlite:///x`` -> ``sqlite``."""
    return url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def check_password_encoding(setting: str, url: str) -> None:
    """A URL's user and password must be percent-encoded: with a raw ``@ / ? #`` (or a second
    ``:``) in them no parser can tell where the password ends, and a part of it would be
    read as the host or the path (and printed as such)."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if scheme(url) not in PASSWORD_VARIABLES or "@" not in rest:
        return
    userinfo = rest.rsplit("@", 1)[0]
    if re.search(r"[@/?#]", userinfo) or userinfo.count(":") > 1:
        raise ConfigError(setting, mask_credentials(url), "percent-encode special characters in the user and "
                          "password (@ as %40, : as %3A, / as %2F, ? as %3F, # as %23), or give the password "
                          "in the environment (MLFLOW_TRACKING_PASSWORD, PGPASSWORD or ~/.pgpass)")


def split_password(url: str) -> tuple[str, str | None, str | None]:
    """``scheme://user:pw@host/db`` -> (``scheme://user@host/db``, user, pw)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, parts.username, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username
    clean = urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))
    return clean, unquote(user) if user else None, unquote(parts.password)


def take_secrets(urls: dict[str, str | None], environ: dict | None = None) -> dict[str, str]:
    """{setting: url} -> {setting: url without its password}, the password moved to the
    environment variable its client reads. Only settings that held a password are returned."""
    environ = os.environ if environ is None else environ
    cleaned: dict[str, str] = {}
    given: dict[str, str] = {}
    for setting, url in urls.items():
        if not url:
            continue
        check_password_encoding(setting, url)
        clean, user, password = split_password(url)
        if password is None:
            continue
        kind = scheme(url)
        variable = PASSWORD_VARIABLES.get(kind)
        if variable is None:
            raise ConfigError(setting, mask_credentials(url), "a password is only taken from http(s):// or postgresql:// URLs")
        if given.setdefault(variable, password) != password:
            raise ConfigError(setting, mask_credentials(url), f"a second, different password for {variable}; "
                                                  "give PostgreSQL passwords in ~/.pgpass instead")
        environ[variable] = password
        if kind in ("http", "https"):  # MLflow reads both from the environment; the URL keeps neither
            parts = urlsplit(clean)
            clean = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
            if user:
                environ["MLFLOW_TRACKING_USERNAME"] = user
        cleaned[setting] = clean
    return cleaned


def mask_credentials(text: str) -> str:
    """Hide passwords in URLs (``scheme://user:secret@host`` -> ``scheme://user:***@host``),
    Hydra's escaped form (``scheme\\://user\\:secret@host``) included. The password runs to
    the last ``@`` of the URL, so a raw ``@``, ``:`` or ``/`` in it leaves no part of it shown."""
    return re.sub(r"(\w[\w+.-]*\\?:(?:\\?/){2}[^:/@\s\\]*)\\?:[^\s'\"]*@", r"\1:***@", text)



def mask_credentials_in_logs() -> None:
    """Mask passwords in every log record (Hydra logs each job's overrides, URLs included)."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "masks_credentials", False):
        return

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = mask_credentials(message), ()
        return record

    masked_record.masks_credentials = True
    logging.setLogRecordFactory(masked_record)


def resolve_uri(uri: str | None) -> str:
    """The tracking store a run goes to: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
    the SQLite database under ``mlruns/`` (its folder is made when the store is opened)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def default_storage_url(create: bool = True) -> str:
    """A study's storage when ``hydra.sweeper.storage`` is null: ``mlruns/optuna.db``."""
    store = default_store_dir()
    if create:
        store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'optuna.db'}"


def _check_sqlite(setting: str, url: str) -> None:
    if (path := sqlite_path(url)) is None:
        raise ConfigError(setting, url, "use sqlite:////absolute/path/file.db (three slashes, then the path)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tbptt-exp-write-check"):
            pass
    except OSError as error:
        raise ConfigError(setting, url, f"its folder cannot be written ({error.strerror or error}); "
                                        "use a writable path") from None
    if not path.exists():
        return
    if not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise ConfigError(setting, url, f"{path.name} is read-only for this user; make it writable "
                                        f"(chmod u+w {path}) or point to another file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT_S)
        try:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError as error:
        verdict = str(error)
    if "locked" in verdict:  # a write in progress elsewhere: the file is fine, wait for it
        raise ConfigError(setting, url, f"{path.name} is locked by {holders(path)} and stayed locked for "
                                        f"{TIMEOUT_S} s; retry when that write is done")
    if verdict != "ok":
        raise ConfigError(setting, url, f"{path.name} is not a usable SQLite database ({verdict}); "
                                        "move it aside or point to another file")


def holders(path: Path) -> str:
    """``process 123 (python -m tbptt_exp ...)``: who has ``path`` open, as far as this user may see."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(Path(f.path) == path.resolve() for f in process.open_files()):
                found.append(f"process {process.pid} ({' '.join(process.info['cmdline'] or [])[:60]})")
        except psutil.Error:
            continue
    return ", ".join(found) or "another process"


OPTUNA_TABLES = {"studies", "version_info"}  # an Optuna study storage
MLFLOW_TABLES = {"experiments", "runs"}  # an MLflow tracking store


def tables(url: str) -> set[str]:
    """The tables of a reachable SQLite or PostgreSQL store (none for a file not made yet)."""
    if (path := sqlite_path(url)) is not None:
        if not path.exists():
            return set()
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT_S)
        try:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url, connect_args={"connect_timeout": TIMEOUT_S})
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def same_database(a: str, b: str) -> bool:
    """Whether two store URLs name one database (a SQLite file by its real path; a server's
    database by host, port and name, users and passwords aside)."""
    if scheme(a) != scheme(b):
        return False
    if (path := sqlite_path(a)) is not None:
        return (other := sqlite_path(b)) is not None and path.resolve() == other.resolve()
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.hostname, pa.port or 5432, pa.path) == (pb.hostname, pb.port or 5432, pb.path)


@contextlib.contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Serialise making a store across processes (workers started together on a new one):
    a lock file beside a SQLite database, an advisory lock on a PostgreSQL server. Without
    it the second process dies in the first one's schema creation (``UNIQUE constraint
    failed: alembic_version``, ``UniqueViolation ... pg_type_typname_nsp_index``)."""
    if (path := sqlite_path(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(path.name + ".lock"), preserve_lock_file=True):
            yield
        return
    if scheme(url) != "postgresql":
        yield
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": TIMEOUT_S})
    key = int.from_bytes(hashlib.sha256(b"tbptt-exp store creation").digest()[:8], "big", signed=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


def _mlflow_schema(url: str) -> None:
    # Private: what MLflow's SqlAlchemyStore runs on a new database; no public call makes a
    # store at a path other than the one it then opens (its engine stays cached, open on it).
    from mlflow.store.db.utils import _all_tables_exist, _initialize_tables
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        if not _all_tables_exist(engine):
            _initialize_tables(engine)
    finally:
        engine.dispose()


def _optuna_schema(url: str) -> None:
    import optuna

    optuna.storages.RDBStorage(url).engine.dispose()


def create_store(url: str, setting: str, kind: str) -> None:
    """Make a new tracking store (``kind`` "mlflow") or study storage ("optuna") at ``url``,
    one process at a time. A new SQLite file is built aside and moved into place, so a
    creation that fails (a full disk) or is killed leaves nothing half-made, and the next
    run starts afresh instead of failing on ``table ... already exists``."""
    build, made = {"mlflow": (_mlflow_schema, MLFLOW_TABLES), "optuna": (_optuna_schema, OPTUNA_TABLES)}[kind]
    if scheme(url) not in STORAGE_SCHEMES:
        return  # a tracking server makes its own store
    with creation_lock(url), deferred():  # cut half-way, a migration raises SQLAlchemy's errors, not the interrupt

        if made <= tables(url):
            return
        if scheme(url) == "postgresql":  # its schema is made in transactions
            build(url)
            return
        path = sqlite_path(url)
        if path.exists() and path.stat().st_size:
            build(url)  # an empty database someone made: tables added in place
            return
        from sqlalchemy.exc import SQLAlchemyError

        aside = path.with_name(f".{path.name}.building")
        aside.unlink(missing_ok=True)  # from a creation that was killed
        try:
            build(f"sqlite:///{aside}")
            os.replace(aside, path)
        except (OSError, sqlite3.Error, SQLAlchemyError) as error:
            detail = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
            raise ConfigError(setting, url, f"the new store could not be created ({detail}); nothing was left "
                                            "behind: free space or fix the folder and run again") from None
        finally:
            aside.unlink(missing_ok=True)


def _check_postgresql(setting: str, url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = create_engine(url, connect_args={"connect_timeout": TIMEOUT_S})
    except (ImportError, ModuleNotFoundError) as error:
        raise ConfigError(setting, mask_credentials(url), f"its driver is missing ({error}); pip install -e \".[postgres]\"") from None
    except SQLAlchemyError as error:
        raise ConfigError(setting, mask_credentials(url), f"not a database URL ({str(error).splitlines()[0]})") from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        detail = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise ConfigError(setting, mask_credentials(url), f"the database does not answer ({detail})") from None
    finally:
        engine.dispose()


API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # a call every client makes, behind any login


def _check_http(setting: str, url: str) -> None:
    """One MLflow API call with the client's credentials: ``/health`` answers without a login
    and from any web server, so it proves neither the credentials nor that MLflow is there."""
    parts = urlsplit(url)
    base = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    auth = None
    if user and password:
        auth = "Basic " + b64encode(f"{user}:{password}".encode()).decode()
    elif token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        auth = f"Bearer {token}"
    shown = mask_credentials(url)
    try:
        request = urllib.request.Request(base + API_PROBE)
        if auth:
            request.add_header("Authorization", auth)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            given = "the credentials given were refused" if user or os.environ.get("MLFLOW_TRACKING_TOKEN") else \
                "it needs a login"
            raise ConfigError(setting, shown, f"{given} (HTTP {error.code}); set MLFLOW_TRACKING_USERNAME and "
                                              "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)") from None
        if error.code >= 500:
            raise ConfigError(setting, shown, f"the server failed an MLflow API call (HTTP {error.code}); "
                                              "see the server's log") from None
        detail = f"answered HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(setting, shown, f"no MLflow server answers there within {TIMEOUT_S} s ({reason}); "
                                          "start it (mlflow server ...) or fix the address") from None
    else:
        detail = "did not answer JSON"
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(body or b"{}"), dict):
                return
    raise ConfigError(setting, shown, f"not an MLflow tracking server: GET {API_PROBE.split('?')[0]} {detail}; "
                                      "point to the address of `mlflow server`")


def check_tracking_uri(uri: str, setting: str = "tracking.uri") -> None:
    kind = scheme(uri)
    if kind not in TRACKING_SCHEMES:
        raise ConfigError(setting, mask_credentials(uri), "use sqlite:////path/mlflow.db, http(s)://host:port (an MLflow "
                                              "server) or postgresql://host/db, or null for mlruns/")
    {"sqlite": _check_sqlite, "postgresql": _check_postgresql}.get(kind, _check_http)(setting, uri)
    if kind in STORAGE_SCHEMES and OPTUNA_TABLES <= tables(uri):
        raise ConfigError(setting, mask_credentials(uri), "it holds an Optuna study storage (tables studies, trials, ...); "
                                              "MLflow needs a database of its own: use another file or database")


def check_storage_url(url: str, setting: str = "hydra.sweeper.storage") -> None:
    kind = scheme(url)
    if kind not in STORAGE_SCHEMES:
        raise ConfigError(setting, mask_credentials(url), "use sqlite:////path/optuna.db or postgresql+psycopg://host/db, "
                                              "or null for mlruns/optuna.db")
    {"sqlite": _check_sqlite, "postgresql": _check_postgresql}[kind](setting, url)
    if MLFLOW_TABLES <= tables(url):
        raise ConfigError(setting, mask_credentials(url), "it holds an MLflow tracking store (tables experiments, runs, "
                                              "...); a study needs a database of its own (null: mlruns/optuna.db)")
