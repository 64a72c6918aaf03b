"""`flashdmd up`: API and worker on one machine with no external servers.

SQLite and the filesystem broker live under the data dir; the worker is a child
process running the very same `flashdmd worker` as production does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
from pydantic import ValidationError
from sqlalchemy import make_url

from api import migrate
from api.auth import TokenError, create_token, ensure_token, find_token
from api.client import SERVICE_FILE
from api.db import make_engine, make_sessionmaker
from api.proc import die_with_parent
from api.settings import Settings
from api.workers import worker_capacity

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0  # seconds the worker gets to shut down before its process group is killed


def bootstrap_token(settings: Settings) -> tuple[str, str]:
    """(token, where it came from): FLASHDMD_TOKEN, else DATA_DIR/token (kept across restarts), else a new one."""
    token_file = settings.data_dir / "token"
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            if settings.token:
                try:
                    ensure_token(session=session, token=settings.token, name="FLASHDMD_TOKEN")
                except TokenError as err:
                    raise click.ClickException(str(err)) from None
                return settings.token, "FLASHDMD_TOKEN"
            if token_file.is_file():
                saved = token_file.read_text().strip()
                if saved and find_token(session=session, token=saved):
                    return saved, str(token_file)
            _, token = create_token(session=session, name="flashdmd up", prefix=settings.token_prefix)
    finally:
        engine.dispose()
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)  # touch keeps the mode of a file that already existed
    token_file.write_text(token + "\n")
    return token, str(token_file)


def secure_data_dir(settings: Settings) -> None:
    """Data dir 0700 and the SQLite file 0600 (and its -wal/-shm, which SQLite creates with the file's mode).

    The database holds every user's specs and token hashes, the data dir the runs and the bootstrap token:
    other local users must not read them, whatever the umask.
    """
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)
    url = make_url(settings.sqlalchemy_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    db = Path(url.database)
    db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists():
            path.chmod(0o600)


class WorkerChild:
    """The embedded worker: restarted if it dies, stopped (and its process group killed) on exit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._keep_alive, name="flashdmd-worker-child", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        # Its own session keeps the terminal's Ctrl-C away from it (we stop it in order), and the
        # death signal takes it down if `up` itself is killed.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api", "worker"], start_new_session=True, preexec_fn=die_with_parent()
        )

    def _keep_alive(self) -> None:
        while not self._stopping.is_set():
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            log.warning("the worker exited with code %s; restarting it", code)
            time.sleep(2.0)
            if not self._stopping.is_set():
                self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        # A running training would keep the worker's warm shutdown waiting; it is killed instead and the
        # job resumes from its last checkpoint on the next start (the reaper finds its stale heartbeat).
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (another service holds it, say), or None if it can. Checked before
    anything starts, so the user reads it here and not in a log, and no service file points at someone else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another `flashdmd up`?)"
            return f"cannot listen on {host}:{port}: {err.strerror or err}"
    return None


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses: a wildcard host is reached through loopback."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - a comparison, not a bind
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_service_file(data_dir: Path, *, url: str, token_file: str | None) -> Path:
    """DATA_DIR/service.json: where this `up` listens and where its token is (never the token itself; None when
    it came from FLASHDMD_TOKEN), so `flashdmd jobs --data-dir DIR` finds it on any port. 0600, written whole."""
    path = data_dir / SERVICE_FILE
    tmp = path.with_name(f".{SERVICE_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token_file": token_file, "pid": os.getpid(), "started_at": time.time()}, f)
    os.replace(tmp, path)
    return path


def remove_service_file(data_dir: Path) -> None:
    """Remove the service file if it is still this process's (a later `up` on the same data dir may own it)."""
    path = data_dir / SERVICE_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def run_embedded(*, host: str, port: int, data_dir: Path | None) -> None:
    busy = port_in_use(host, port)
    if busy:
        raise click.ClickException(f"{busy}; pick another with --port")
    if data_dir is not None:
        # Through the environment, so that the worker child builds the same Settings.
        os.environ["FLASHDMD_DATA_DIR"] = str(data_dir.expanduser().absolute())
    try:
        settings = Settings()
        if not settings.pools:
            # The worker child registers itself a few seconds from now; until then the API would find no
            # live pool and refuse every job. Declare the pool it will be (same Settings, same GPUs) instead.
            os.environ["FLASHDMD_POOLS"] = worker_capacity(settings).pool
            settings = Settings()
    except ValidationError as err:  # e.g. a short FLASHDMD_TOKEN: say so, without a traceback
        raise click.ClickException(f"invalid settings: {err}") from None
    # All in one process, /generate included: a FLASHDMD_ROLE or FLASHDMD_INFERENCE_URL left in the
    # shell from a cluster does not turn `up` into a control plane for a tier that is not there.
    settings = settings.model_copy(update={"role": "all", "inference_url": None})
    secure_data_dir(settings)
    migrate.upgrade(settings.sqlalchemy_url)
    token, source = bootstrap_token(settings)

    import uvicorn

    from api.httpserver import uvicorn_options
    from api.main import create_app

    worker = WorkerChild()
    worker.start()
    url = client_url(host, port)
    write_service_file(settings.data_dir, url=url, token_file=None if source == "FLASHDMD_TOKEN" else source)
    click.echo(f"flashdmd is up at {url} (docs: {url}/docs); data in {settings.data_dir}", err=True)
    if source == "FLASHDMD_TOKEN":  # the user's own secret: not echoed to the terminal or logs
        click.echo("token: the one in FLASHDMD_TOKEN", err=True)
    else:
        click.echo(f"token (also in {source}): {token}", err=True)
        click.echo(f'  curl -H "Authorization: Bearer {token}" {url}/jobs', err=True)
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", **uvicorn_options(settings))
    finally:
        remove_service_file(settings.data_dir)
        worker.stop()
