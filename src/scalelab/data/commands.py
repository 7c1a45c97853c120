"""`scalelab data …`: thin CLI wrappers over the data library (ingest, tokenizer, verify, info, stats).

Each command parses its arguments, calls one library function and renders the result with rich (or
JSON with ``--json``). Errors are `scalelab.errors.DataError`; the main CLI prints them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from scalelab.data.corpus import BuiltinCorpus, JsonlSource, ParquetSource, Source, TextSource
from scalelab.errors import DataError

app = typer.Typer(
    help="Corpora, tokenizers and token stores: ingest, verify, inspect, and out-of-core column statistics.",
    no_args_is_help=True,
)
console = Console()

SourcesArg = Annotated[
    list[str],
    typer.Argument(
        help="Sources: `builtin` (Python stdlib corpus), text files/dirs/globs, *.jsonl or *.parquet files."
    ),
]
FieldOpt = Annotated[str, typer.Option("--field", help="JSONL field / Parquet column holding the text.")]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="Skip malformed JSONL lines instead of failing.")
]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        help="local (this machine's processes) | ray (Ray tasks on the cluster at $RAY_ADDRESS, else a "
        "local Ray; input paths must be readable on every node).",
    ),
]


def _executor(value: str) -> str:
    if value not in ("local", "ray"):
        raise DataError(f"--executor: expected 'local' or 'ray', got {value!r}")
    return value


def make_sources(specs: list[str], field: str = "text", skip_bad: bool = False) -> list[Source]:
    """`builtin`, ``*.jsonl``/``*.parquet`` (by extension) or text files, dirs and globs."""
    out: list[Source] = []
    for s in specs:
        low = s.lower()
        if s == "builtin":
            out.append(BuiltinCorpus())
        elif low.endswith((".jsonl", ".ndjson")):
            out.append(JsonlSource(s, field, skip_bad=skip_bad))
        elif low.endswith((".parquet", ".pq")):
            out.append(ParquetSource(s, field))
        else:
            out.append(TextSource(s))
    return out


def _ingest_progress() -> Progress:
    """On a terminal: a bar over the sources' bytes of text, with the tokens written and the time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not Console(stderr=True).is_terminal,
        transient=True,
    )


@app.command()
def ingest(
    sources: SourcesArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Store directory to create.")],
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="byte | bpe")] = "byte",
    tokenizer_file: Annotated[
        Path | None, typer.Option("--tokenizer-file", help="Use this trained tokenizer.json (BPE).")
    ] = None,
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="BPE vocabulary size when training.")
    ] = 4096,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Tokenizer processes.")] = 1,
    heldout_fraction: Annotated[float, typer.Option(help="Share of documents held out.")] = 0.02,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 1 << 22,
    field: FieldOpt = "text",
    skip_bad: SkipBadOpt = False,
    executor: ExecutorOpt = "local",
) -> None:
    """Tokenize SOURCES into a checksummed token store (resumes if interrupted)."""
    from scalelab.data.ingest import ingest as run_ingest
    from scalelab.data.store import TokenStore
    from scalelab.data.tokenize import BPETokenizer, ByteTokenizer, Tokenizer, train_bpe

    executor = _executor(executor)
    srcs = make_sources(sources, field, skip_bad)
    tok: Tokenizer
    if tokenizer_file is not None:
        tok = BPETokenizer.load(tokenizer_file)
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        with console.status("training BPE tokenizer…"):
            tok = train_bpe(srcs, vocab_size)
    else:
        raise DataError(f"--tokenizer: expected 'byte' or 'bpe', got {tokenizer!r}")
    with _ingest_progress() as progress:
        task = progress.add_task("ingest", total=None if progress.disable else _text_bytes(srcs), tokens=0)

        def tokens_done(n: int) -> None:
            progress.update(task, tokens=progress.tasks[0].fields["tokens"] + n)

        path = run_ingest(
            srcs,
            out,
            tok,
            heldout_fraction=heldout_fraction,
            shard_tokens=shard_tokens,
            workers=workers,
            progress=tokens_done,
            executor=executor,  # type: ignore[arg-type]
            text_progress=lambda n: progress.advance(task, n),
        )
    _render_info(TokenStore.open(path).info())


def _text_bytes(sources: list[Source]) -> int | None:
    """The bar's total: the sources' bytes of text, None (no bar, a count) when some source cannot say."""
    sizes = [s.size_bytes() for s in sources]
    return None if any(n is None for n in sizes) else sum(n for n in sizes if n is not None)


@app.command("train-tokenizer")
def train_tokenizer(
    sources: SourcesArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write tokenizer.json.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size incl. EOD.")] = 4096,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", help="Train on at most this much text.")
    ] = None,
    field: FieldOpt = "text",
    skip_bad: SkipBadOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer on SOURCES and save it as tokenizer.json."""
    from scalelab.data.tokenize import train_bpe

    with console.status("training BPE tokenizer…"):
        tok = train_bpe(make_sources(sources, field, skip_bad), vocab_size, max_bytes=max_bytes)
    tok.save(out)
    console.print(f"wrote {out}: vocab {tok.vocab_size}, EOD id {tok.eod_id}, hash {tok.hash[:16]}")


@app.command()
def verify(store: Annotated[Path, typer.Argument(help="Token store directory.")]) -> None:
    """Re-hash every shard of STORE against its index; exit 1 when anything is wrong."""
    from scalelab.data.store import TokenStore

    problems = TokenStore.open(store).verify()
    if problems:
        for p in problems:
            console.print(f"[red]✗[/red] {p}")
        raise typer.Exit(1)
    console.print(f"[green]✓[/green] {store}: all shards match their checksums")


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="Token store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a token store's tokenizer, fingerprint and splits."""
    from scalelab.data.store import TokenStore

    data = TokenStore.open(store).info()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _render_info(data)


def _render_info(data: dict[str, Any]) -> None:
    console.print(
        f"[bold]{data['path']}[/bold]  tokenizer {data['tokenizer']} (vocab {data['vocab_size']}, "
        f"EOD {data['eod_id']}), dtype {data['dtype']}, fingerprint {data['fingerprint'][:16]}"
    )
    table = Table("split", "documents", "tokens", "shards", "bytes")
    for split, s in data["splits"].items():
        table.add_row(split, f"{s['documents']:,}", f"{s['tokens']:,}", str(s["shards"]), f"{s['bytes']:,}")
    console.print(table)


@app.command()
def stats(
    table: Annotated[Path, typer.Argument(help="A .parquet/.csv file, or a token store directory.")],
    columns: Annotated[
        str | None, typer.Option("--columns", "-c", help="Comma-separated numeric columns (tables).")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes.")] = 1,
    split: Annotated[str, typer.Option(help="Token store split.")] = "train",
    executor: ExecutorOpt = "local",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Out-of-core moments and quantiles of table columns, or document lengths of a token store."""
    from scalelab.data.stats import column_stats, token_store_stats

    if _executor(executor) == "ray":
        from scalelab.data.raymap import cluster_cpus

        workers = max(workers, cluster_cpus())  # cut the table into units for the cluster's CPUs

    if table.is_dir():
        from scalelab.data.store import TokenStore

        res = token_store_stats(TokenStore.open(table), split, workers=workers, executor=executor)
        summaries = {"doc_length_tokens": res["doc_length"].summary()}
        counts = res["token_counts"]
        top = sorted(((int(c), i) for i, c in enumerate(counts) if c), reverse=True)[:10]
        extra: dict[str, Any] = {
            "documents": res["documents"],
            "tokens": res["tokens"],
            "top_tokens": [{"id": i, "count": c} for c, i in top],
        }
    else:
        if not columns:
            raise DataError("--columns: name the numeric columns to summarise, e.g. --columns loss,tokens")
        cols = [c.strip() for c in columns.split(",") if c.strip()]
        stats_ = column_stats(table, cols, workers=workers, executor=executor)
        summaries = {c: s.summary() for c, s in stats_.items()}
        extra = {}
    if as_json:
        print(json.dumps({**extra, "columns": _jsonable(summaries)}, indent=2))
        return
    keys = list(next(iter(summaries.values())).keys())
    t = Table("statistic", *summaries.keys())  # one column per data column: narrow terminals stay readable
    for k in keys:
        t.add_row(k, *(_fmt(s[k]) for s in summaries.values()))
    console.print(t)
    for k, v in extra.items():
        if k != "top_tokens":
            console.print(f"{k}: {v:,}")


def _fmt(v: Any) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
