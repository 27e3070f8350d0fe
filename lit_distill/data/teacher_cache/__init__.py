"""The teacher cache: a teacher's sparse signal (top-k or sampled tokens) over a corpus, written once with
``Trainer.predict`` and trained from many times without the teacher (``OfflineDistillation``).

``cache_teacher`` / ``lit-distill cache-teacher`` write one; ``TeacherCacheDataModule`` reads one.
"""

from .data import TeacherCacheDataModule
from .manifest import CacheManifest, CacheSettings
from .signal import TeacherSignal, sparse_signal
from .writer import TeacherCacheWriter, cache_teacher

__all__ = [
    "CacheManifest",
    "CacheSettings",
    "TeacherCacheDataModule",
    "TeacherCacheWriter",
    "TeacherSignal",
    "cache_teacher",
    "sparse_signal",
]
