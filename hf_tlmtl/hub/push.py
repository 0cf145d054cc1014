"""One-commit uploads of a saved model folder and its adapters (:func:`push_model_to_hub`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    HfApi,
    ModelCard,
    constants,
    get_token,
)
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME

from ..backbone.create import is_network_error
from ..configuration import TimmMultiTaskConfig
from ..image_processing import TimmMultiTaskImageProcessor
from ..modeling import TimmMultiTaskModel
from .adapter_card import can_replace_card, create_adapter_card
from .cards import (
    ADAPTER_CONFIG_NAME,
    CARD_NAME,
    _check_hub_id,
    _unwrap,
    create_model_card,
)

# Never uploaded from a model folder: Trainer checkpoints, hidden files, and pickles (weights are safetensors).
DEFAULT_IGNORE_PATTERNS = (
    "checkpoint-*",
    "checkpoint-*/*",
    ".*",
    "*/.*",
    "__pycache__/*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.ckpt",
)


class PushToHubError(ConnectionError):
    """The Hub could not be reached or refused the upload; the local folder is complete and untouched."""


def _check_model_folder(folder: Path) -> None:
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{folder} is not a saved hf_tlmtl model ({CONFIG_NAME} missing): save it with model.save_pretrained(DIR).")
    if not any(folder.glob("model*.safetensors")):
        raise ValueError(f"{folder} has no safetensors weights (model.safetensors): save it with model.save_pretrained(DIR).")


def _write_new_file(path: Path, content: str | bytes, overwrite: bool) -> None:
    """Write ``path`` unless a different file already exists there (then ``overwrite`` is needed)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.exists() and path.read_bytes() != data and not overwrite:
        raise ValueError(f"{path} already exists with other content; pass overwrite=True to replace it.")
    path.write_bytes(data)


def _folder_operations(folder: Path, prefix: str, ignore_patterns: Sequence[str]) -> list[CommitOperationAdd]:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(files, ignore_patterns=list(ignore_patterns))
    return [CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(folder / rel)) for rel in kept]


def _named_adapter_folders(adapters: Mapping[str, Any] | Sequence[Any] | None) -> list[tuple[str, Path]]:
    if not adapters:
        return []
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    named = adapters.items() if isinstance(adapters, Mapping) else [(Path(a).name, a) for a in adapters]
    folders = [(str(name), Path(folder)) for name, folder in named]
    for name, folder in folders:
        if not (folder / ADAPTER_CONFIG_NAME).is_file():
            raise ValueError(f"Adapter {name!r}: {folder} has no {ADAPTER_CONFIG_NAME}; save it with peft_model.save_pretrained(DIR).")
    return folders


def _network_error(error: Exception, repo_id: str, folder: Path) -> PushToHubError:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if isinstance(error, HfHubHTTPError) and getattr(error.response, "status_code", None) in (401, 403):
        hint = "the token is invalid or cannot write to this repo: create a write token and run `hf auth login`."
    else:
        hint = "the Hub is unreachable (offline machine, firewall, or HF_HUB_OFFLINE=1)."
    return PushToHubError(
        f"Could not upload to {repo_id!r} ({reason}): {hint} Nothing was lost: the complete model folder is "
        f"{folder}; upload it later with `hf upload {repo_id} {folder}` or push_model_to_hub('{folder}', '{repo_id}')."
    )


def check_can_push(repo_id: str, token: str | None = None) -> None:
    """Before a run that ends with an upload: ``repo_id`` is a Hub repo id, the Hub is not switched off
    (``HF_HUB_OFFLINE``) and there is a token (``token``, ``HF_TOKEN`` or ``hf auth login``).
    A ``ValueError`` says which is missing, in the recipes' flags.

    Example:
        >>> try:
        ...     check_can_push("not a repo id!", token="hf_placeholder")
        ... except ValueError as e:
        ...     print(str(e).split(" (")[0])
        --push_to_hub: 'not a repo id!' is not a Hub repo id
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"--push_to_hub: {repo_id!r} is not a Hub repo id ({e}); pass --hub_model_id org/name") from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub but HF_HUB_OFFLINE is set: unset it to upload, or drop --push_to_hub")
    if not (token or get_token()):
        raise ValueError("--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN or pass --hub_token")


def push_model_to_hub(
    model_or_folder: Any,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    curves_image: str | os.PathLike | None = None,
    adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload hf_tlmtl multi-task model",
    revision: str | None = None,
    create_pr: bool = False,
    save_dir: str | os.PathLike | None = None,
    ignore_patterns: Sequence[str] | None = None,
    overwrite: bool = False,
) -> CommitInfo:
    """Upload a model with its preprocessor config, card, curves and adapters in one Hub commit.

    The local folder is completed first (never overwritten without ``overwrite=True``): a
    missing ``preprocessor_config.json`` or ``README.md`` card is written, ``curves_image`` is
    copied in, each adapter folder gets its own card naming ``repo_id`` as its base model.
    Then ``HfApi.create_repo`` + ``HfApi.create_commit`` send every file of the folder (minus
    Trainer checkpoints, hidden files and pickles) and the adapters under ``adapters/<name>/``.

    Transformers' own ``model.push_to_hub(repo_id)`` also sends ``preprocessor_config.json``
    (``save_pretrained`` writes it) but with transformers' generic card; this function sends the
    hf_tlmtl card, the curves and the adapters.

    Args:
        model_or_folder: A ``TimmMultiTaskModel`` or the folder it was saved to.
        repo_id: ``org/name`` on the Hub.
        card: The card to send (default: the folder's ``README.md``, else :func:`create_model_card`).
        curves_image: Training-curve image to include (copied into the folder).
        adapters: Adapter folders to include, ``{name: folder}`` or a list (named after the folder).
        token: Hub token with write access (default: ``HF_TOKEN`` / ``hf auth login``).
        private, commit_message, revision, create_pr: As in ``HfApi``.
        save_dir: For a model object: where to save it first (default: a new temporary folder,
            kept if the upload fails).
        ignore_patterns: Extra glob patterns of files not to upload.
        overwrite: Allow replacing files of the folder that differ (``README.md``, curves image).

    Raises:
        ValueError: bad repo id, no token, incomplete folder, or a file would be overwritten.
        PushToHubError: the Hub is unreachable or refused the upload; the message names the
            complete local folder to upload later.

    Example:
        >>> import os, tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> d = tempfile.mkdtemp(); model.save_pretrained(d)
        >>> try:
        ...     push_model_to_hub(d, "me/my-model", token="hf_placeholder")  # this machine is offline
        ... except PushToHubError as error:
        ...     print("Nothing was lost" in str(error), sorted(os.listdir(d)))
        True ['README.md', 'config.json', 'model.safetensors', 'preprocessor_config.json']
    """
    _check_hub_id(repo_id, "repo_id")
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token: run `hf auth login` (or set HF_TOKEN, or pass token=...) with a token that has "
            "write access. Nothing was uploaded."
        )

    adapter_folders = _named_adapter_folders(adapters)
    if curves_image is not None and not Path(curves_image).is_file():
        raise ValueError(f"curves_image {curves_image} does not exist.")
    model = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder)
        _check_model_folder(folder)
    else:
        model, _ = _unwrap(model_or_folder)
        if model is not model_or_folder:
            raise ValueError(
                "push_model_to_hub uploads a full model; for a peft model, merge it (model.merge_and_unload()) or "
                "save the adapter (model.save_pretrained(DIR)) and pass adapters=[DIR] with the base model."
            )
        folder = Path(save_dir) if save_dir else Path(tempfile.mkdtemp(prefix="hf_tlmtl_push_"))
        model.save_pretrained(folder)

    if not (folder / IMAGE_PROCESSOR_NAME).exists():
        TimmMultiTaskImageProcessor.from_config(TimmMultiTaskConfig.from_pretrained(folder)).save_pretrained(folder)
    if curves_image is not None:
        curves_image = Path(curves_image)
        if curves_image.resolve() != (folder / curves_image.name).resolve():
            _write_new_file(folder / curves_image.name, curves_image.read_bytes(), overwrite)
    if card is not None:
        _write_new_file(folder / CARD_NAME, str(card), overwrite)
    elif not (folder / CARD_NAME).exists():
        if model is None:
            model = TimmMultiTaskModel.from_pretrained(folder)
        created = create_model_card(model, repo_id=repo_id, curves_image=curves_image)
        created.save(folder / CARD_NAME)

    ignore = [*DEFAULT_IGNORE_PATTERNS, *(ignore_patterns or [])]
    operations = _folder_operations(folder, "", ignore)
    for name, adapter_folder in adapter_folders:
        if can_replace_card(adapter_folder / CARD_NAME):
            create_adapter_card(
                adapter_folder, base_model=repo_id, repo_id=repo_id, subfolder=f"adapters/{name}",
                tasks=TimmMultiTaskConfig.from_pretrained(folder).task_specs,
            )
        operations += _folder_operations(adapter_folder, f"adapters/{name}/", ignore)

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, token=token, revision=revision, create_pr=create_pr
        )
    except Exception as error:  # noqa: BLE001 - only Hub/network failures are translated
        if is_network_error(error):
            raise _network_error(error, repo_id, folder) from error
        raise
