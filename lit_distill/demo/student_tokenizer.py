"""The cross-tokenizer student's own tokenizer: another scheme than the teacher's byte-level BPE on purpose.

A SentencePiece-style BPE (``▁`` for a space, the dummy prefix before the first word, ``Metaspace``) with byte
fallback (the 256 ``<0xNN>`` pieces: a character outside the learned alphabet becomes its UTF-8 bytes, never
``<unk>``), as Llama 2, Gemma and Mistral tokenize, trained on the same training split as the demo's byte-level
BPE and cached the same way (by the documents' content and the size).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: the student's vocabulary: half the teacher's 4096 (and --quick's 1024 teacher gets the same 2048)
STUDENT_VOCAB = 2048
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def train_metaspace_bpe(documents: list[str], vocab_size: int, cache_dir: str | Path) -> Path:
    """The directory of a Metaspace BPE with byte fallback of ``vocab_size`` tokens trained on ``documents``
    (cached by content and size): ids 0 and 1 are ``<|endoftext|>`` (EOS and BOS) and ``<|pad|>`` as in the
    demo's BPE, then the 256 byte pieces, then the learned alphabet and merges."""
    from ..data.cache_dir import writable_dir

    digest = hashlib.sha1(f"metaspace-fallback-split-{vocab_size}".encode())
    for doc in documents:
        digest.update(doc.encode())
    directory = Path(cache_dir) / "tokenizers" / f"metaspace-{vocab_size}-{digest.hexdigest()[:12]}"
    if not (directory / "tokenizer.json").exists():
        writable_dir(directory.parent)
        _tokenizer(documents, vocab_size).save_pretrained(directory)
    return directory


def _tokenizer(documents: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.tokenizers import EOS, PAD

    specials = [EOS, PAD]
    reserved = len(specials) + len(BYTE_PIECES)
    if vocab_size <= reserved + 64:
        raise ValueError(f"a byte-fallback BPE needs more than {reserved + 64} tokens, got {vocab_size}")
    # newlines and punctuation are pieces of their own, as the teacher's byte-level BPE has them: merged into the
    # words around them ("\nM", "one,"), a word's first piece would depend on what stands before and after it
    metaspace = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n+"), "isolated"),
            pre_tokenizers.Punctuation("contiguous"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True),
        ]
    )
    # Learn the alphabet and merges first (the byte pieces are not learned: they are added below, as pieces of
    # the model, not as added tokens, so that they stand for their byte and the BPE falls back to them)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES), min_frequency=2, special_tokens=specials, show_progress=False
    )
    learner.train_from_iterator(documents, trainer=trainer)
    learned = sorted(learner.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    vocab = {token: i for i, token in enumerate(specials + BYTE_PIECES)}
    for token, _ in learned:
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(pair.split(" ", 1)) if isinstance(pair, str) else tuple(pair) for pair in _merges(learner)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    tokenizer.pre_tokenizer = metaspace
    # Llama 2's decoder: ▁ back to a space, byte pieces back to bytes, and the dummy prefix dropped
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, bos_token=EOS)


def _merges(learner) -> list:
    import json

    return json.loads(learner.to_str())["model"]["merges"]


def main(argv: list[str] | None = None) -> Path:
    """``python -m lit_distill.demo.student_tokenizer DIR [--vocab-size N]``: the demo's student tokenizer, trained
    on the bundled corpus's training works, saved to ``DIR`` (what ``configs/cross_tokenizer.yaml`` reads)."""
    import argparse
    import shutil
    import tempfile

    from ..data.corpus import read_documents, split_documents

    parser = argparse.ArgumentParser(prog="python -m lit_distill.demo.student_tokenizer", description=main.__doc__)
    parser.add_argument("directory", help="where to save the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=STUDENT_VOCAB)
    ns = parser.parse_args(argv)
    train, _ = split_documents(read_documents(None), 0.05)
    with tempfile.TemporaryDirectory() as cache:
        shutil.copytree(train_metaspace_bpe(train, ns.vocab_size, cache), ns.directory, dirs_exist_ok=True)
    print(f"a SentencePiece-style BPE with byte fallback of {ns.vocab_size} tokens saved to {ns.directory}")
    return Path(ns.directory)


if __name__ == "__main__":
    main()
