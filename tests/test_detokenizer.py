"""Streaming text deltas concatenate to the final text and never leak a stop string."""

from __future__ import annotations

from tandem.engine.detokenizer import IncrementalDetokenizer


def stream_text(tokenizer, ids, stop=None, final_text=None):
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = [detok.add([t]) for t in ids[:-1]]
    deltas.append(detok.add([ids[-1]], final_text=final_text))
    return deltas


def test_deltas_concatenate_to_the_decoded_text(loaded_fp32):
    tok = loaded_fp32.tokenizer
    ids = tok.encode("Tea, café and crème brûlée — 🍵 for everyone.", add_special_tokens=False)
    deltas = stream_text(tok, ids, final_text=tok.decode(ids))
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # partial UTF-8 is held back


def test_text_before_a_stop_string_is_never_retracted(loaded_fp32):
    tok = loaded_fp32.tokenizer
    full = "one two three STOP"  # the engine finishes on the token that completes the stop
    ids = tok.encode(full, add_special_tokens=False)
    cut = full[:full.index(" STOP")]
    deltas = stream_text(tok, ids, stop=[" STOP"], final_text=cut)
    assert "".join(deltas) == cut
    assert all("STOP" not in d for d in deltas)


def test_long_streams_match_the_full_decode(loaded_fp32, hf_tokenizer):
    """Deltas over a long mixed text equal decoding everything at once (checked with the
    reference tokenizer's vocabulary so the text exercises many merges)."""
    tok = loaded_fp32.tokenizer
    text = (" ".join(["naïve café 🍵 über — 東京 tokens,"] * 40)).strip()
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    deltas = stream_text(tok, ids, final_text=full)
    streamed = "".join(deltas[:-1])  # everything before the final text arrived
    assert full.startswith(streamed) and len(streamed) >= len(full) - 2
    assert "".join(deltas) == full == hf_tokenizer.decode(ids)
