"""Preparing chat data: ``python -m bench.chat_data --help``.

Renders, masks and tokenizes synthetic conversations through ``ChatDataModule`` (the same path training uses),
cold (a fresh cache directory: the jsonl read into Arrow, then the map) and again from the map cache, for each
template kind (``{% generation %}`` markers, or spans from growing prefixes) and each ``num_proc``. Prints a
table of conversations and tokens per second and writes a CSV to ``--out``. The tokenizer is the bundled
corpus's byte-level BPE of 4,096 tokens (the demo's, trained once and cached in the lit-distill cache).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

# Plain-text headers: no special tokens needed beyond the BPE's EOS, which ends every message. Both render the same
# text (transformers' Jinja trims the newline right after a block tag, so the marked one keeps it inside).
PREFIX_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MARKED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {% generation %}{{ m['content'] }}"
    "{{ eos_token }}\n{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
TEMPLATES = {"markers": MARKED_TEMPLATE, "prefixes": PREFIX_TEMPLATE}
# fmt: off
WORDS = ["the", "king", "queen", "lord", "lady", "sword", "crown", "night", "day", "love", "death", "time",
         "heart", "hand", "eyes", "blood", "honour", "fair", "good", "sweet", "speak", "hear", "tell", "know",
         "think", "give", "take", "make", "come", "go", "stay", "fly", "weep", "laugh", "swear", "pray", "now"]
# fmt: on


def write_conversations(path: Path, count: int, exchanges: int, seed: int) -> None:
    """``count`` conversations of a system line and ``exchanges`` user/assistant pairs of random words."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    with path.open("w") as f:
        for _ in range(count):
            messages = [{"role": "system", "content": sentence(4, 8)}]
            for _ in range(exchanges):
                messages += [
                    {"role": "user", "content": sentence(8, 30)},
                    {"role": "assistant", "content": sentence(8, 40)},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")


def bundled_tokenizer(directory: Path) -> str:
    """The demo's BPE (4,096 tokens on the bundled works' training split), saved to ``directory``."""
    from lit_distill.data import BUNDLED_CORPUS, default_cache_dir, read_documents, train_bpe

    tokenizer = train_bpe(read_documents([str(BUNDLED_CORPUS)]), 4096, default_cache_dir())
    tokenizer.save_pretrained(directory)
    return str(directory)


def prepare(train: Path, tokenizer: str, template: str, num_proc: int, cache_dir: Path) -> tuple[float, dict]:
    """Seconds of ``ChatDataModule.setup`` and the training split's counts."""
    from lit_distill.data import ChatDataModule

    data = ChatDataModule(
        str(train), tokenizer=tokenizer, chat_template=template, max_seq_length=4096, val_fraction=0.0,
        num_proc=num_proc if num_proc > 1 else None, cache_dir=str(cache_dir),
    )  # fmt: skip
    start = time.perf_counter()
    data.setup()
    return time.perf_counter() - start, data.summary["train"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.chat_data", description=__doc__.split("\n\n")[1])
    p.add_argument("--conversations", type=int, default=100_000)
    p.add_argument("--exchanges", type=int, default=3, help="user/assistant pairs per conversation")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--templates", nargs="+", choices=list(TEMPLATES), default=list(TEMPLATES))
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lit-distill-chat-bench-"))
    try:
        train = work / "train.jsonl"
        write_conversations(train, ns.conversations, ns.exchanges, seed=0)
        tokenizer = bundled_tokenizer(work / "tokenizer")
        rows = []
        for name in ns.templates:
            for num_proc in ns.num_proc:
                cache = work / f"cache-{name}-{num_proc}"
                for run in ("cold", "cached"):
                    seconds, counts = prepare(train, tokenizer, TEMPLATES[name], num_proc, cache)
                    per_s = round(counts["conversations"] / seconds), round(counts["tokens"] / seconds)
                    rows.append({"template": name, "num_proc": num_proc, "run": run, "seconds": round(seconds, 3),
                                 "conversations_per_s": per_s[0], "tokens_per_s": per_s[1], **counts})  # fmt: skip
                    print(f"{name:9} num_proc={num_proc} {run:7} {seconds:8.2f} s {per_s[0]:>9,} conversations/s"
                          f" {per_s[1]:>11,} tokens/s")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = ns.out / f"chat_data-{stamp}.csv"
    with path.open("w", newline="") as f:
        fields = ["template", "num_proc", "run", "seconds", "conversations_per_s", "tokens_per_s"]
        fields += [k for k in rows[0] if k not in fields]
        writer = csv.DictWriter(f, fieldnames=[*fields, "machine", "date"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "machine": platform.processor() or platform.machine(), "date": stamp})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
