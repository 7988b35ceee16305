"""Uploads to the Hugging Face hub through huggingface_hub: one folder to a model repository, any failure as one
`HubUploadError` line saying why (never the token, which stays huggingface_hub's: HF_TOKEN or `hf auth login`).

`expertune.hub` builds what a run publishes and uploads it with `push_folder`; the checkpointer uploads each
checkpoint with `push_checkpoint` (`--push_checkpoints_to_hub`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from expertune.config import Config
from expertune.errors import HubUploadError

log = logging.getLogger(__name__)


def _upload_problem(error: Exception, repo_id: str) -> str:
    """Why an upload failed, in words, from huggingface_hub's exception (never the token)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 forbids uploading (unset it)"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the hub refused the token (HTTP {status}): it needs write access to {repo_id}"
        return f"the hub answered HTTP {status}: {str(error).splitlines()[0]}"
    from huggingface_hub import constants

    return f"cannot reach the hub at {constants.ENDPOINT} ({type(error).__name__}: {error}); check the network"


def push_folder(folder: Path, repo_id: str, *, path_in_repo: str | None = None, message: str) -> str:
    """Upload `folder` to the model repository `repo_id` (created private when missing); its URL, or a
    HubUploadError saying why not. The token is huggingface_hub's own (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise HubUploadError(f"no Hugging Face token to upload {repo_id} with: log in with `hf auth login` or set "
                             "HF_TOKEN (a token with write access)")
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, path_in_repo=path_in_repo,
                                   commit_message=message)
    except Exception as error:  # an upload never loses the run: every failure becomes the one clear line
        raise HubUploadError(f"uploading {folder} to {repo_id} failed: {_upload_problem(error, repo_id)}") from error
    return str(getattr(commit, "commit_url", "") or repo)


def push_checkpoint(checkpoint: Path, config: Config) -> None:
    """`--push_checkpoints_to_hub`: the checkpoint to checkpoints/<its name>/ of the repository; a failure is a
    warning (training goes on, the checkpoint stays on disk)."""
    repo_id = config.hub.hub_model_id
    if not (config.hub.push_to_hub and config.hub.push_checkpoints_to_hub and repo_id):
        return
    try:
        push_folder(checkpoint, repo_id, path_in_repo=f"checkpoints/{checkpoint.name}",
                    message=f"expertune: {checkpoint.name}")
        log.info("uploaded %s to %s", checkpoint.name, repo_id)
    except HubUploadError as error:
        log.warning("--push_checkpoints_to_hub: %s; training goes on, the checkpoint is kept in %s", error, checkpoint)
