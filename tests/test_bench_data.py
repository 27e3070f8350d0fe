"""The corpora-larger-than-memory benchmark (bench/data_loading.py) at its --quick size: its CSVs hold the counts
the corpus it wrote gives when encoded here, and runs that trained, read and started as asked."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK_STEPS, QUICK_BATCHES, BATCH, SEQ_LEN = 10, 20, 16, 128


def encoded(path: Path, tokenizer) -> tuple[int, int]:
    """(documents, tokens with one EOS each) of a jsonl corpus, read and encoded here."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return len(texts), sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


@pytest.mark.slow  # 45 to 65 s on 2 cores: four fresh processes that import torch and Lightning, and train
def test_data_loading_bench_counts_what_the_corpus_encodes_to_and_trains_reads_and_starts(tmp_path):
    from transformers import AutoTokenizer

    from bench.data_loading import DEMO_SOFT_LABEL_TOKENS_PER_S

    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.data_loading", "--quick", "--work", str(work), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = {}
    for name in ("memory", "prepare", "reading", "startup"):
        (path,) = out.glob(f"data_loading-{name}-*.csv")
        tables[name] = list(csv.DictReader(path.open()))
        assert all(r["machine"] and r["torch"] and r["date"] for r in tables[name])
    assert not [p for p in work.iterdir() if p.name.startswith("run-")]  # the run's own files are gone
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    assert len(tokenizer) == 4096

    big, small = (work / "corpus-2mb.jsonl"), (work / "corpus-0.5mb.jsonl")
    assert big.stat().st_size >= 2 * 2**20 > small.stat().st_size >= 2**19
    assert big.read_text().startswith(small.read_text())  # the small corpus is the large one's start

    corpus_run, small_run = tables["memory"]  # --quick leaves out the run on files=
    for row, path in ((corpus_run, big), (small_run, small)):
        assert row["read"] == "prepared=DIR"
        assert (int(row["documents"]), int(row["tokens"])) == encoded(path, tokenizer)
        # 95% of the documents train; rows are whole seq_len slices of their tokens
        assert 0.9 * int(row["tokens"]) / SEQ_LEN < int(row["train_rows"]) <= int(row["tokens"]) // SEQ_LEN
        assert float(row["bin_MiB"]) == pytest.approx(2 * int(row["tokens"]) / 2**20, abs=0.06)  # uint16 ids
        assert float(row["prepare_tokens_per_s"]) == pytest.approx(int(row["tokens"]) / float(row["prepare_s"]), 0.02)
    for row in tables["memory"]:
        assert int(row["steps"]) == QUICK_STEPS and float(row["train_tokens_per_s"]) > 0
        assert 100 < float(row["peak_rss_MiB"]) < 8192  # torch and Lightning were imported; in KiB it would be 1000x
    assert abs(float(corpus_run["peak_rss_MiB"]) - float(small_run["peak_rss_MiB"])) < 300

    arrow_row, *prepared_rows, plain_row = tables["prepare"]
    assert [r["method"] for r in prepared_rows] == ["prepare_text num_proc=None", "prepare_text num_proc=2"]
    documents, tokens = encoded(work / "corpus-1mb.jsonl", tokenizer)
    for row in (arrow_row, *prepared_rows, plain_row):
        assert (int(row["documents"]), int(row["tokens"])) == (documents, tokens)
        assert float(row["seconds"]) > 0 and float(row["tokens_per_s"]) == pytest.approx(
            tokens / float(row["seconds"]), 0.02
        )
    for row in prepared_rows:
        ratio = float(row["tokens_per_s"]) / float(plain_row["tokens_per_s"])
        assert float(row["vs_plain"]) == pytest.approx(ratio, abs=0.01) and plain_row["vs_plain"] == "1.0"

    assert [r["source"] for r in tables["reading"]] == ["prepared (row by row)", "streamed jsonl"]
    for row in tables["reading"]:
        assert (int(row["batches"]), int(row["rows"])) == (QUICK_BATCHES, QUICK_BATCHES * BATCH)
        assert int(row["tokens"]) == QUICK_BATCHES * BATCH * SEQ_LEN
        assert float(row["rows_per_s"]) > 0 and 0 <= float(row["first_batch_s"]) <= float(row["seconds"])
        speedup = float(row["tokens_per_s"]) / DEMO_SOFT_LABEL_TOKENS_PER_S
        assert float(row["vs_demo_training"]) == pytest.approx(speedup, abs=0.06)
    # the training speed reading is compared with is the one docs/experiments.md reports for the demo
    docs = (ROOT / "docs" / "experiments.md").read_text()
    assert re.search(rf"student: soft-label .* {DEMO_SOFT_LABEL_TOKENS_PER_S:,} ", docs)

    first, second = tables["startup"]
    assert (first["tokenized"], second["tokenized"]) == ("yes", "no")  # the second run read the prepared corpus
    for row in (first, second):
        assert 0 < float(row["first_step_s"]) < float(row["wall_s"])
