"""What a teacher cache holds and how it was made: ``manifest.json``, its fields and their checks.

A cache directory::

    settings.json                 what is being cached (written first: a rerun resumes only the same job)
    shard-00000.safetensors ...   input_ids int32 (S, L), teacher_ids int32 (S, L, K), teacher_logprobs fp16
                                  (chat data: rows of any length, the signal only where learned; ``rows.py``)
    validation.safetensors        the held-out input_ids (validation measures the student's cross-entropy)
    tokenizer/                    the tokenizer the ids belong to
    teacher_tokenizer/, vocab_map.npz   across tokenizers only: the teacher's tokenizer and the map its signal
                                  was binned into the student's vocabulary with (teacher_ids are student ids;
                                  positions that are no boundary hold empty slots, -1 and -inf)
    manifest.json                 the settings, counts and a sha256 per shard (written last: the cache is done)

Dtypes: ids are int32 (vocabularies pass 65,536 tokens; int64 would double them for nothing). The
log-probabilities are fp16: 2 bytes, and near the log-probabilities that matter (-20 to 0) fp16's spacing is
at most 2^-6 against bf16's 2^-3, so a probability is off by at most 0.8% (bf16: 6%); fp32 would make a
token 8K+4 bytes instead of 6K+4. ``tests/test_teacher_cache.py`` measures what the rounding does to the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..cache_dir import sha256_file  # noqa: F401  (imported from here by the cache's readers)
from ..tokenizers import tokenizer_hash  # noqa: F401

FORMAT_VERSION = 1  # caches of fixed-length blocks (text data): what every version reads
ROWS_FORMAT_VERSION = 2  # caches of chat rows (rows.py): an older lit-distill refuses them by this number
METHODS = ("topk", "sampled")
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
VALIDATION = "validation.safetensors"
TOKENIZER_DIR = "tokenizer"
ID_DTYPE = torch.int32
LOGPROB_DTYPE = torch.float16


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class CacheSettings:
    """What identifies a cache: the teacher, the tokenizer and how the signal was drawn.

    Two runs with equal settings write the same cache (the draws are seeded per sequence), so a rerun
    may resume the shards an interrupted one left.
    """

    teacher_source: str  # a path or Hub name, or "config" for a model built from a config
    teacher_hash: str  # sha256 of the teacher's config and its weights' names and shapes
    tokenizer_hash: str  # sha256 of the tokenizer's vocabulary
    vocab_size: int  # the tokenizer's size: teacher ids are below it
    method: str  # "topk" or "sampled"
    k: int  # slots per position (for "sampled": the number of draws, the most distinct tokens)
    samples: int  # draws per position ("sampled"); 0 for "topk"
    temperature: float  # the teacher's log-probabilities are at this temperature
    seq_len: int
    sequences: int  # training sequences cached
    shard_sequences: int  # sequences per shard (the last may hold fewer)
    seed: int  # of the draws ("sampled")
    format_version: int = FORMAT_VERSION
    layout: str = "blocks"  # "blocks": (sequences, seq_len) text blocks; "rows": chat rows, the signal where learned
    data_fingerprint: str = ""  # the rows': a prepared corpus's fingerprint, or the chat rows' (data, tokenizer,
    # template, loss_on, length); "" for text packed in memory
    # Across tokenizers (the signal binned into the student's ids; tokenizer_hash and vocab_size are the student's):
    teacher_tokenizer_hash: str = ""  # the teacher's tokenizer (saved in teacher_tokenizer/); "" for one tokenizer
    vocabulary_map_hash: str = ""  # sha256 of the teacher -> student ids the signal was binned with (vocab_map.npz)

    @property
    def num_shards(self) -> int:
        return -(-self.sequences // self.shard_sequences)

    def shard_range(self, index: int) -> tuple[int, int]:
        """The sequences ``[start, stop)`` shard ``index`` holds."""
        start = index * self.shard_sequences
        return start, min(start + self.shard_sequences, self.sequences)


@dataclass(frozen=True)
class CacheManifest:
    """The settings of a finished cache, its counts and the checksum of every shard (``manifest.json``)."""

    settings: CacheSettings
    tokens: int
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"file", "sequences", "sha256"} per shard
    validation_sequences: int = 0
    signal_positions: int = 0  # positions with a stored signal ("blocks": every token)
    mapped_positions: int = 0  # of those, the ones whose slots are not empty (across tokenizers: the boundaries)
    tokenizers: dict[str, str] = field(default_factory=dict)  # across tokenizers: "student"/"teacher" -> the names
    # the tokenizers were loaded from (for messages; the hashes in the settings identify them)

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the signal is a teacher's of another tokenizer, binned into the student's ids."""
        return bool(self.settings.teacher_tokenizer_hash)

    def write(self, directory: Path) -> None:
        _write_json(directory / MANIFEST, {**asdict(self.settings), **_counts(self)})

    @classmethod
    def read(cls, directory: Path) -> CacheManifest:
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{directory} is not a finished teacher cache: it has no {MANIFEST} (write one with"
                " `lit-distill cache-teacher`; an interrupted run resumes when run again)"
            )
        try:
            raw = json.loads(path.read_text())
            version = raw.get("format_version")
            if version not in (FORMAT_VERSION, ROWS_FORMAT_VERSION):
                raise ValueError(
                    f"teacher cache {directory}: format_version is {version}, this lit-distill reads"
                    f" {FORMAT_VERSION} and {ROWS_FORMAT_VERSION}; write the cache again with this version"
                )
            names = {f.name for f in fields(CacheSettings)}
            settings = CacheSettings(**{k: v for k, v in raw.items() if k in names})
            positions = raw.get("signal_positions", raw["tokens"])
            mapped = raw.get("mapped_positions", positions)
            counts = raw.get("validation_sequences", 0), positions, mapped, raw.get("tokenizers", {})
            return cls(settings, raw["tokens"], raw["shards"], *counts)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"teacher cache {directory}: {MANIFEST} is damaged ({err!r}); write the cache again"
            ) from err


def _counts(manifest: CacheManifest) -> dict[str, Any]:
    return {
        "tokens": manifest.tokens,
        "shards": manifest.shards,
        "validation_sequences": manifest.validation_sequences,
        "signal_positions": manifest.signal_positions,
        "mapped_positions": manifest.mapped_positions,
        **({"tokenizers": manifest.tokenizers} if manifest.tokenizers else {}),
    }


def read_settings(directory: Path) -> CacheSettings | None:
    path = Path(directory) / SETTINGS
    return CacheSettings(**json.loads(path.read_text())) if path.exists() else None


def write_settings(directory: Path, settings: CacheSettings) -> None:
    _write_json(Path(directory) / SETTINGS, asdict(settings))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all: a crash leaves the old file (or none), never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def model_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's config and its parameters' names and shapes (not their values: cheap, and enough
    to tell two teachers apart by architecture; the source path tells checkpoints apart)."""
    config = getattr(model, "config", None)
    config = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    shapes = [(name, list(p.shape)) for name, p in model.state_dict().items()]
    return hashlib.sha256(json.dumps([config, shapes], sort_keys=True).encode()).hexdigest()
