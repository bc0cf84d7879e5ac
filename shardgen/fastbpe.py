"""An exact fast path for byte-level BPE tokenizers: the tokens of HF `tokenizers`, computed by tiktoken.

A byte-level BPE (GPT-2, GPT-NeoX, Llama 3, Qwen, the ones `train-tokenizer` makes) is a regex
pre-tokenization, a byte -> printable-character map and ranked merges. tiktoken runs the same
algorithm several times faster, given: the merge results ranked in merge order (their ids, when ids
grow with the merge order, as trainers assign them), the pre-tokenizer's regex, and the normalizer
(NFC etc., applied here with `unicodedata`). `convert` says why a tokenizer.json does not convert
(SentencePiece-style ones, several chained splits, truncation, ...).

Where the two could still differ, the build (tokenizer.choose_engine) keeps HF `tokenizers`:
- a merge result that tokenizers' BPE does not merge back into itself (`unreachable_token`): tiktoken
  takes a piece that is a whole token as that token;
- a regex that leaves characters out (`drops_text`): tiktoken drops them, tokenizers keeps them;
- any difference on HARD_STRINGS and the input's first documents (`first_difference`): the regex
  engines' Unicode tables and features (Oniguruma's `$` matches before a newline), ...
With a normalizer, a text holding a character newer than `unicodedata`'s tables goes to tokenizers.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

import numpy as np

# The pattern of GPT-2's ByteLevel pre-tokenizer (use_regex=true), as tokenizers compiles it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
# Where a long document may be cut into parts tokenized apart with the same tokens as whole: before a
# space between two ASCII letters ("x| y"). In these patterns no alternative matches a letter followed by
# a space, so every scan of the text has a pre-token boundary there wherever it started, and the left
# part's end (a letter) changes no lookahead (`\s+(?!\S)` would: a cut after "\n\n" does change tokens);
# the normalizers leave ASCII letters and spaces alone and compose nothing across them.
CUTTABLE_PATTERNS = (GPT2_PATTERN, LLAMA3_PATTERN, QWEN_PATTERN)
LAST_CUT = re.compile(r"(?s:.*)(?<=[A-Za-z])(?= [A-Za-z])")  # greedy: the last one
NEXT_CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z])")

# Strings where a conversion would go wrong first: whitespace runs and kinds, digits, CJK, emoji (ZWJ
# sequences, skin tones, flags), combining marks, contractions, special-token look-alikes, controls,
# unassigned and private-use code points, text that normalizes differently.
HARD_STRINGS = (
    "", " ", "  ", "\t", "\n", "\n\n\n", " \n ", "\r\n", "\r\n\r\n  x", "a  b   c    d", "x \t\n y", "end   ",
    "\u00a0\u2000\u2001\u2002\u2003\u2009\u200a\u202f\u205f\u3000 x", "\u200b\u200c\u200d\u2060\ufeff",
    "\u0085\u2028\u2029\x0b\x0c\x1c\x1d\x1e\x1f", "\u180e \u180e", "a\x00b\x07c\x7f",
    "0", "12", "123", "1234567890", "3.14159 -2e10 1,000,000 0x1F", "٣٤٥ ൧൨ ١٢٣ ⅷ ½ ² ①",
    "中文字符测试，标点。", "日本語のテキスト、カタカナ", "한국어 텍스트", "𠀀𠀁 𪜀 𫝀",
    "😀", "👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🏳️‍🌈", "✈︎ ©️ ™",
    "e\u0301 n\u0303 a\u030a\u0323 \u1e9b\u0323", "é café naïve Ångström", "\u0915\u094d\u0937 \u0e01\u0e33",
    "ﬁ ﬂ Ｆｕｌｌｗｉｄｔｈ ㎏ ℌ Ⅻ", "\u212b \u2126 \u00c5", "ǅ ǲ ẞ ß İ ı",
    "I'm you're he'll they've she'd it's can't", "I'M YOU'RE HE'LL 'S 'T", "'s's ''s '",
    "don’t won’t", "<|endoftext|>", "<|endoftext|> <|endoftext|>x", "</s><s><unk><pad>",
    "<|im_start|>user<|im_end|>", "<think></think><tool_call>", "[INST] <<SYS>>", "<eos><bos>",
    "<|end_of_text|><|begin_of_text|>", "<|endoftext", "endoftext|>", "\ue000\uf8ff \U000f0000",
    "\U0001fbf0\U00031350 \U000e0001\U000e0041", "\u0378\u0380 \U0001abcd", "a" * 300, "ab" * 150,
    "def f(x):\n    return x**2  # comment\n\n\n", "<a href=\"x\">y</a>&amp;", "https://example.com/a?b=c&d=e",
    "----====****####", "......!!!???", "…—–‘’“”", "$$ \\frac{a}{b} $$", "ΑΒΓ αβγ Ωμέγα", "Привет мир",
    "עברית ערבית العربية", "\u202e\u202dRTL\u200f\u200e", "x\u0300\u0301\u0302\u0303\u0304\u0305y",
)


@functools.lru_cache(maxsize=1)
def _parse(json_text: str) -> dict:
    return json.loads(json_text)  # once per worker, not once per use (0.3 s for a 150k-token tokenizer)


def _parsed(json_text: str | dict) -> dict:
    return _parse(json_text) if isinstance(json_text, str) else json_text


class Unsupported(Exception):
    """The tokenizer does not convert to the fast path; the message says why."""


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest are
    mapped to code points from 256 on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _pattern(pre: dict | None) -> str:
    """The one regex that splits text as the pre-tokenizer does."""
    if pre is None:
        raise Unsupported("no pre-tokenizer")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise Unsupported("ByteLevel pre-tokenizer adds a prefix space")
        if not pre.get("use_regex", True):
            raise Unsupported("ByteLevel pre-tokenizer without a regex")
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
            split, level = steps
            if level.get("add_prefix_space") or level.get("use_regex", True):
                raise Unsupported("ByteLevel step after the split adds a prefix space or splits again")
            if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in split.get("pattern", {}):
                raise Unsupported("a split that is not an isolated regex split")
            return split["pattern"]["Regex"]
    raise Unsupported(f"pre-tokenizer {json.dumps(pre)[:120]} is not one regex split plus byte-level")


def _normalizer(norm: dict | None) -> Callable[[str], str] | None:
    if norm is None or norm.get("type") == "Sequence" and not norm.get("normalizers"):
        return None
    if norm.get("type") in NORMALIZERS:
        form = norm["type"]
        return lambda text: unicodedata.normalize(form, text)
    raise Unsupported(f"normalizer {json.dumps(norm)[:120]}")


@functools.lru_cache(maxsize=1)
def _unknown_to_python() -> np.ndarray:
    """Code point -> unassigned in this Python's `unicodedata` (Unicode 14.0 in Python 3.11): newer
    characters that tokenizers' own, newer tables may compose or decompose where `unicodedata` cannot."""
    unknown = np.ones(0x110000, bool)  # planes 4-13: unassigned; 15-16: private use but their last two
    for lo, hi in ((0, 0x40000), (0xE0000, 0xF0000)):
        unknown[lo:hi] = [unicodedata.category(chr(c)) == "Cn" for c in range(lo, hi)]
    unknown[0xF0000:0xFFFFE] = unknown[0x100000:0x10FFFE] = False
    return unknown


@dataclass
class FastBPE:
    """tiktoken with the tokenizer's ranks, plus what tokenizers does around its model: the normalizer,
    and the non-special added tokens that it matches in the text (special ones are text for us).
    With a normalizer, a text holding a character `unicodedata` does not know goes to `fallback`."""
    encoding: object  # tiktoken.Encoding
    to_id: np.ndarray | None  # rank -> id, when ids do not grow with the merge order
    normalize: Callable[[str], str] | None
    added: re.Pattern | None
    added_ids: dict[str, int]
    fallback: Callable[[str], list[int]] | None = None  # tokenizers, for the texts above

    def _segment(self, text: str) -> list[int]:
        if self.normalize is not None:
            text = self.normalize(text)
        ids = self.encoding.encode_ordinary(text)
        return ids if self.to_id is None else self.to_id[np.asarray(ids, np.int64)].tolist()

    def _unknown_characters(self, text: str) -> bool:
        if self.normalize is None or text.isascii():
            return False
        return bool(_unknown_to_python()[np.frombuffer(text.encode("utf-32-le"), np.uint32)].any())

    def encode(self, text: str) -> list[int]:
        if self.fallback is not None and self._unknown_characters(text):
            return self.fallback(text)
        if self.added is None or not self.added.search(text):
            return self._segment(text)
        ids, pos = [], 0
        for m in self.added.finditer(text):
            ids += self._segment(text[pos:m.start()]) if m.start() > pos else []
            ids.append(self.added_ids[m.group()])
            pos = m.end()
        return ids + (self._segment(text[pos:]) if pos < len(text) else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def convert(json_text: str | dict) -> FastBPE:
    """The fast path for a tokenizer.json (its text or parsed), or Unsupported saying why there is none."""
    import tiktoken
    doc = _parsed(json_text)
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise Unsupported(f"model {model.get('type')}, not BPE")
    for key, ok in (("dropout", (None, 0, 0.0)), ("byte_fallback", (None, False)),
                    ("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, ""))):
        if model.get(key) not in ok:
            raise Unsupported(f"BPE {key}={model.get(key)!r}")
    if doc.get("truncation") or doc.get("padding"):
        raise Unsupported("the tokenizer.json sets truncation or padding")
    pattern = _pattern(doc.get("pre_tokenizer"))
    normalize = _normalizer(doc.get("normalizer"))
    vocab: dict[str, int] = model["vocab"]
    to_byte = _byte_decoder()
    to_latin1 = str.maketrans({c: chr(b) for c, b in to_byte.items()})
    not_byte_level = re.compile(f"[^{re.escape(''.join(to_byte))}]")

    ranks: dict[bytes, int] = {}
    for char, b in to_byte.items():
        if char not in vocab:
            raise Unsupported(f"byte {b:#04x} has no token")
        ranks[bytes([b])] = vocab[char]
    merges = model.get("merges") or []
    words = [m.replace(" ", "", 1) if isinstance(m, str) else m[0] + m[1] for m in merges]
    order = [vocab.get(w) for w in words]
    if None in order:
        a = merges[order.index(None)]
        raise Unsupported(f"merge {a!r} makes no vocabulary token")
    joined = "".join(words)  # one pass over all merge results: a per-merge loop costs ~1 s for 150k merges
    if bad := not_byte_level.search(joined):
        raise Unsupported(f"vocabulary token with {bad.group()!r} is not byte-level")
    raw = joined.translate(to_latin1).encode("latin-1")  # one byte per byte-level character
    ends = np.cumsum([len(w) for w in words]).tolist()
    keys = [raw[a:b] for a, b in zip([0] + ends[:-1], ends)]
    ranks.update(zip(keys, order))
    if len(ranks) != 256 + len(merges):
        raise Unsupported("two merges make the same token")
    if model.get("ignore_merges") and len(ranks) != len(vocab):
        raise Unsupported("ignore_merges with vocabulary tokens that no merge makes")
    to_id = None
    if any(x >= y for x, y in zip(order, order[1:])):  # ids do not follow the merge order: rank by order
        to_id = np.array([ranks[k] for k in ranks], np.int64)
        ranks = {k: r for r, k in enumerate(ranks)}  # single bytes first: their ranks never matter (never merged)
    added = {a["content"]: a["id"] for a in doc.get("added_tokens") or [] if not a.get("special")}
    for a in doc.get("added_tokens") or []:
        if not a.get("special") and (a.get("normalized") or a.get("lstrip") or a.get("rstrip") or a.get("single_word")):
            raise Unsupported(f"added token {a['content']!r} with normalized/lstrip/rstrip/single_word")
    # tokenizers finds added tokens leftmost-longest; a regex alternation does, longest first
    added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
    try:
        enc = tiktoken.Encoding("shardgen", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except Exception as e:  # noqa: BLE001 - tiktoken rejects patterns its regex engine cannot compile
        raise Unsupported(f"tiktoken does not take the pre-tokenizer regex ({e})") from None
    return FastBPE(enc, to_id, normalize, added_re, added, _hf_fallback(doc) if normalize else None)


def _hf_fallback(doc: dict) -> Callable[[str], list[int]]:
    """tokenizers for one text, loaded the first time it is needed."""
    tok = []

    def encode(text: str) -> list[int]:
        if not tok:
            from shardgen.tokenizer import make_encoder
            tok.append(make_encoder(json.dumps(doc)))
        return tok[0].encode(text, add_special_tokens=False).ids
    return encode


def cuttable(json_text: str | dict) -> str | None:
    """None when long documents of this tokenizer may be cut at NEXT_CUT points (with either engine),
    else why not."""
    doc = _parsed(json_text)
    model = doc.get("model") or {}
    try:
        if model.get("type") != "BPE" or model.get("dropout") or doc.get("truncation"):
            raise Unsupported("not a BPE without dropout and truncation")
        if _pattern(doc.get("pre_tokenizer")) not in CUTTABLE_PATTERNS:
            raise Unsupported("a pre-tokenizer regex other than GPT-2's, Llama 3's or Qwen's")
        _normalizer(doc.get("normalizer"))
    except Unsupported as e:
        return str(e)
    if any(" " in a["content"] for a in doc.get("added_tokens") or [] if not a.get("special")):
        return "an added token holds a space"
    return None


def cut(text: str, limit: int) -> list[int]:
    """Where `text` ends its parts of at most `limit` characters: at the last cut point before each limit
    (past it, at the next one, when a stretch of `limit` characters has none; the rest stays whole)."""
    ends, start = [], 0
    while len(text) - start > limit:
        m = LAST_CUT.match(text, start + limit // 2, start + limit + 2)  # + 2: the lookahead sees " y"
        start = m.end() if m else (n.start() if (n := NEXT_CUT.search(text, start + limit)) else len(text))
        ends.append(start)
    return ends + [len(text)] if start < len(text) else ends


def unreachable_token(json_text: str | dict) -> str | None:
    """A merge result that tokenizers' BPE does not give for its own text, or None. tiktoken returns a
    piece that is a whole vocabulary token as that token without merging; tokenizers (ignore_merges
    off) merges it, so the two agree only if every token merges back into itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    doc = _parsed(json_text)
    model = doc["model"]
    if model.get("ignore_merges"):
        return None  # tokenizers also takes a whole-word token as it is
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    bpe = Tokenizer(models.BPE(model["vocab"], merges))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # a space is no byte-level character: one word each
    words = [a + b for a, b in merges]
    for i in range(0, len(words), 1 << 14):  # one call per many words: a call per word costs more than its BPE
        chunk = words[i:i + (1 << 14)]
        if bpe.encode(" ".join(chunk), add_special_tokens=False).ids != [model["vocab"][w] for w in chunk]:
            return next(w for w in chunk if bpe.encode(w, add_special_tokens=False).ids != [model["vocab"][w]])
    return None


def drops_text(fast: FastBPE) -> bool:
    """Whether tiktoken leaves characters out: it tokenizes only what the regex matches, where tokenizers
    keeps the text between matches as pieces too. Checked on every code point up to U+323AF (all
    assigned ones but plane 14's tags and the private-use planes) and those of plane 14."""
    text = "".join(map(chr, [*range(0xD800), *range(0xE000, 0x323B0), *range(0xE0000, 0xE0200)]))
    return fast.encoding.decode_bytes(fast.encoding.encode_ordinary(text)) != text.encode()


def first_difference(hf, fast: FastBPE, texts) -> str | None:
    """The first text (quoted, cut short) that the two engines tokenize differently, or None.
    `hf` is a tokenizers.Tokenizer set up as shardgen uses it."""
    texts = list(texts)
    for i in range(0, len(texts), 256):
        chunk = texts[i:i + 256]
        want = [e.ids for e in hf.encode_batch_fast(chunk, add_special_tokens=False)]
        for text, ids in zip(chunk, want):
            if fast.encode(text) != ids:
                return repr(text[:60]) + ("..." if len(text) > 60 else "")
    return None
