"""The data's tokenizer against the teacher's, special-token ids from the tokenizer, missing local paths."""

import gzip

import pytest
import torch
from helpers import permuted_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from lit_distill.data import TextDataModule
from lit_distill.data.corpus import BUNDLED_CORPUS, split_works
from lit_distill.data.tokenizers import check_tokenizer, load_tokenizer, saved_tokenizer_dir, train_bpe
from lit_distill.models import CausalLM, build, missing_local_path

TINY = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE trained on two of the bundled works."""
    works = split_works(gzip_text())[:2]
    return train_bpe(works, 400, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    """A tiny teacher saved with its tokenizer, as configs/teacher.yaml exports one."""
    directory = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    CausalLM(config={**TINY, "vocab_size": len(tokenizer)}).build().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_the_teachers_own_tokenizer_passes(teacher_dir, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    check_tokenizer(teacher, tokenizer)
    check_tokenizer(teacher, PreTrainedTokenizerFast.from_pretrained(teacher_dir))


def test_a_tokenizer_of_the_same_size_with_other_ids_is_an_error_naming_both(teacher_dir, tokenizer, tmp_path):
    other = PreTrainedTokenizerFast.from_pretrained(permuted_tokenizer(teacher_dir, tmp_path / "other"))
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with pytest.raises(ValueError, match="is not the teacher's") as info:
        check_tokenizer(teacher, other)
    message = str(info.value)
    assert str(tmp_path / "other") in message and str(teacher_dir) in message
    assert f"only {len(tokenizer) - 2} of the teacher's {len(tokenizer)} token ids" in message


def test_a_teacher_without_a_saved_tokenizer_passes(tokenizer, tmp_path):
    random_teacher = CausalLM(config={**TINY, "vocab_size": len(tokenizer)}).build()
    check_tokenizer(random_teacher, tokenizer)  # nothing to compare with
    CausalLM(config={**TINY, "vocab_size": len(tokenizer)}).build().save_pretrained(tmp_path)
    check_tokenizer(AutoModelForCausalLM.from_pretrained(tmp_path), tokenizer)  # weights only


def test_tokens_added_after_the_teachers_last_id_pass(teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    data_tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    data_tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    check_tokenizer(teacher, data_tokenizer)


def test_saved_tokenizer_dir(teacher_dir, tmp_path):
    assert saved_tokenizer_dir(str(teacher_dir)) == teacher_dir
    assert saved_tokenizer_dir(str(tmp_path)) is None  # a directory without a tokenizer
    assert saved_tokenizer_dir("org/name") is None and saved_tokenizer_dir(None) is None


def test_data_module_special_tokens_are_the_tokenizers(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(gzip_text()[:60_000])
    data = TextDataModule(files=[str(corpus)], vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "cache"))
    # The trained BPE: <|endoftext|> (id 0) begins and ends documents, <|pad|> (id 1) pads.
    assert data.special_tokens == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    assert data.tokenizer.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|pad|>"]


def test_data_module_special_tokens_leave_out_what_the_tokenizer_lacks(teacher_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(gzip_text()[:20_000])
    data = TextDataModule(files=[str(corpus)], tokenizer=str(teacher_dir), seq_len=16)
    data.tokenizer.pad_token = None
    assert data.special_tokens == {"bos_token_id": 0, "eos_token_id": 0}


def test_build_sets_the_special_ids_without_changing_the_spec():
    spec = CausalLM(config=TINY)
    model = build(spec, 300, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1})
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 0, 1)
    assert model.generation_config.eos_token_id == 0  # generate() stops at the tokenizer's end of text
    assert spec.config == TINY


def gzip_text() -> str:
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------ missing local paths
def test_a_missing_local_model_directory_says_so_not_that_the_hub_failed(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError, match=r"could not load a causal LM from .*there is no directory") as info:
        CausalLM(name_or_path=str(missing)).build()
    assert "Hub or its local cache" not in str(info.value)


def test_the_configs_teacher_directory_says_which_config_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no artifacts/ here
    message = missing_local_path("artifacts/teacher")
    assert "lit-distill fit --config configs/teacher.yaml" in message and "run that first" in message
    with pytest.raises(FileNotFoundError, match=r"configs/teacher\.yaml"):
        CausalLM(name_or_path="artifacts/teacher").build()
    with pytest.raises(FileNotFoundError, match=r"could not find the tokenizer 'artifacts/teacher'.*teacher\.yaml"):
        load_tokenizer("artifacts/teacher")


@pytest.mark.parametrize("name", ["./model", "../model", "~/no/such/model", "a/b/c"])
def test_names_that_mean_a_local_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "there is no directory" in missing_local_path(name)


def test_hub_names_and_existing_directories_are_not_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert missing_local_path("gpt2") is None and missing_local_path("meta-llama/Llama-3.1-8B") is None
    assert missing_local_path(str(tmp_path)) is None
    (tmp_path / "models").mkdir()
    assert "there is no directory" in missing_local_path("models/teacher")  # its first part is a local directory
