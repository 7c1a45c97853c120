"""Stop strings and streamed text: the text is cut before the first stop string, and what a stream sends
is always a prefix of the final text (partial UTF-8 characters and possible stop-string starts held back)."""

from __future__ import annotations

from scalelab.data.tokenize import ByteTokenizer
from scalelab.serve.text import StopText

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
