"""The tiny study header the study tests share: 1-block models of width 16 on a text corpus (conftest's
`tiny_corpus`), with `{corpus}` left to fill in; each test appends its own [study.train] and design."""

TINY_STUDY_HEADER = """
[study]
name = "{name}"
[study.model]
n_heads = 2
width = 16
depth = 1
context_tokens = 16
[study.data]
sources = [{{{{kind = "text", path = "{{corpus}}"}}}}]
heldout_fraction = 0.2
shard_tokens = 4096
"""


def tiny_study(name: str, rest: str) -> str:
    """A study template (still with `{corpus}` and any placeholders of `rest`) named `name`."""
    return TINY_STUDY_HEADER.format(name=name) + rest
