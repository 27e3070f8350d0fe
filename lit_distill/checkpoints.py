"""Checkpoint files checked before they are used, so that a damaged file stops a run with a clear error.

PyTorch checkpoints are zip archives whose members carry a CRC-32. Left to itself, loading a truncated file
fails with a low-level zip error, an empty or foreign file with an unpickling or ``KeyError``, and a file
damaged in the middle (a bad disk, an incomplete copy) loads without complaint. :func:`verify_checkpoint`
reads the whole file once and checks every member's CRC; :class:`VerifiedCheckpointIO` runs it before
Lightning loads a local file, and checks that what was loaded is a Lightning checkpoint. ``lit-distill fit``
uses it; with ``Trainer.fit`` pass it as a plugin: ``Trainer(plugins=[VerifiedCheckpointIO()])``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version")
RESUME_ADVICE = "resume from an earlier checkpoint, or start without ckpt_path"


def verify_checkpoint(path: str | Path) -> None:
    """Raise if the local file ``path`` is missing, empty, truncated, not a PyTorch zip archive, or fails a CRC.

    Raises:
        FileNotFoundError: if nothing is at ``path``.
        ValueError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():  # a sharded checkpoint: its strategy reads and checks it
        return
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"checkpoint {path} is empty (0 bytes): the run that wrote it probably stopped while saving;"
            f" {RESUME_ADVICE}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"checkpoint {path} ({size} bytes) is truncated or not a PyTorch checkpoint ({err}); {RESUME_ADVICE}"
        ) from err
    if damaged is not None:
        raise ValueError(
            f"checkpoint {path} is corrupt: {damaged} does not match the checksum it was saved with (the file"
            f" changed after it was written: a bad disk or an incomplete copy); {RESUME_ADVICE}"
        )


def check_lightning_checkpoint(checkpoint: Any, path: str | Path) -> None:
    """Raise ``ValueError`` unless ``checkpoint`` (loaded from ``path``) is a Lightning training checkpoint."""
    if isinstance(checkpoint, dict) and all(key in checkpoint for key in LIGHTNING_KEYS):
        return
    keys = sorted(map(str, checkpoint))[:3] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(
        f"{path} is not a Lightning checkpoint (it holds {keys}, not 'state_dict' and 'pytorch-lightning_version');"
        " ckpt_path resumes a run from a checkpoint that Lightning wrote. To start from pretrained weights, load"
        " them into the model instead (CausalLM(name_or_path=...))"
    )


class VerifiedCheckpointIO(CheckpointIO):
    """Lightning's ``TorchCheckpointIO``, with :func:`verify_checkpoint` and a Lightning-format check on load."""

    def __init__(self, inner: CheckpointIO | None = None) -> None:
        self.inner = inner if inner is not None else TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, **kwargs: Any) -> dict:
        if "://" not in str(path):  # remote files are read as they are
            verify_checkpoint(path)
        checkpoint = self.inner.load_checkpoint(path, **kwargs)  # map_location, weights_only as Lightning passes
        check_lightning_checkpoint(checkpoint, path)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
