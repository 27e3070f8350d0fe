"""Bits per byte: a validation loss that compares students of different tokenizers on one scale.

A token-mean cross-entropy falls as a vocabulary grows (longer tokens, fewer of them); the same text's negative
log-likelihood spread over its UTF-8 bytes does not depend on how it was cut (lm-eval's ``bits_per_byte``,
nanochat's ``evaluate_bpb``): the summed NLL in nats of the counted target tokens over ln 2 times their bytes.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torchmetrics import Metric


class BitsPerByte(Metric):
    """``val/bits_per_byte`` of the counted target tokens, for the data's tokenizer.

    The byte length of every token comes from the data module's ``tokenizer`` (its own byte map: byte-level BPE,
    or SentencePiece with byte fallback; special tokens are zero bytes), looked up when validation starts. Without
    a data module tokenizer whose bytes can be read, nothing is counted or logged.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nats", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.byte_lengths: torch.Tensor | None = None

    def find_lengths(self, trainer: pl.Trainer, device: torch.device) -> None:
        """Look up the byte length of each token of ``trainer.datamodule.tokenizer`` (None when there is none)."""
        from ..data.cross_tokenizer import byte_lengths

        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        try:
            lengths = byte_lengths(tokenizer) if tokenizer is not None else None
        except ValueError:  # a tokenizer whose bytes cannot be read (WordPiece): no bits per byte
            lengths = None
        self.byte_lengths = torch.tensor(lengths, device=device) if lengths is not None else None

    def update(self, nats: torch.Tensor, targets: torch.Tensor, num_tokens: torch.Tensor, ignore_index: int) -> None:
        """Add ``nats`` (summed over ``num_tokens`` counted targets) and the bytes of ``targets``' counted ones.

        When the counted ``targets`` are not the ``num_tokens`` the loss counted (on-policy prompts, which the
        module continues itself), the batch is left out rather than mismatched.
        """
        counted = targets != ignore_index
        if self.byte_lengths is None or int(counted.sum()) != int(num_tokens):
            return
        self.nats += nats.double()
        self.bytes += self.byte_lengths[targets[counted]].sum()

    def compute(self) -> torch.Tensor:
        return self.nats / (math.log(2) * self.bytes.clamp(min=1))

    def log_to(self, module: pl.LightningModule) -> None:
        """Log ``val/bits_per_byte`` on ``module`` when bytes were counted, then start over."""
        if self.byte_lengths is not None and self.bytes > 0:
            module.log("val/bits_per_byte", self.compute().float())
        self.reset()
