"""Stop strings and streamed text: the text is cut before the first stop string, and what a stream sends
is always a prefix of the final text (partial UTF-8 characters and possible stop-string starts held back)."""

from __future__ import annotations

from scalelab.data.tokenize import ByteTokenizer
from scalelab.serve.text import StopText, TokenOffsets

TOK = ByteTokenizer()


def ids(text: str) -> list[int]:
    return TOK.encode(text).tolist()


def test_text_is_cut_before_the_earliest_stop() -> None:
    st = StopText(TOK.decode, ["END", "\n\n", ""])
    assert st.text(ids("abc\n\nxyzEND")) == ("abc", True)
    assert st.text(ids("no stop here")) == ("no stop here", False)
    assert st.hit(ids("xxEND")) and not st.hit(ids("xxEN"))
    assert not StopText(TOK.decode).hit(ids("anything"))


def test_stream_never_sends_what_it_may_take_back() -> None:
    final = "héllo wörld ENDtail"
    st = StopText(TOK.decode, ["END"])
    tokens = ids(final)
    sent = ""
    for n in range(len(tokens) + 1):
        now = st.emittable(tokens[:n], done=False)
        assert now.startswith(sent) and "\ufffd" not in now and not now.endswith(("E", "EN"))
        sent = now
    assert st.emittable(tokens, done=True) == "héllo wörld " == st.text(tokens)[0]


def test_token_offsets_cover_a_prefix_and_all_tokens_once_final() -> None:
    ids_ = ids("a€b!")  # a, the three bytes of €, b, !
    offs = TokenOffsets(TOK.decode)
    assert offs.covered(ids_[:3], "a", final=False) == 1  # € incomplete: its bytes wait
    assert offs.covered(ids_[:5], "a€b", final=False) == 5 and offs.offsets == [0, 1, 1, 1, 2]
    assert offs.covered(ids_, "a€b!", final=True) == 6 and offs.offsets[-1] == 3
    cut = TokenOffsets(TOK.decode)
    assert cut.covered(ids_, "a\N{EURO SIGN}", final=True) == 4  # cut before "b"
    assert TokenOffsets(TOK.decode).covered(ids("hello"), "he", final=True) == 2


def test_a_stop_string_that_cuts_into_a_token_keeps_that_token_once_final() -> None:
    pieces = ["ab", "cd", "ef"]  # multi-character tokens, as a BPE vocabulary has
    offs = TokenOffsets(lambda ids: "".join(pieces[i] for i in ids))
    assert offs.covered([0, 1, 2], "abc", final=False) == 1  # "cd" not wholly sent yet
    assert offs.covered([0, 1, 2], "abc", final=True) == 2 and offs.offsets == [0, 2]
