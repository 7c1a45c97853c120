"""Write the two corpora of `two_corpora.toml` from the built-in corpus: Python sources and documentation.

`runs/corpora/python/`: the standard library's top-level ``.py`` files in sorted order, up to about as
many bytes as the docs; `runs/corpora/docs/`: the ``pydoc_data`` help topics, one file per topic. One
document per file, so the held-out split works by documents as usual. Same Python version ⇒ same bytes.

    python examples/make_corpora.py [OUT_DIR]   (default runs/corpora, relative to where you run it)
"""

from __future__ import annotations

import sys
from pathlib import Path

from scalelab.data.corpus import BuiltinCorpus


def write_corpora(out: Path) -> dict[str, int]:
    """Write both corpora under `out`; return the bytes written per corpus."""
    corpus = BuiltinCorpus()
    docs_dir, py_dir = out / "docs", out / "python"
    docs_dir.mkdir(parents=True, exist_ok=True)
    py_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"docs": 0, "python": 0}
    for doc in corpus.read_part(("topics",)):
        text = doc.text.encode("utf-8")
        (docs_dir / (doc.doc_id.split("/", 1)[1] + ".txt")).write_bytes(text)
        sizes["docs"] += len(text)
    top_level = tuple(rel for rel in corpus.relative_files() if "/" not in rel)
    for doc in corpus.read_part(("files", top_level)):
        if sizes["python"] >= sizes["docs"]:
            break
        text = doc.text.encode("utf-8")
        (py_dir / doc.doc_id.split("/", 1)[1]).write_bytes(text)
        sizes["python"] += len(text)
    return sizes


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/corpora")
    for name, size in write_corpora(target).items():
        print(f"{target / name}: {size} bytes")
