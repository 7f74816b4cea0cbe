"""``lmforge chat`` driven through standard input: the commands it answers itself (/help, unknown /commands,
/reset, /save), multi-line messages, and the temperature defaults of chat and generate (cli/chat.py)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from lmforge.cli import main
from lmforge.cli.chat import HELP, chat_loop
from lmforge.cli.main import build_parser
from lmforge.errors import LmforgeError


def drive(text: str, system: str | None = None, interactive: bool = False, fail_on: str | None = None):
    """Run the loop on ``text`` with a fake model that answers "reply N" and records what it was sent."""
    lines = io.StringIO(text)
    sent: list[list[dict]] = []

    def reply(messages):
        sent.append([dict(m) for m in messages])
        if fail_on is not None and messages[-1]["content"] == fail_on:
            raise LmforgeError("the prompt is longer than the context")
        yield f"reply {len(sent)}"

    out, log = io.StringIO(), io.StringIO()
    session = chat_loop(lines.readline, reply, model="tiny", system=system, interactive=interactive, out=out, log=log)
    return session, sent, out.getvalue(), log.getvalue()


def test_help_and_unknown_commands_are_answered_by_chat_not_sent():
    session, sent, out, log = drive("/help\n/frobnicate now\nhello\n")
    assert HELP in log and "/save FILE" in HELP and '"""' in HELP
    assert "unknown command /frobnicate; /help lists the commands" in log
    assert [[m["content"] for m in s] for s in sent] == [["hello"]]  # only the real message reached the model
    assert out == "reply 1\n"


def test_a_double_slash_sends_a_message_that_starts_with_a_slash():
    _, sent, _, _ = drive("//etc/hosts is a file\n")
    assert sent[0][-1]["content"] == "/etc/hosts is a file"


def test_reset_confirms_and_keeps_the_system_message():
    session, sent, out, log = drive("first\n/reset\nsecond\n/exit\nnever read\n", system="Be brief.")
    assert "conversation cleared (the system message stays)" in log
    assert sent[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "second"}]
    assert out.splitlines() == ["reply 1", "reply 2"]


@pytest.mark.parametrize("typed, message", [
    ('"""\nline one\n  indented two\n"""\n', "line one\n  indented two"),
    ('"""first line\nlast line"""\n', "first line\nlast line"),
    ('"""just one line"""\n', "just one line"),
    ('"""\nno closing mark at the end of input\n', "no closing mark at the end of input"),
])
def test_a_message_between_triple_quotes_spans_lines(typed, message):
    _, sent, out, _ = drive(typed + "/exit\n" if typed.count('"""') % 2 == 0 else typed)
    assert [s[-1]["content"] for s in sent] == [message]
    assert out == "reply 1\n"


def test_the_continuation_prompt_shows_inside_a_block():
    _, _, _, log = drive('"""\nmore\n"""\n', interactive=True)
    assert log.count("you> ") == 2 and log.count("...> ") == 2 and "/help lists the commands" in log


def test_save_writes_json_messages_or_markdown_atomically(tmp_path):
    js, md = tmp_path / "chat.json", tmp_path / "notes" / "chat.md"
    session, _, _, log = drive(f"hi\n/save {js}\nagain\n/save {js}\n/save {md}\n", system="Be brief.")
    assert json.loads(js.read_text(encoding="utf-8")) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "reply 1"}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "reply 2"}]  # the second /save replaced the session's own file
    assert f"saved 2 messages to {js}" in log and f"saved 4 messages to {js}" in log
    assert md.read_text(encoding="utf-8") == ("# Chat with tiny\n\n## system\n\nBe brief.\n\n## user\n\nhi\n\n"
                                              "## assistant\n\nreply 1\n\n## user\n\nagain\n\n## assistant\n\nreply 2\n")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["chat.json", "chat.md", "notes"]  # no temp files left


def test_save_refuses_to_replace_a_file_it_did_not_write_and_the_chat_goes_on(tmp_path):
    theirs = tmp_path / "theirs.md"
    theirs.write_text("keep me", encoding="utf-8")
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    _, sent, out, log = drive(f"hi\n/save {theirs}\n/save {blocker}/x.json\n/save\nstill here\n")
    assert theirs.read_text(encoding="utf-8") == "keep me"
    assert f"not saved: {theirs} exists and this chat did not write it" in log
    assert f"not saved: cannot write {blocker}/x.json" in log
    assert "usage: /save FILE" in log
    assert out.splitlines() == ["reply 1", "reply 2"]


def test_a_failed_reply_ends_a_piped_chat_but_not_a_terminal_one():
    with pytest.raises(LmforgeError, match="longer than the context"):
        drive("too long\nafter\n", fail_on="too long")
    session, sent, out, log = drive("too long\nafter\n", fail_on="too long", interactive=True)
    assert "error: the prompt is longer than the context (the message was not added" in log
    assert sent[-1] == [{"role": "user", "content": "after"}]  # the failed message is not in the conversation


def test_chat_through_the_cli_on_a_tiny_model(tiny_lm_dirs, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "t.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f'/nope\n"""\nhello\nthere\n"""\n/save {saved}\n'))
    code = main(["chat", "-m", str(tiny_lm_dirs["chat"]), "-n", "4", "--seed", "0"])
    out, err = capsys.readouterr()
    assert code == 0 and "unknown command /nope" in err
    messages = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "hello\nthere"
    assert out == messages[1]["content"] + "\n"


def test_temperature_defaults_generate_greedy_chat_like_the_playground_and_help_says_why(capsys):
    parser = build_parser()
    assert parser.parse_args(["generate", "x"]).temperature == 0.0
    assert parser.parse_args(["chat"]).temperature == 0.7
    assert parser.parse_args(["chat", "-t", "0"]).temperature == 0.0

    def help_of(verb):
        assert main([verb, "--help"]) == 0
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    assert "(default: 0, greedy: the same output every run, for scripts and comparisons)" in help_of("generate")
    assert "(default: 0.7, varied replies for a person, as in the playground; -t 0 is greedy)" in help_of("chat")
    assert "A request without 'temperature' samples at 1.0, OpenAI's default" in help_of("serve")


def test_ctrl_c_stops_a_reply_in_a_terminal_and_the_chat_goes_on():
    lines = io.StringIO("first\nsecond\n")

    def reply(messages):
        yield "partial"
        if messages[-1]["content"] == "first":
            raise KeyboardInterrupt

    out, log = io.StringIO(), io.StringIO()
    session = chat_loop(lines.readline, reply, model="tiny", interactive=True, out=out, log=log)
    assert "(reply stopped; what was written is kept)" in log.getvalue()
    assert [m["content"] for m in session.messages] == ["first", "partial", "second", "partial"]
    with pytest.raises(KeyboardInterrupt):  # piped: Ctrl-C ends the command as before
        chat_loop(io.StringIO("first\n").readline, reply, model="tiny", out=io.StringIO(), log=io.StringIO())
