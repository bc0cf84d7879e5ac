"""The tiktoken fast path gives exactly the tokens of HF tokenizers, or is refused with a reason."""
import functools
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from shardgen import fastbpe
from shardgen.build import run_build
from shardgen.tokenizer import choose_engine, document_encoder, make_encoder
from tests.shardgen_testlib import (UNICODE_DOCS, build_options, make_docs, tiny_tokenizer, tree_bytes,
                                    write_jsonl)

__all__ = ["tiny_tokenizer"]
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def train_split_bpe(out_dir, pattern: str, normalizer=None, added=()) -> str:
    """A byte-level BPE like Qwen's or Llama 3's: one regex split, then bytes without a regex."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_docs(200, seed=1) + UNICODE_DOCS * 3 + ["end\nof line\n"] * 50, trainer)
    # non-special added tokens (Qwen's <think>, ...): tokenizers still matches them in the text
    tok.add_tokens([AddedToken(a, normalized=False, special=False) for a in added])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory) -> str:
    return train_split_bpe(str(tmp_path_factory.mktemp("qwen")), QWEN_PATTERN, normalizers.NFC(),
                           added=["<think>", "</think>", "<tool_call>"])


def read_json(tok_dir: str) -> str:
    with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
        return f.read()


FRAGMENTS = list(fastbpe.HARD_STRINGS) + UNICODE_DOCS + ["<think>", "<tool_call>x", " the king", "thou\n"]
TEXTS = st.lists(st.one_of(st.sampled_from(FRAGMENTS),
                           st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
                           st.text(" \t\n\r\u00a0\u3000'sdt0123456789abc", max_size=12)),
                 max_size=8).map("".join)


@functools.lru_cache(maxsize=4)
def engines(tok_dir: str):
    return make_encoder(read_json(tok_dir)), fastbpe.convert(read_json(tok_dir))


def same_tokens(tok_dir: str, text: str) -> None:
    hf, fast = engines(tok_dir)
    assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_both_engines_give_the_same_tokens_gpt2_style(tiny_tokenizer, text):
    same_tokens(tiny_tokenizer, text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_both_engines_give_the_same_tokens_qwen_style(qwen_style, text):
    same_tokens(qwen_style, text)


def test_auto_picks_tiktoken_for_byte_level_bpe(tiny_tokenizer, qwen_style):
    for tok in (tiny_tokenizer, qwen_style):
        engine, why = choose_engine(read_json(tok), "auto", UNICODE_DOCS)
        assert engine == "tiktoken" and "the first 7 documents" in why
        texts = UNICODE_DOCS + ["a <think> b <tool_call></think>"]
        assert document_encoder(read_json(tok), "tiktoken")(texts) == document_encoder(read_json(tok), "hf")(texts)
    assert choose_engine(read_json(tiny_tokenizer), "hf", [])[0] == "hf"
    # a character this Python's unicodedata does not know: the normalizing tokenizer's text goes to tokenizers
    unknown = "caf\u0378e\u0301 \U000e0080"
    qwen = fastbpe.convert(read_json(qwen_style))
    assert qwen._unknown_characters(unknown) and not qwen._unknown_characters("café 中文")
    assert qwen.encode(unknown) == make_encoder(read_json(qwen_style)).encode(unknown, add_special_tokens=False).ids


def test_tokenizers_that_do_not_convert_are_refused_with_the_reason(tmp_path, tiny_tokenizer):
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert choose_engine(wordpiece.to_str(), "auto", []) == (
        "hf", "tokenizer engine: tokenizers (no exact tiktoken conversion: model WordPiece, not BPE)")
    doc = json.loads(read_json(tiny_tokenizer))
    doc["pre_tokenizer"]["add_prefix_space"] = True
    engine, why = choose_engine(json.dumps(doc), "auto", [])
    assert engine == "hf" and "adds a prefix space" in why


def test_a_difference_found_at_start_keeps_tokenizers(tmp_path):
    # tokenizers' regex engine (Oniguruma) matches `$` before a newline, tiktoken's only at the end of the text
    tok = train_split_bpe(str(tmp_path / "tok"), r"[a-z]+$|[\s\S]")
    json_text = read_json(tok)
    fast = fastbpe.convert(json_text)
    assert fast.encode("end\n") != make_encoder(json_text).encode("end\n", add_special_tokens=False).ids
    engine, why = choose_engine(json_text, "auto", [])
    assert engine == "hf" and why.startswith("tokenizer engine: tokenizers (tiktoken tokenizes '") \
        and why.endswith("' differently)")


def test_a_regex_that_leaves_characters_out_is_refused(tmp_path):
    # tokenizers keeps the text between regex matches; tiktoken drops it
    json_text = read_json(train_split_bpe(str(tmp_path / "tok"), r"\p{L}+|\s+"))
    assert fastbpe.drops_text(fastbpe.convert(json_text))
    assert choose_engine(json_text, "auto", []) == (
        "hf", "tokenizer engine: tokenizers (tiktoken would drop the characters its regex does not match)")


def test_vocabulary_whose_token_does_not_merge_back_is_refused():
    # "abc" is made by ab + c, but b + c merges first: tokenizers never gives "abc", tiktoken would for "abc"
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for t in ("bc", "ab", "abc"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert tok.encode("abc").tokens == ["a", "bc"] and fastbpe.convert(tok.to_str()).encode("abc") == [vocab["abc"]]
    assert fastbpe.unreachable_token(tok.to_str()) == "abc"
    assert choose_engine(tok.to_str(), "auto", []) == (
        "hf", "tokenizer engine: tokenizers (its BPE does not merge token 'abc' back into itself)")


def test_shards_are_the_same_bytes_with_either_engine(tmp_path, tiny_tokenizer, qwen_style):
    docs = make_docs(40) + UNICODE_DOCS + ["<think>x</think>"]
    write_jsonl(str(tmp_path / "in.jsonl"), docs)
    for tok in (tiny_tokenizer, qwen_style):
        trees = []
        for engine in ("hf", "auto"):
            o = build_options([str(tmp_path / "in.jsonl")], tmp_path / f"{os.path.basename(tok)}-{engine}", tok,
                              tokenizer_engine=engine)
            run_build(o)
            assert (engine == "auto") == ("tokenizer engine: tiktoken" in o.log.getvalue())
            trees.append(tree_bytes(o.output))
        assert trees[0] == trees[1]


CUT_TEXTS = st.lists(st.one_of(st.sampled_from(["the", "King", "x", "a b", " ", "  ", "\n", "\n\n", "'s", "1 2",
                                                "é", "e\u0301", "中文", "👍🏽", ".", "<think>", "\r\n", "\t"]),
                               st.text(st.characters(exclude_categories=("Cs",)), max_size=4)),
                     max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=CUT_TEXTS, limit=st.integers(2, 12))
def test_a_document_cut_in_parts_gives_the_tokens_of_the_whole(tiny_tokenizer, qwen_style, text, limit):
    for tok in (tiny_tokenizer, qwen_style):
        hf, _ = engines(tok)
        ends = fastbpe.cut(text, limit)
        starts = [0] + ends[:-1]
        assert "".join(text[a:b] for a, b in zip(starts, ends)) == text
        parts = [t for a, b in zip(starts, ends) for t in hf.encode(text[a:b], add_special_tokens=False).ids]
        assert parts == hf.encode(text, add_special_tokens=False).ids, (text, ends)


def test_only_known_patterns_are_cut(tmp_path, tiny_tokenizer, qwen_style):
    assert fastbpe.cuttable(read_json(tiny_tokenizer)) is None and fastbpe.cuttable(read_json(qwen_style)) is None
    other = train_split_bpe(str(tmp_path / "tok"), r"[a-z]+$|.")
    assert fastbpe.cuttable(read_json(other)) == "a pre-tokenizer regex other than GPT-2's, Llama 3's or Qwen's"
    assert fastbpe.cut("ab cd ef", 4) == [2, 5, 8] and fastbpe.cut("abcdefgh ij", 4) == [8, 11]


def test_a_long_document_is_tokenized_in_parts_with_the_same_tokens(tmp_path, tiny_tokenizer):
    from shardgen.tasks import BATCH_CHARS
    from tests.shardgen_testlib import check_round_trip, expected_stream
    long_doc = " ".join(make_docs(40000, seed=3))[:2 * BATCH_CHARS + 12345]  # three parts
    docs = ["before", long_doc, "after"]
    write_jsonl(str(tmp_path / "in.jsonl"), docs)
    for engine in ("hf", "auto"):
        out = tmp_path / engine
        run_build(build_options([str(tmp_path / "in.jsonl")], out, tiny_tokenizer, task_bytes=64 << 20,
                                seq_len=512, tokenizer_engine=engine))
        check_round_trip(str(out), expected_stream(tiny_tokenizer, docs))
