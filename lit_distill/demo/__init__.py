"""The bundled demo (``lit-distill demo``): a teacher and seven students on the bundled corpus, the teacher
caches of the offline students, and the report. ``main.py`` runs it, ``training.py`` trains and evaluates the
models, ``offline.py`` writes the caches and builds the offline students, ``report.py`` prints and plots,
``start.py`` does what every run does first.
``lit-distill demo --chat`` fine-tunes that teacher on dialogues from the plays and distills it into chat students
(``chat.py``: the run, the data and the teacher; ``chat_students.py``: the students and their measurements)."""

from .main import demo_main

__all__ = ["demo_main"]
