"""The `ember chat` REPL: streamed replies, Ctrl-C to cut a reply, history saved atomically as JSON and,
turn by turn, in the conversation store (`ember history`)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ember.errors import ContextLengthError, EmberError
from ember.llm import LLM
from ember.sampling_params import SamplingParams
from ember.store import Store

EXIT_WORDS = {"exit", "quit", "bye", "/exit", "/quit", "/bye"}
MIN_REPLY_TOKENS = 32  # room kept free for a reply when old turns must be dropped
HELP = "Commands: /help, /clear (forget the conversation), /save; exit, quit, bye or Ctrl-D to leave."


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, history: list[dict[str, Any]], *,
                 system: str | None = None, save_to: Path | None = None, store: Store | None = None,
                 conversation_id: int | None = None, model_name: str = "") -> None:
        """store: each finished turn is written there, in conversation `conversation_id` (None: a new one,
        created at the first turn with the history so far)."""
        self.llm, self.params = llm, params
        self.messages = list(history)
        if system is not None:
            self.messages = [m for m in self.messages if m.get("role") != "system"]
            self.messages.insert(0, {"role": "system", "content": system})
        self.save_to = save_to or _default_history_path()
        self.store, self.conversation_id, self.model_name = store, conversation_id, model_name
        # messages not in the store yet: the imported history of a new conversation (a resumed one has it)
        self._unstored = [] if conversation_id is not None else list(self.messages)
        self._interrupted = False

    # ---- history -------------------------------------------------------------------------------
    @staticmethod
    def read_history(path: Path) -> list[dict[str, Any]]:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EmberError(f"chat history {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise EmberError(f"chat history {path} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in data
        ):
            raise EmberError(f"chat history {path} must be a JSON list of {{\"role\": ..., \"content\": ...}} messages")
        return data

    def save(self) -> None:
        path = self.save_to
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.messages, f, ensure_ascii=False, indent=2)
                f.write("\n")
            os.replace(tmp, path)  # atomic: a crash never leaves half a history
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        print(f"[history saved to {path}]", file=sys.stderr)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        turns = sum(m["role"] == "user" for m in self.messages)
        print(f"[chatting with {self.llm.source.name}; {turns} earlier turns] {HELP}", file=sys.stderr)
        try:
            while True:
                try:
                    line = input("> ")
                except (EOFError, KeyboardInterrupt):
                    print(file=sys.stderr)
                    break
                text = line.strip()
                if not text:
                    continue
                if text.lower() in EXIT_WORDS:
                    break
                if text.startswith("/") and self._command(text):
                    continue
                self.turn(line)
        finally:
            self.save()

    def _command(self, text: str) -> bool:
        cmd = text.split()[0].lower()
        if cmd == "/help":
            print(HELP, file=sys.stderr)
        elif cmd == "/clear":
            self.messages = [m for m in self.messages if m["role"] == "system"]
            self.conversation_id, self._unstored = None, list(self.messages)  # the store keeps the old one
            print("[conversation cleared]", file=sys.stderr)
        elif cmd == "/save":
            self.save()
        else:
            return False
        return True

    def turn(self, user_text: str) -> None:
        """One exchange; Ctrl-C anywhere in it stops the reply at the next engine step (never mid-model)."""
        self._interrupted = False
        old = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._turn(user_text)
        finally:
            signal.signal(signal.SIGINT, old)

    def _turn(self, user_text: str) -> None:
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self._fit_context()
        except EmberError as e:
            self.messages.pop()
            print(f"error: {e}", file=sys.stderr)
            return
        room = self.llm.engine.max_model_len - len(ids)
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens or room, room))
        reply, reason, usage = self._stream(ids, params)
        msg: dict[str, Any] = {"role": "assistant", "content": reply}
        if reason == "abort":
            msg["truncated"] = True  # the user stopped this reply with Ctrl-C
            print("\n[reply stopped]", file=sys.stderr)
        elif reason == "length":
            print("\n[reply cut at the token limit]", file=sys.stderr)
        else:
            print()
        self.messages.append(msg)
        self._record([self.messages[-2], msg], usage)

    def _record(self, messages: list[dict[str, Any]], usage: dict[str, int] | None) -> None:
        """Write a finished turn to the store; a store that fails costs a warning, never the chat."""
        if self.store is None:
            return
        try:
            if self.conversation_id is None:
                settings = {k: v for k, v in dataclasses.asdict(self.params).items()
                            if k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                                     "max_tokens")}
                self.conversation_id = self.store.create(self.model_name or self.llm.source.name, settings)
            self.store.append(self.conversation_id, self._unstored + messages, usage)
            self._unstored = []
        except (EmberError, sqlite3.Error) as e:
            print(f"[warning: this turn is not in the conversation store: {e}]", file=sys.stderr)

    def _fit_context(self) -> list[int]:
        """Tokens of the conversation; drops the oldest turns (never the system message) when it's too long."""
        limit = self.llm.engine.max_model_len - MIN_REPLY_TOKENS
        dropped = 0
        while True:
            ids = self.llm.encode_chat(self.messages)
            if len(ids) <= limit:
                break
            first = next((i for i, m in enumerate(self.messages) if m["role"] != "system"), None)
            if first is None or first == len(self.messages) - 1:
                raise ContextLengthError(
                    f"this message alone is {len(ids)} tokens; the model's context holds "
                    f"{self.llm.engine.max_model_len} (minus {MIN_REPLY_TOKENS} for the reply). Shorten it.")
            # drop a whole exchange (user + assistant) so roles keep alternating
            del self.messages[first]
            dropped += 1
            if first < len(self.messages) - 1 and self.messages[first]["role"] == "assistant":
                del self.messages[first]
                dropped += 1
        if dropped:
            print(f"[context full: dropped the {dropped} oldest messages]", file=sys.stderr)
        return ids

    def _stream(self, ids: list[int], params: SamplingParams) -> tuple[str, str | None, dict[str, int] | None]:
        parts: list[str] = []
        reason, usage = None, None
        stream = self.llm._stream_ids(ids, params)
        try:
            for out in stream:
                sys.stdout.write(out.text)
                sys.stdout.flush()
                parts.append(out.text)
                reason = out.finish_reason
                usage = {"prompt_tokens": out.usage.prompt_tokens, "completion_tokens": out.usage.completion_tokens}
                if self._interrupted:
                    reason = "abort"
                    break
        finally:
            stream.close()  # aborts the request and frees its cache if it is still running
        return "".join(parts), reason, usage

    def _on_sigint(self, signum: int, frame: object) -> None:
        self._interrupted = True


def _default_history_path() -> Path:
    from ember.hub import ember_home

    return ember_home() / "chats" / time.strftime("chat-%Y%m%d-%H%M%S.json")
