"""Upload an export folder to a model repo with huggingface_hub's HfApi (`flashdmd export --push-to-hub`).

The endpoint and the token default to huggingface_hub's own settings (`HF_ENDPOINT`, `HF_TOKEN` or the
saved login), so a mirror or a private hub works as it does for `hf upload`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.jobspec.limits import HUB_REF


class PushError(Exception):
    """The upload failed; the message says which step (create the repo, upload) and why."""


@dataclass(frozen=True)
class Pushed:
    repo_url: str
    commit_url: str
    files: int


def check_repo_id(repo_id: str) -> str:
    """org/name only: a path or a revision has no meaning as an upload target."""
    m = HUB_REF.match(repo_id)
    if m is None or m["path"] or m["revision"] or ".." in repo_id:
        raise PushError(f"--push-to-hub {repo_id!r}: expected a repo id org/name")
    return repo_id


def push_folder(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None,
                endpoint: str | None = None, message: str | None = None) -> Pushed:
    """create_repo (exist_ok: pushing again adds a commit) then upload_folder, as one commit."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repo"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = "upload the folder"
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=message or f"flashdmd export: {folder.name}")
    except Exception as err:  # HTTP, connection (its own client's types), OS and card errors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PushError(f"--push-to-hub {repo_id}: could not {step}: {first}") from None
    return Pushed(str(url), str(info.commit_url), files)
