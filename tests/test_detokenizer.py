"""Tests of engine/detokenizer.py IncrementalDetokenizer on real tokenizers.

Two kinds: the built-in SmolLM2 tokenizer (byte-level BPE, GPT-2 style) and a tiny SentencePiece-style
tokenizer trained here (BPE with byte fallback, Metaspace pre-tokenizer, Llama-2 style decoder that
strips the first word-initial space) - built offline, no download.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engine.detokenizer import IncrementalDetokenizer  # noqa: E402

FFFD = "\ufffd"
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ALPHABET = "abcdehlorwxyz  ,.!\n\t'éïçñ世界中文🎉👍ß"
TEXTS = st.text(alphabet=ALPHABET, max_size=40)
MULTIBYTE = ["héllo 世界 🎉🎉 naïve", "🎉", "世界", "a🎉b", "  naïve  café ", "👍👍👍 ok", "中文 and ß", "\n🎉\n"]

SP_SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "hello world, hello there", "naïve café résumé déjà vu",
    "a stop sequence may span token boundaries", "sentencepiece puts spaces at word starts",
    "why worry when the world wears a yellow hat",
]


def _builtin_tokenizer():
    from transformers import AutoTokenizer

    from engine.model_loader import builtin_model_path
    folder, gguf = builtin_model_path()
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)


def _sentencepiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.train_from_iterator(SP_SENTENCES, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte-fallback pieces, as in Llama's vocabulary
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)) == "hello world"
    return tok


@pytest.fixture(scope="module")
def toks():
    return {"bytelevel": _builtin_tokenizer(), "sentencepiece": _sentencepiece_tokenizer()}


KINDS = ["bytelevel", "sentencepiece"]


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def dec(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def is_byte_piece(tok, i: int) -> bool:
    t = tok.convert_ids_to_tokens(i)
    return len(t) == 6 and t.startswith("<0x") and t.endswith(">")


def chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, pos, k = [], 0, 0
    while pos < len(ids):
        n = sizes[k % len(sizes)] if sizes else 1
        out.append(ids[pos:pos + n])
        pos += n
        k += 1
    return out


def run(tok, pieces, stop=()) -> tuple[list[str], str, IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, tuple(stop))
    pushed = [d.push(list(p)) for p in pieces]
    return pushed, d.flush(), d


def expected_cut(text: str, stops) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


# ---- strategies -------------------------------------------------------------------------------
@st.composite
def any_ids(draw, tok, sp: bool):
    """Token ids: arbitrary for byte-level; for SentencePiece, arbitrary pieces but runs of byte-fallback
    pieces come only from encoding whole strings (valid UTF-8; see the xfail test for invalid runs)."""
    specials = list(tok.all_special_ids)
    n = len(tok)
    if not sp:
        elem = st.one_of(st.integers(0, n - 1), st.sampled_from(specials),
                         st.sampled_from(enc(tok, " ".join(MULTIBYTE))))
        return draw(st.lists(elem, max_size=30))
    normal = [i for i in range(n) if i not in specials and not is_byte_piece(tok, i)]
    seg = st.one_of(st.sampled_from(normal).map(lambda i: [i]), st.sampled_from(specials).map(lambda i: [i]),
                    TEXTS.map(lambda s: enc(tok, s)))
    return [i for part in draw(st.lists(seg, max_size=12)) for i in part]


# ---- round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_concatenation_equals_decode_one_at_a_time(toks, kind, data):
    tok = toks[kind]
    ids = data.draw(any_ids(tok, kind == "sentencepiece"))
    final = dec(tok, ids)
    pushed, tail, _ = run(tok, [[i] for i in ids])
    assert "".join(pushed) + tail == final
    so_far = ""
    for chunk in pushed:
        so_far += chunk
        assert final.startswith(so_far)  # every chunk is final text, at its place


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data(), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8))
def test_concatenation_equals_decode_random_chunks(toks, kind, data, sizes):
    tok = toks[kind]
    ids = data.draw(any_ids(tok, kind == "sentencepiece"))
    pushed, tail, _ = run(tok, chunks(ids, sizes))
    assert "".join(pushed) + tail == dec(tok, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_special_only(toks, kind):
    tok = toks[kind]
    assert run(tok, [])[1] == ""
    pushed, tail, _ = run(tok, [[i] for i in tok.all_special_ids])
    assert pushed == [""] * len(tok.all_special_ids) and tail == ""
    pushed, tail, _ = run(tok, [[]])
    assert pushed == [""] and tail == ""


# ---- multibyte characters ----------------------------------------------------------------------
def _check_no_partial_chars(tok, text: str, pieces: list[list[int]]) -> None:
    ids = [i for p in pieces for i in p]
    final = dec(tok, ids)
    assert FFFD not in final
    d = IncrementalDetokenizer(tok)
    so_far = ""
    seen: list[int] = []
    for p in pieces:
        chunk = d.push(p)
        seen += p
        assert FFFD not in chunk, (text, so_far, chunk)
        so_far += chunk
        assert final.startswith(so_far)
        # liveness: everything that decodes cleanly so far has been released
        now = dec(tok, seen)
        if not now.endswith(FFFD):
            assert so_far == now
        # (a decode that ends mid-character may differ before its end: SentencePiece byte fallback
        # turns the whole unfinished run of byte pieces into U+FFFD)
    assert d.flush() == final[len(so_far):]
    assert FFFD not in so_far


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_never_half_a_character(toks, kind, text):
    tok = toks[kind]
    ids = enc(tok, text)
    if text == MULTIBYTE[0]:
        # the point of the test: some ids end in the middle of a character
        assert any(dec(tok, ids[:k]).endswith(FFFD) for k in range(1, len(ids)))
    _check_no_partial_chars(tok, text, [[i] for i in ids])


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(text=TEXTS, sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_multibyte_random_text(toks, kind, text, sizes):
    tok = toks[kind]
    ids = enc(tok, text)
    _check_no_partial_chars(tok, text, [[i] for i in ids])
    _check_no_partial_chars(tok, text, chunks(ids, sizes))


def test_sentencepiece_word_initial_spaces(toks):
    tok = toks["sentencepiece"]
    for text in ["hello world", "the quick brown fox", "why worry when", "a  b   c", "naïve café 🎉 résumé"]:
        ids = enc(tok, text)
        assert any(tok.convert_ids_to_tokens(i).startswith("\u2581") for i in ids[1:])
        pushed, tail, _ = run(tok, [[i] for i in ids])
        assert "".join(pushed) + tail == dec(tok, ids) == text
    # a special token in front must not make the first word lose or gain its space
    ids = [tok.bos_token_id] + enc(tok, "hello world") + [tok.eos_token_id] + enc(tok, "hello")
    pushed, tail, _ = run(tok, [[i] for i in ids])
    assert "".join(pushed) + tail == dec(tok, ids) == "hello world hello"


@pytest.mark.xfail(strict=True, reason=(
    "SentencePiece byte fallback: HF's ByteFallback decoder turns a whole run of <0x..> pieces into one "
    "U+FFFD per piece when the run is not valid UTF-8, so decode() is not prefix-monotone; text released "
    "from the valid start of the run ('8', or '世') no longer matches decode(all_ids) after an invalid byte"))
@pytest.mark.parametrize("ids_of", [
    lambda tok: tok.convert_tokens_to_ids(["<0x38>", "<0xA7>"]),                      # '8' + a stray byte
    lambda tok: tok.convert_tokens_to_ids(["<0xE4>", "<0xB8>", "<0x96>", "<0xE7>"]),  # '世' + cut mid-character
])
def test_sentencepiece_invalid_byte_run_matches_decode(toks, ids_of):
    tok = toks["sentencepiece"]
    ids = ids_of(tok)
    assert all(is_byte_piece(tok, i) for i in ids)
    pushed, tail, _ = run(tok, [[i] for i in ids])
    assert "".join(pushed) + tail == dec(tok, ids)


# ---- stop sequences ----------------------------------------------------------------------------
def _stop_case(tok, ids, stops, pieces):
    text = dec(tok, ids)
    want, will_stop = expected_cut(text, stops)
    d = IncrementalDetokenizer(tok, tuple(stops))
    out, seen = "", []
    for p in pieces:
        stopped_before = d.stopped
        chunk = d.push(p)
        seen += p
        if stopped_before:
            assert chunk == ""
        out += chunk
        assert want.startswith(out)
        if not d.stopped:
            # what is held back is exactly a possible beginning of a stop sequence (or half a character)
            now = dec(tok, seen)
            if not now.endswith(FFFD):
                assert now.startswith(out)
                held = now[len(out):]
                assert held == "" or any(s.startswith(held) and len(held) < len(s) for s in stops)
    if will_stop:  # valid text: the stop is seen by push, not only at flush
        assert d.stopped
    tail = d.flush()
    assert out + tail == want
    assert d.stopped == will_stop
    if will_stop:
        assert tail == ""
        assert d.push(ids[:1]) == "" and d.flush() == ""


@st.composite
def text_and_stops(draw, tok, n_stops=1):
    text = draw(TEXTS.filter(lambda s: len(s.strip()) >= 2))
    ids = enc(tok, text)
    final = dec(tok, ids)
    stops = []
    for _ in range(n_stops):
        if final and draw(st.integers(0, 3)) > 0:  # mostly a piece of the text
            i = draw(st.integers(0, len(final) - 1))
            j = draw(st.integers(i + 1, min(len(final), i + 6)))
            stops.append(final[i:j])
        else:
            stops.append(draw(st.text(alphabet=ALPHABET, min_size=1, max_size=4)))
    return ids, stops


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data(), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_stop_sequence_cuts_before_first_occurrence(toks, kind, data, sizes):
    tok = toks[kind]
    ids, stops = data.draw(text_and_stops(tok, 1))
    _stop_case(tok, ids, stops, [[i] for i in ids])
    _stop_case(tok, ids, stops, chunks(ids, sizes))


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data(), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_several_stops_earliest_wins(toks, kind, data, sizes):
    tok = toks[kind]
    ids, stops = data.draw(text_and_stops(tok, 3))
    # When one stop lies inside another, which one is seen first depends on token boundaries (a generation
    # ends as soon as any stop is complete); the plain "earliest occurrence" rule holds otherwise.
    if any(a != b and a in b for a in stops for b in stops):
        return
    _stop_case(tok, ids, stops, [[i] for i in ids])
    _stop_case(tok, ids, stops, chunks(ids, sizes))


def _boundary_positions(tok, ids) -> list[int]:
    return [len(dec(tok, ids[:k])) for k in range(1, len(ids))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text,stop,spans", [
    ("hello world, hello there", "o w", True),
    ("the quick brown fox jumps", "ck bro", True),
    ("héllo 世界 🎉🎉 naïve", "界 🎉", True),
    ("héllo 世界 🎉🎉 naïve", "🎉 n", True),
    ("why worry when the world wears", "wor", False),  # inside the token " wor": its space is released
])
def test_stop_spanning_token_boundaries(toks, kind, text, stop, spans):
    tok = toks[kind]
    ids = enc(tok, text)
    assert dec(tok, ids) == text
    start = text.find(stop)
    assert any(start < b < start + len(stop) for b in _boundary_positions(tok, ids)) == spans
    d = IncrementalDetokenizer(tok, (stop,))
    out = "".join(d.push([i]) for i in ids)
    assert d.stopped and out == text[:start]
    assert d.flush() == ""


@pytest.mark.parametrize("kind", KINDS)
def test_several_stops_fixed(toks, kind):
    tok = toks[kind]
    ids = enc(tok, "hello world, hello there")
    for stops, want in [(("world", "lo w"), "hel"), (("there", ", h", "world"), "hello "),
                        (("zzz", "there"), "hello world, hello "), (("", "ll"), "he")]:
        d = IncrementalDetokenizer(tok, stops)
        out = "".join(d.push([i]) for i in ids) + d.flush()
        assert out == want and d.stopped


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text,stop,released", [
    ("hello wor", "world", "hello "),
    ("hello world", "d!", "hello worl"),
    ("say 世", "世界", "say "),
    ("ok 🎉", "🎉🎉", "ok "),
    ("aaa", "aaab", ""),
])
def test_partial_stop_at_end_released_by_flush(toks, kind, text, stop, released):
    tok = toks[kind]
    ids = enc(tok, text)
    assert dec(tok, ids) == text
    d = IncrementalDetokenizer(tok, (stop,))
    out = "".join(d.push([i]) for i in ids)
    assert out == released
    assert not d.stopped
    assert d.flush() == text[len(released):]
    assert not d.stopped


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(text=TEXTS, extra=st.text(alphabet=ALPHABET, min_size=1, max_size=4), cut=st.integers(1, 8))
def test_partial_stop_property(toks, kind, text, extra, cut):
    """Text that ends with a proper beginning of a stop (and contains no stop) comes out whole after flush."""
    tok = toks[kind]
    ids = enc(tok, text)
    final = dec(tok, ids)
    tail = final[-cut:] if final else ""
    stop = tail + extra
    if stop in final:
        return
    d = IncrementalDetokenizer(tok, (stop,))
    out = "".join(d.push([i]) for i in ids)
    assert final.startswith(out)
    held = final[len(out):]
    assert len(held) >= len(tail)  # the stop's beginning is held until flush
    assert out + d.flush() == final
    assert not d.stopped


@pytest.mark.parametrize("make", [_builtin_tokenizer, _sentencepiece_tokenizer], ids=["byte-level", "sentencepiece"])
def test_fast_decoder_equals_tokenizer_decode(make):
    """The engine decodes through the Rust backend directly; it must equal the wrapper's decode."""
    import random

    from engine.detokenizer import fast_decoder
    tok = make()
    decode = fast_decoder(tok)
    rng = random.Random(0)
    special = list(tok.all_special_ids)
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))] + rng.sample(special, min(1, len(special)))
        rng.shuffle(ids)
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True), ids
