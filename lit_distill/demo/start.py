"""What every demo run does first: quiet output, its cache and output directories, the seed, the header, and
the bundled corpus's text data that the teacher is trained on (``main.py`` and ``chat.py``)."""

from __future__ import annotations

from pathlib import Path

from .report import QUICK_NOTE


def start(ns, title: str, sizes: dict) -> tuple[Path, Path]:
    """Quiet Lightning and Hugging Face, seed, print ``title`` with ``sizes``; the (cache, out) directories."""
    import lightning.pytorch as pl

    from ..data.cache_dir import default_cache_dir, writable_dir
    from ..reporting import quiet

    quiet()  # Lightning's banner and tips for each trainer, Hugging Face's bars
    cache = writable_dir(ns.cache_dir or default_cache_dir())
    out = writable_dir(ns.out)
    pl.seed_everything(ns.seed, verbose=False)
    print(f"{title} ({'quick' if ns.quick else 'default'} sizes): {sizes}")
    if ns.quick:
        print(QUICK_NOTE)
    return cache, out


def text_data(sizes: dict, cache: Path):
    """The bundled corpus as the demo's teacher reads it (the BPE of ``vocab_size`` tokens, cached)."""
    from ..data import TextDataModule

    return TextDataModule(
        vocab_size=sizes["vocab_size"],
        seq_len=sizes["seq_len"],
        batch_size=sizes["batch_size"],
        cache_dir=str(cache),
        max_train_tokens=sizes["max_train_tokens"],
    )
