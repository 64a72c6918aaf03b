"""Weights from a local path or a hub id: the one resolver for SAM, reward-model and scorer weights (issue #14).

A hub reference is `org/name[/path/in/repo][@revision]` (trainer/spec_limits.py HUB_REF). It is fetched
with huggingface_hub, so its cache (`HF_HUB_CACHE`), offline mode (`HF_HUB_OFFLINE=1`), mirror
(`HF_ENDPOINT`) and token all apply; those are huggingface_hub's settings, read by it, not by us. A value
that looks local (absolute, ./, ../, ~, or an existing path) is returned as a path unchanged, so each
loader keeps its own checks and messages for local files. Lives in trainer/ because the trainer loads SAM
and the reward model; inference/ (the scorers) imports it, never the other way round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.errors import InputError
from trainer.spec_limits import HUB_REF, is_hub_ref


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
    if ref is None:
        return Path(value).expanduser()
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    try:
        if want == "file" and ref.path:
            return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision))
        if want == "folder":
            patterns = [f"{ref.path}/*", f"{ref.path}/**"] if ref.path else None
        else:  # only the weights files: a repo may also hold big files of other kinds
            patterns = [f"*{s}" for s in suffixes] or None
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError) as err:
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
