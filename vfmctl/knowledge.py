"""vfmctl commands of memory and knowledge: collections, ingest, search, remember, recall, context."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Callable

from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn)

from libvfm.errors import InvalidArgument, VfmError
from libvfm.types import MemoryEntry
from vfmctl import output

MAX_FILE_BYTES = 512 << 20


def parse_time(text: str) -> float:
    """ISO 8601 to unix seconds; a time without a zone is local time."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"bad time {text!r}: use ISO 8601, e.g. 2023-05-08T13:56") from None
    return when.astimezone().timestamp() if when.tzinfo is None else when.timestamp()


def parse_meta(pairs: list[str]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"bad --meta {pair!r}: use KEY=VALUE")
        meta[key] = value
    return meta


def documents(paths: list[str]) -> list[Path]:
    """Files named, and files under directories named (recursively, hidden ones skipped)."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidArgument(f"no such file or directory: {name}")
    return found


def cmd_collection(args, client_for: Callable) -> int:
    with client_for(args) as client:
        if args.collection_cmd == "create":
            value = client.collection_create(args.name, args.description)
            output.print_json(value) if args.output == "json" else \
                output.say(f"created collection {value.name}")
        elif args.collection_cmd == "list":
            items = client.collections()
            output.print_json(items) if args.output == "json" else output.collections_table(items)
        elif args.collection_cmd == "delete":
            n = client.collection_delete(args.name)
            output.say(f"deleted collection {args.name} ({n} chunks)")
        else:  # rm-source
            n = client.delete_source(args.name, _source_name(args.source))
            output.say(f"removed {n} chunks of {args.source} from {args.name}")
    return 0


def _source_name(path: str) -> str:
    """Sources are named by absolute path, so re-ingest from elsewhere still replaces."""
    p = Path(path)
    return str(p.resolve()) if p.exists() or not path.startswith(("http:", "https:")) else path


def cmd_ingest(args, client_for: Callable) -> int:
    files = documents(args.paths)
    if not files:
        raise InvalidArgument("no files to ingest")
    meta = parse_meta(args.meta)
    total = sum(f.stat().st_size for f in files)
    results, failed = [], []
    with client_for(args) as client, Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeRemainingColumn(), console=output.err_console(),
            disable=args.output == "json") as bar:
        task = bar.add_task(f"uploading {len(files)} file(s)", total=total)
        for path in files:
            # The upload takes a moment; parsing and embedding are most of the work.
            work = bar.add_task(f"  embedding {path.name}", total=None, visible=False)
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                failed.append((str(path), f"larger than {MAX_FILE_BYTES >> 20} MiB"))
                bar.advance(task, size)
                continue
            try:
                result = client.ingest(args.collection, str(path.resolve()), path.read_bytes(),
                                       kind=args.kind, mtime=path.stat().st_mtime, meta=meta,
                                       progress=lambda n: bar.advance(task, n),
                                       embedded=lambda done, of, w=work, p=path: bar.update(
                                           w, completed=done, total=of or None, visible=True,
                                           description=f"  {p.name}: embedded {done}/{of} "
                                                       "chunks" if of else f"  {p.name}: "
                                                       "parsing"))
                bar.update(work, visible=False)
                results.append(result)
            except VfmError as err:
                if err.code.name in ("NOT_FOUND", "UNAVAILABLE", "PERMISSION_DENIED"):
                    raise  # the collection or the service: no use trying the other files
                failed.append((str(path), err.message))
    if args.output == "json":
        output.print_json({"ingested": results, "failed": [{"source": s, "error": e}
                                                            for s, e in failed]})
    else:
        chunks = sum(r.chunks for r in results if not r.unchanged)
        same = sum(1 for r in results if r.unchanged)
        output.say(f"{len(results)} file(s) into {args.collection}: {chunks} chunks"
                               f"{f', {same} unchanged' if same else ''}")
        for source, error in failed:
            output.error(f"{source}: {error}")
    return 2 if failed else 0


def cmd_search(args, client_for: Callable) -> int:
    with client_for(args) as client:
        hits = client.search(args.collection, args.query, args.k,
                             filters=parse_meta(args.filter),
                             since=parse_time(args.since) if args.since else 0.0,
                             until=parse_time(args.until) if args.until else 0.0)
    output.print_json(hits) if args.output == "json" else output.search_table(hits)
    return 0


def cmd_remember(args, client_for: Callable, pid_of: Callable) -> int:
    entry = MemoryEntry(text=args.text, speaker=args.speaker,
                        time=parse_time(args.time) if args.time else 0.0,
                        meta=parse_meta(args.meta), pinned=args.pin)
    with client_for(args) as client:
        first, count = client.remember(pid_of(client, args.pid), [entry])
    if args.output == "json":
        output.print_json({"seq": first, "count": count})
    else:
        output.say(f"remembered as entry {first}")
    return 0


def cmd_recall(args, client_for: Callable, pid_of: Callable) -> int:
    with client_for(args) as client:
        hits = client.recall(pid_of(client, args.pid), args.query, args.k,
                             now=parse_time(args.now) if args.now else 0.0)
    output.print_json(hits) if args.output == "json" else output.recall_table(hits)
    return 0


def cmd_context(args, client_for: Callable, pid_of: Callable) -> int:
    with client_for(args) as client:
        ws = client.context(pid_of(client, args.pid), args.question, budget=args.budget,
                            now=parse_time(args.now) if args.now else 0.0)
    output.print_json(ws) if args.output == "json" else output.working_set_table(ws)
    return 0


def cmd_fork(args, client_for: Callable, pid_of: Callable) -> int:
    with client_for(args) as client:
        proc = client.fork(pid_of(client, args.pid), args.name)
    output.print_json(proc) if args.output == "json" else output.process_table([proc])
    return 0


def add_commands(add: Callable, client_for: Callable, pid_of: Callable,
                 common: Callable) -> None:
    """Register the commands on vfmctl's parser (`add` as in vfmctl.main.build_parser;
    `common` adds the connection options to a sub-action's parser)."""
    def bind(fn, with_pid: bool = False):
        return (lambda a: fn(a, client_for, pid_of)) if with_pid else (lambda a: fn(a, client_for))

    p = add("collection", bind(cmd_collection), "manage your tenant's knowledge collections")
    sub = p.add_subparsers(dest="collection_cmd", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="create a collection")
    c.add_argument("name")
    c.add_argument("--description", default="")
    listing = sub.add_parser("list", help="list collections with their sizes")
    d = sub.add_parser("delete", help="delete a collection and its chunks")
    d.add_argument("name")
    r = sub.add_parser("rm-source", help="remove one ingested source from a collection")
    r.add_argument("name")
    r.add_argument("source", help="the path it was ingested from")
    for action in (c, listing, d, r):
        common(action)

    p = add("ingest", bind(cmd_ingest), "ingest files (text, Markdown, HTML, PDF, CSV, JSON; "
            "directories recursively) into a collection; a changed file replaces its old chunks")
    p.add_argument("collection")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--kind", default="", choices=("", "text", "markdown", "html", "pdf", "csv",
                                                  "json"), help="format (default: by extension)")
    p.add_argument("--meta", action="append", default=[], metavar="K=V",
                   help="metadata for every chunk (repeatable)")

    p = add("search", bind(cmd_search), "search a collection (BM25 + dense, fused)")
    p.add_argument("collection")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10, help="results (default 10)")
    p.add_argument("--filter", action="append", default=[], metavar="K=V",
                   help="only chunks with this metadata (repeatable)")
    p.add_argument("--since", help="only chunks from this time on (ISO 8601)")
    p.add_argument("--until", help="only chunks up to this time (ISO 8601)")

    p = add("remember", bind(cmd_remember, True), "append an entry to a process's memory")
    p.add_argument("pid", help="pid (or process name)")
    p.add_argument("text")
    p.add_argument("--speaker", default="user", help="who said it (default: user)")
    p.add_argument("--time", help="when, ISO 8601 (default: now; no zone = local time)")
    p.add_argument("--meta", action="append", default=[], metavar="K=V")
    p.add_argument("--pin", action="store_true", help="always keep it in the working set")

    p = add("recall", bind(cmd_recall, True), "search a process's memory; understands time "
            "('what did she say last month')")
    p.add_argument("pid", help="pid (or process name)")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--now", help="what 'last month' is relative to (default: latest entry)")

    p = add("context", bind(cmd_context, True), "show the working set an Ask would use: "
            "each item with its sources")
    p.add_argument("pid", help="pid (or process name)")
    p.add_argument("--question", default="", help="the question to assemble for")
    p.add_argument("--budget", type=int, default=0,
                   help="tokens (default: the process's context budget)")
    p.add_argument("--now", help="what 'last month' is relative to (default: latest entry)")

    p = add("fork", bind(cmd_fork, True), "fork a process: the child shares the parent's "
            "memory copy-on-write")
    p.add_argument("pid", help="pid (or process name)")
    p.add_argument("--name", default="", help="the child's name (default: NAME-fork)")

