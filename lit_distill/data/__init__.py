"""Data for distillation: text packed into fixed-length rows (``text.py``), read from a corpus (``corpus.py``)
with the teacher's or a trained tokenizer (``tokenizers.py``), prepared once into flat token files read row by row
(``prepared.py``; chat data: ``prepared_chat.py``) and shuffled resumably over processes (``shuffle.py``), or streamed
when too big to prepare (``streaming.py``), chat data through the tokenizer's chat template
(``chat.py``, ``chat_formats.py``, ``chat_template.py``; ``datasets`` is imported only where they read data), with
a plain chat template for tokenizers without one (``BUNDLED_CHAT_TEMPLATE``) and conversations from the bundled plays
(``dialogues.py``, ``python -m lit_distill.data.dialogues DIR``), prompt
sets for on-policy distillation (``prompts.py``: left-padded prompts, no labels), the
cache directory (``cache_dir.py``), and the teacher cache (``teacher_cache/``: a teacher's sparse signal written
once, read by ``OfflineDistillation``).

Data knows no technique and no command line: nothing here imports ``modules``, ``callbacks``, ``demo`` or ``cli``.
Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels``, not shifted (the modules shift).
"""

from .cache_dir import default_cache_dir, writable_dir
from .chat import ChatDataModule
from .chat_template import BUNDLED_CHAT_TEMPLATE
from .corpus import BUNDLED_CORPUS, CORPUS_CREDIT, read_documents, split_documents, split_works
from .prepared import PreparedText, open_prepared, prepare_text
from .prepared_chat import prepare_chat
from .prompts import PromptDataModule
from .streaming import StreamingTextDataModule
from .teacher_cache import TeacherCacheDataModule
from .text import EpochShuffle, ShuffledDataModule, TextDataModule, TokenBlocks, pack
from .tokenizers import (
    EOS,
    PAD,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    check_tokenizer,
    load_tokenizer,
    saved_tokenizer_dir,
    special_token_ids,
    train_bpe,
)

__all__ = [
    "BUNDLED_CHAT_TEMPLATE",
    "BUNDLED_CORPUS",
    "CORPUS_CREDIT",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILES",
    "ChatDataModule",
    "EpochShuffle",
    "PreparedText",
    "PromptDataModule",
    "ShuffledDataModule",
    "StreamingTextDataModule",
    "TeacherCacheDataModule",
    "TextDataModule",
    "TokenBlocks",
    "check_tokenizer",
    "default_cache_dir",
    "load_tokenizer",
    "open_prepared",
    "pack",
    "prepare_chat",
    "prepare_text",
    "read_documents",
    "saved_tokenizer_dir",
    "special_token_ids",
    "split_documents",
    "split_works",
    "train_bpe",
    "writable_dir",
]
