"""README.md's fenced blocks, for the tests that run what the README shows."""

from __future__ import annotations

from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    """The text of every fenced block of README.md in language `lang` ("" for none)."""
    out, current, in_lang = [], None, None
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, in_lang = [], line[3:].strip()
            else:
                if in_lang == lang:
                    out.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return out
