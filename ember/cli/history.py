"""`ember history`: list, show, search, export and remove the conversations `ember chat` stored."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from ember.store import Conversation, Store, chat_messages

history_app = typer.Typer(
    help="Conversations saved by `ember chat` (SQLite in $EMBER_HOME/conversations.db). Continue one with "
         "`ember chat --resume [ID]`.",
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]})

IdArg = Annotated[int, typer.Argument(help="Conversation id (see `ember history list`).")]


def _table(rows: list[Conversation]) -> None:
    if not rows:
        print("no conversations", file=sys.stderr)
        return
    print(f"{'ID':>5}  {'UPDATED':<16}  {'MSGS':>4}  {'MODEL':<32}  TITLE")
    for c in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
        print(f"{c.id:>5}  {when:<16}  {c.n_messages:>4}  {c.model[:32]:<32}  {c.title}")


@history_app.command("list")
def list_cmd(limit: Annotated[int, typer.Option(help="Show at most this many, most recent first.", min=1)] = 50
             ) -> None:
    """The stored conversations, most recently used first."""
    _table(Store().list(limit))


@history_app.command()
def search(text: Annotated[str, typer.Argument(help="Text to find in titles and messages (any case).")],
           limit: Annotated[int, typer.Option(min=1)] = 50) -> None:
    """Conversations whose title or messages contain TEXT."""
    _table(Store().search(text, limit))


@history_app.command()
def show(cid: IdArg) -> None:
    """Print a conversation, message by message."""
    conv = Store().get(cid)
    print(f"# {conv.id}: {conv.title}  ({conv.model}, {len(conv.messages)} messages)")
    for m in conv.messages:
        tail = " [stopped]" if m.get("truncated") else ""
        print(f"\n{m['role']}:{tail}\n{m['content']}")


@history_app.command()
def export(cid: IdArg, output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Write here (the JSON `ember chat -i` reads); default: standard output.")] = None
           ) -> None:
    """A conversation as `ember chat` JSON (continue it with `ember chat -i FILE`)."""
    text = json.dumps(chat_messages(Store().get(cid)), ensure_ascii=False, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, output)  # atomic
    print(f"[conversation {cid} written to {output}]", file=sys.stderr)


@history_app.command()
def rm(cid: IdArg) -> None:
    """Delete a conversation."""
    Store().delete(cid)
    print(f"[conversation {cid} deleted]", file=sys.stderr)
