"""Weights from a local path or a hub id: the one resolver for SAM, reward-model and scorer weights.

A hub reference is `org/name[/path/in/repo][@revision]` (trainer/jobspec/limits.py HUB_REF). It is fetched
with huggingface_hub, so its cache (`HF_HUB_CACHE`), offline mode (`HF_HUB_OFFLINE=1`), mirror
(`HF_ENDPOINT`) and token all apply; those are huggingface_hub's settings, read by it, not by us. A value
that looks local (absolute, ./, ../, ~, or an existing path) is returned as a path, its realpath once it
is found under the model roots (trainer/roots.py opened_model), so each loader keeps its own checks and
messages for local files. Lives in trainer/ because the trainer loads SAM
and the reward model; inference/ (the scorers) imports it, never the other way round.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.errors import InputError, ModelUnreachable
from trainer.jobspec.limits import HUB_REF, is_hub_ref
from trainer.roots import opened_model


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    path: str | None  # inside the repo, no leading slash
    revision: str | None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.path}" if self.path else "") + (f"@{self.revision}" if self.revision else "")


def looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value)


def parse_hub_ref(value: str) -> HubRef | None:
    """The hub reference `value` names, or None for a local path (or anything that is not a hub reference)."""
    if looks_local(value) or not is_hub_ref(value):
        return None
    m = HUB_REF.match(value)
    assert m is not None  # is_hub_ref matched
    return HubRef(m["repo"], m["path"].lstrip("/") or None, m["revision"])


PROBE_TIMEOUT = 3.0  # seconds to open a TCP connection to the hub: a reachable hub answers in well under one


def hub_host() -> tuple[str, int]:
    """The host and port huggingface_hub talks to (HF_ENDPOINT, a mirror, or huggingface.co)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached right now (offline mode, no DNS, refused, timed out), or None if it can.

    One TCP connection, not a request: huggingface_hub retries a failed request five times with backoff
    (about 40 s), so a run without network would otherwise spend that long before saying so.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    host, port = hub_host()
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
    except OSError as err:
        return f"cannot connect to {host}:{port} ({err.strerror or type(err).__name__})"
    return None


def in_cache(repo_id: str, filename: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # a malformed id or revision: not in any cache
        return False


def check_hub_model(value: str, field: str, *, revision: str | None = None,
                    probe_file: str = "model_index.json") -> bool:
    """Whether `value`, a hub id, must be read from the hub cache only (the hub cannot be reached; the loader
    then passes local_files_only=True rather than retrying); False for a local path or a reachable hub.
    Fails at once, naming `field` and the host, when it is neither cached nor reachable."""
    ref = parse_hub_ref(value)
    if ref is None:
        return False
    why = hub_unreachable()
    if why is None:
        return False
    if in_cache(ref.repo_id, probe_file, revision or ref.revision):
        return True
    raise unreachable_error(field, value, why)


def unreachable_error(field: str, value: str, why: str) -> ModelUnreachable:
    from huggingface_hub import constants

    host = hub_host()[0]
    return ModelUnreachable(f"{field}: cannot resolve hub id {value!r}: {why} and it is not in the hub cache "
                            f"({constants.HF_HUB_CACHE}); download it where {host} is reachable (`hf download`), "
                            "or give a local path", host=host)


def _why(err: Exception, ref: HubRef) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if constants.is_offline_mode():
        return (f"HF_HUB_OFFLINE is set and {ref} is not in the hub cache ({constants.HF_HUB_CACHE}); download "
                "it where the hub is reachable (`hf download`) into that cache, or give a local path")
    if isinstance(err, RevisionNotFoundError):
        return f"the hub has no revision {ref.revision!r} of {ref.repo_id}"
    if isinstance(err, RepositoryNotFoundError):
        return f"the hub has no repository {ref.repo_id} (or it is private/gated and no token was given)"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def resolve_weights(value: str, field: str, *, want: Literal["file", "folder"],
                    suffixes: tuple[str, ...] = ()) -> Path:
    """A local path for `value`; hub references are downloaded (or found in the cache) first.

    want="folder": the repo snapshot, or its sub-folder `path`. want="file": the file `path`, or, when the
    reference names only the repo, the repo's one file ending in `suffixes` (ambiguity is an error).
    Errors are InputError naming `field`, e.g. "distill.discriminator.checkpoint: ...".
    """
    ref = parse_hub_ref(value)
    if ref is None:  # a local path: checked again where it is opened, after realpath (trainer/roots.py)
        return Path(opened_model(value, field))
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    # Unreachable (offline mode, no network): the cache only, at once, instead of five retries with backoff.
    unreachable = hub_unreachable()
    cached_only = {"local_files_only": True} if unreachable else {}
    try:
        if want == "file" and ref.path:
            return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision, **cached_only))
        if want == "folder":
            patterns = [f"{ref.path}/*", f"{ref.path}/**"] if ref.path else None
        else:  # only the weights files: a repo may also hold big files of other kinds
            patterns = [f"*{s}" for s in suffixes] or None
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns, **cached_only))
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError) as err:
        if unreachable and not isinstance(err, HFValidationError):
            raise unreachable_error(field, value, unreachable) from None
        raise InputError(f"{field}: cannot resolve hub id {value!r}: {_why(err, ref)}") from None
    if want == "folder":
        folder = root / ref.path if ref.path else root
        if not folder.is_dir():
            raise InputError(f"{field}: hub repo {ref.repo_id} has no folder {ref.path!r}")
        return folder
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if len(files) != 1:
        names = ", ".join(str(p.relative_to(root)) for p in files[:5]) or "none"
        raise InputError(f"{field}: hub repo {ref} has {len(files)} files ending in {'/'.join(suffixes)} "
                         f"({names}); name one as {ref.repo_id}/FILE")
    return files[0]
