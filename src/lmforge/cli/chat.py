"""``lmforge chat``: the conversation loop behind the verb (``cli/main.py`` parses the flags, loads the model
and hands the loop a line reader).

Owns what a person types: messages, the ``/`` commands the loop answers itself (never sent to the model),
multi-line messages, and saving the transcript. Replies go to standard output, one per message (so a piped
chat's output is just the replies); prompts, confirmations and the command list go to standard error.

- ``/help`` lists the commands; an unknown ``/command`` says so (``//text`` sends ``/text`` as a message).
- ``/reset`` clears the conversation (a ``--system`` message stays) and says so.
- ``/save FILE`` writes the conversation so far, atomically: ``.json`` as the list of ``{"role", "content"}``
  messages the API and ``finetune`` take, anything else as Markdown. It will not replace a file this session
  did not write.
- Multi-line: a message between ``\"\"\"`` marks (``\"\"\"`` opens, text may follow on the same line; a line
  ending in ``\"\"\"`` closes), as in ollama's REPL: pasted paragraphs and code arrive as one message.
- ``/exit``, ``/quit`` or end of input leave; an unclosed ``\"\"\"`` block at the end of input is still sent.

A message the model cannot take (the conversation outgrew the context) is an error: in a terminal it is said
and the conversation goes on without that message; with piped input it ends the chat (``error: ...``, exit 2).
In a terminal, Ctrl-C during a reply stops that reply (its text so far stays in the conversation).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from lmforge.errors import LmforgeError
from lmforge.io import write_text_atomic

BLOCK = '"""'
COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation (the --system message stays)",
    "/save FILE": "write the conversation so far to FILE: .json (a list of role/content messages, as the API "
                  "and `lmforge finetune` take) or Markdown (any other name)",
    "/exit, /quit": "leave (Ctrl-D too)",
}
HELP = "\n".join([
    "commands:",
    *(f"  {name:<13} {what}" for name, what in COMMANDS.items()),
    f"multi-line message: start it with {BLOCK} and end it with {BLOCK} (on the same or a later line)",
    "a message that starts with / : type // (//etc/hosts sends /etc/hosts)",
])


def transcript_markdown(messages: list[dict[str, str]], model: str) -> str:
    """The conversation as Markdown: a title, then each message under its role."""
    parts = [f"# Chat with {model}\n"]
    for m in messages:
        parts.append(f"## {m['role']}\n\n{m['content']}\n")
    return "\n".join(parts)


class ChatSession:
    """The conversation and the commands on it. ``feed(line)`` takes one typed line and returns the message to
    send to the model when one is complete (None otherwise); ``done`` turns true after ``/exit``."""

    def __init__(self, model: str, system: str | None = None, log: TextIO | None = None):
        self.model, self.system = model, system
        self.log = log if log is not None else sys.stderr
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.done = False
        self.block: list[str] | None = None  # the lines of an open \"\"\" message
        self.saved: set[Path] = set()  # files this session wrote (a later /save may replace them)

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    @property
    def in_block(self) -> bool:
        return self.block is not None

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if self.block is not None:
            if line.rstrip().endswith(BLOCK):
                self.block.append(line.rstrip()[: -len(BLOCK)])
                return self._close_block()
            self.block.append(line)
            return None
        text = line.strip()
        if text.startswith(BLOCK):
            rest = text[len(BLOCK):]
            if len(rest) >= len(BLOCK) and rest.endswith(BLOCK):  # """one line"""
                return rest[: -len(BLOCK)].strip() or None
            self.block = [rest] if rest else []
            return None
        if text.startswith("//"):
            return text[1:]
        if text.startswith("/"):
            self.command(text)
            return None
        return text or None

    def finish(self) -> str | None:
        """End of input: the open multi-line message, if any (sent as it is)."""
        return self._close_block() if self.block is not None else None

    def _close_block(self) -> str | None:
        text = "\n".join(self.block or []).strip("\n")
        self.block = None
        return text if text.strip() else None

    def command(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            self.done = True
        elif name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.messages = self.messages[:1] if self.system else []
            self.say("conversation cleared" + (" (the system message stays)" if self.system else ""))
        elif name == "/save":
            self.save(arg)
        else:
            self.say(f"unknown command {name}; /help lists the commands (type //{name[1:]} to send it as a message)")

    def save(self, arg: str) -> None:
        if not arg:
            self.say("usage: /save FILE (.json for the messages, any other name for Markdown)")
            return
        path = Path(arg).expanduser()
        if path.exists() and path.resolve() not in self.saved:
            self.say(f"not saved: {path} exists and this chat did not write it; choose another name")
            return
        if path.exists() and not path.is_file():
            self.say(f"not saved: {path} is not a file")
            return
        turns = [m for m in self.messages if m["role"] != "system"]
        text = (json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n" if path.suffix.lower() == ".json"
                else transcript_markdown(self.messages, self.model))
        try:
            write_text_atomic(path, text)
        except OSError as e:  # a missing folder we may not create, permission denied, a full disk
            self.say(f"not saved: cannot write {path}: {e.strerror or e}")
            return
        self.saved.add(path.resolve())
        self.say(f"saved {len(turns)} message{'s' if len(turns) != 1 else ''} to {path}")


def chat_loop(read_line: Callable[[], str], reply: Callable[[list[dict[str, str]]], Iterable[str]], *, model: str,
              system: str | None = None, interactive: bool = False, out: TextIO | None = None,
              log: TextIO | None = None) -> ChatSession:
    """Run a conversation: read lines with ``read_line`` ("" at end of input), and for each complete message
    stream ``reply(messages)``'s pieces to ``out`` (standard output), one line per reply. Returns the session."""
    out = out if out is not None else sys.stdout
    session = ChatSession(model, system, log)
    if interactive:
        session.say(f"Chatting with {model}. /help lists the commands, /exit (or Ctrl-D) quits; "
                    f'{BLOCK} starts and ends a multi-line message.')
    while not session.done:
        if interactive:
            print("...> " if session.in_block else "you> ", end="", flush=True, file=session.log)
        line = read_line()
        message = session.feed(line) if line else session.finish()
        if message is not None:
            session.messages.append({"role": "user", "content": message})
            if interactive:
                print("assistant> ", end="", flush=True, file=session.log)
            text = ""
            try:
                for piece in reply(session.messages):
                    text += piece
                    print(piece, end="", flush=True, file=out)
            except LmforgeError as e:
                session.messages.pop()  # the message that failed is not part of the conversation
                if not interactive:
                    raise
                print(flush=True, file=out)
                session.say(f"error: {e} (the message was not added; /reset starts afresh)")
                continue
            except KeyboardInterrupt:  # Ctrl-C in a terminal stops this reply, not the chat
                if not interactive:
                    raise
                print(flush=True, file=out)
                session.say("(reply stopped; what was written is kept)")
                session.messages.append({"role": "assistant", "content": text})
                continue
            print(flush=True, file=out)
            session.messages.append({"role": "assistant", "content": text})
        if not line:
            break
    return session
