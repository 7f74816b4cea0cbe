"""Tool calling in ``/v1/chat/completions``: the request's ``tools`` and ``tool_choice`` checked, rendered into
the prompt, and the model's text parsed back into OpenAI ``tool_calls``.

This module owns the three steps and nothing of HTTP:

- ``tool_plan`` checks ``tools`` (each ``{"type": "function", "function": {"name", "description"?,
  "parameters"?}}``, names unique) and ``tool_choice`` (``"none"``, ``"auto"``, ``"required"`` or
  ``{"type": "function", "function": {"name": ...}}`` naming one of the tools); a bad one is an ``APIError`` 400
  whose ``param`` names the field.
- ``render_prompt`` turns the conversation (assistant turns carrying ``tool_calls`` and ``role: "tool"`` results
  included) into the prompt text. A chat template that uses the ``tools`` variable (Qwen2.5, Hermes, Llama 3.1,
  ...) renders everything itself, as transformers' ``apply_chat_template(tools=...)`` would: tool calls
  are handed to it with their arguments as objects. Any other template gets the generic format (the
  Hermes/Qwen2.5 convention): a system block listing the tools as JSON inside ``<tools></tools>`` and asking for
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; earlier calls are written that way in the
  assistant turns and tool results go in a user turn as ``<tool_response>...</tool_response>``.
  With ``tool_choice: "none"`` the tools are not shown at all (and nothing is parsed).
- ``parse_tool_calls`` (a whole answer) and ``ToolCallStream`` (a stream, one delta per complete call) find
  ``<tool_call>...</tool_call>`` blocks (a last block left open at the end of the answer counts too) whose JSON
  is an object naming one of the tools with an ``arguments`` (or ``parameters``) object; an answer that is one
  such bare JSON object (Llama 3.1's convention) is a call too. Anything else, malformed JSON included, stays in
  ``content``. Each call becomes ``{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}``.
  Other output conventions (Mistral's ``[TOOL_CALLS]``, ...) are not parsed: they stay content.
  ``parallel_tool_calls: false`` keeps the first call only (later ones stay content).

Forcing a call (``"required"`` or a named tool): the assistant turn is started with ``FORCED_OPEN`` in the
prompt and the model continues from there (``forced_prefix``), constrained by ``generation.constrained``
(``forced_call_states``) to ``call_schema``: {"name": one of the allowed tools, "arguments": that tool's
parameters schema}, so even a random model answers a parseable call (unless ``max_tokens`` cuts it: finish
reason "length", the text in ``content``). Without the constrained-decoding extra (llguidance) the call is
only prompted and validated after generation: a failed one comes back as plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lmforge.deploy.protocol import APIError
from lmforge.errors import LmforgeError
from lmforge.generation.constrained import INSTALL_HINT

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FORCED_OPEN = OPEN + "\n"
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools and what it asks of them: ``choice`` is "none", "auto", "required" or "named" (then
    ``name`` is the tool to call)."""

    tools: tuple[Tool, ...] = ()
    choice: str = "none"
    name: str | None = None
    parallel: bool = True  # False (``parallel_tool_calls: false``): at most one call per answer

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    @property
    def active(self) -> bool:
        """Whether tools are shown to the model and its answer is parsed for calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice in ("required", "named")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    def callable_tools(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.name in (None, t.name))


_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _check_tool(i: int, raw: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("function"), dict):
        raise APIError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"parameters\": {...}}}", param=where)
    fn = raw["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, '_', '-', '.' or ':', got {name!r}",
                       param=f"{where}.function.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise APIError(400, f"{where}.function.description must be a string", param=f"{where}.function.description")
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise APIError(400, f"{where}.function.parameters must be a JSON schema of type 'object', got "
                            f"{json.dumps(parameters)[:80]}", param=f"{where}.function.parameters")
    return Tool(name, description, parameters)


def tool_plan(tools: Any, tool_choice: Any, parallel: bool | None = None) -> ToolPlan:
    """The checked ``tools`` and ``tool_choice`` of a chat request (see the module docstring for the shapes);
    ``parallel`` is its ``parallel_tool_calls`` (None: true)."""
    plan = _tool_plan(tools, tool_choice)
    return plan if parallel is not False else ToolPlan(plan.tools, plan.choice, plan.name, parallel=False)


def _tool_plan(tools: Any, tool_choice: Any) -> ToolPlan:
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    checked = tuple(_check_tool(i, t) for i, t in enumerate(tools or []))
    seen: set[str] = set()
    for i, t in enumerate(checked):
        if t.name in seen:
            raise APIError(400, f"tools[{i}].function.name {t.name!r} repeats an earlier tool's name",
                           param=f"tools[{i}].function.name")
        seen.add(t.name)
    if tool_choice is None:
        return ToolPlan(checked, "auto" if checked else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise APIError(400, f"tool_choice must be one of {', '.join(CHOICES)} or {{\"type\": \"function\", "
                                f"\"function\": {{\"name\": ...}}}}, got {tool_choice!r}", param="tool_choice")
        if tool_choice == "required" and not checked:
            raise APIError(400, "tool_choice 'required' needs at least one tool in 'tools'", param="tool_choice")
        return ToolPlan(checked, tool_choice)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type") != "function" or not isinstance(fn.get("name"), str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice")
    if fn["name"] not in seen:
        known = ", ".join(repr(n) for n in seen) or "none"
        raise APIError(400, f"tool_choice names the function {fn['name']!r}, which is not in 'tools' (they are: "
                            f"{known})", param="tool_choice.function.name")
    return ToolPlan(checked, "named", fn["name"])


# ----------------------------------------------------------------------------------------------- rendering
def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` variable (so it has its own tool-calling format)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def generic_system_block(plan: ToolPlan) -> str:
    """The generic tool instructions (Hermes/Qwen2.5 convention) for a template without tool support."""
    specs = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in plan.tools)
    how_many = "one or more functions" if plan.parallel else "at most one function"
    text = (f"# Tools\n\nYou may call {how_many} to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{specs}\n</tools>"
            "\n\nFor each function call, return a json object with function name and arguments within "
            f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
            f"{CLOSE}")
    if plan.choice == "required":
        text += "\n\nYou must call at least one function."
    elif plan.choice == "named":
        text += f"\n\nYou must call the function {plan.name}."
    return text


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """One call written the generic way."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def _arguments(message: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """An assistant message's calls as (id, name, arguments object)."""
    return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message.get("tool_calls") or []]


def _generic_messages(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    previous = None
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(name, args) for _, name, args in _arguments(m))
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        elif m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if previous == "tool":  # consecutive results share one user turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
        else:
            out.append({"role": m["role"], "content": m["content"]})
        previous = m["role"]
    if plan.active:
        block = generic_system_block(plan)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for call_id, name, args in _arguments(m):
                names[call_id] = name
                calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
            m["tool_calls"] = calls
        elif m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
        out.append(m)
    return out


def render_prompt(tokenizer, messages: list[dict[str, Any]], plan: ToolPlan) -> str:
    """The prompt text for a conversation with tools (``messages`` as ``protocol.chat_messages`` returns them),
    ending with the generation prompt and, when the plan forces a call, ``forced_prefix(plan)``."""
    if template_takes_tools(tokenizer.chat_template):
        tools = [t.as_openai() for t in plan.tools] if plan.active else None
        text = tokenizer.apply_chat_template(_template_messages(messages), add_generation_prompt=True, tools=tools)
    else:
        text = tokenizer.apply_chat_template(_generic_messages(messages, plan), add_generation_prompt=True)
    return text + forced_prefix(plan)


def forced_prefix(plan: ToolPlan) -> str:
    """The text the assistant turn starts with: ``FORCED_OPEN`` when a call is forced, else nothing."""
    return FORCED_OPEN if plan.forced else ""


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON schema of one call the plan allows: {"name": <a tool's name>, "arguments": <its parameters>}."""
    options = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"], "additionalProperties": False} for t in plan.callable_tools()]
    return options[0] if len(options) == 1 else {"anyOf": options}


def forced_call_states(lm, n: int, plan: ToolPlan) -> list | None:
    """One constraint state per choice holding a forced call to ``call_schema(plan)``; None when constrained
    decoding is not installed (the call is then only prompted: ``FORCED_OPEN`` and the system block) or when a
    tool's parameters schema cannot be compiled (an APIError 400 naming the tools)."""
    try:
        return lm.constraint_states(n, call_schema(plan))
    except LmforgeError as e:
        if str(e) == INSTALL_HINT:
            return None
        raise APIError(400, f"tools: a tool's parameters schema cannot be used to force a call: {e}",
                       param="tools") from None


# ----------------------------------------------------------------------------------------------- parsing
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(body: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """An OpenAI tool call from the JSON inside a block, or None when it is not a valid call of a known tool."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str, names: tuple[str, ...],
                     max_calls: int | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole answer: the valid calls (the first ``max_calls``) taken out, the rest
    (stripped; None if empty)."""
    stream = ToolCallStream(names, max_calls)
    deltas = stream.feed(text) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    if not calls:
        bare = _call(text.strip(), names) if text.strip().startswith("{") else None
        if bare is not None:
            return None, [bare]
    return content or None, [{k: v for k, v in c.items() if k != "index"} for c in calls]


class ToolCallStream:
    """Splits streamed text into content deltas and tool-call deltas: ``feed(text)`` and, at the end, ``finish()``
    return a list of deltas, each ``{"content": str}`` or ``{"tool_calls": [{"index", "id", "type", "function":
    {"name", "arguments"}}]}`` (one per complete call, its arguments whole). Text that may be the start of
    ``<tool_call>`` is held back until it is known not to be; whitespace next to a call is dropped. Calls after
    the first ``max_calls`` stay content."""

    def __init__(self, names: tuple[str, ...], max_calls: int | None = None):
        self.names, self.buffer, self.in_call, self.calls = names, "", False, 0
        self.max_calls = max_calls
        self.space = ""  # whitespace held until more content follows
        self.started = False  # whether any content has been emitted

    def _content(self, text: str, out: list[dict[str, Any]]) -> None:
        if not text:
            return
        body = text.rstrip()
        if not body.strip():
            self.space += text
            return
        lead = len(body) - len(body.lstrip())
        prefix = (self.space + body[:lead]) if self.started else ""
        out.append({"content": prefix + body[lead:]})
        self.started, self.space = True, text[len(body):]

    def _block(self, block: str, out: list[dict[str, Any]]) -> None:
        inner = block[len(OPEN):]
        inner = inner[:-len(CLOSE)] if inner.endswith(CLOSE) else inner
        call = _call(inner.strip(), self.names) if self.max_calls is None or self.calls < self.max_calls else None
        if call is None:
            self._content(block, out)
            return
        out.append({"tool_calls": [{"index": self.calls, **call}]})
        self.calls += 1
        self.space = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buffer += text
        out: list[dict[str, Any]] = []
        while self.buffer:
            if self.in_call:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    break
                end += len(CLOSE)
                self._block(self.buffer[:end], out)
                self.buffer, self.in_call = self.buffer[end:], False
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                self._content(self.buffer[:start], out)
                self.buffer, self.in_call = self.buffer[start:], True
                continue
            keep = next((k for k in range(min(len(OPEN) - 1, len(self.buffer)), 0, -1)
                         if OPEN.startswith(self.buffer[-k:])), 0)
            self._content(self.buffer[:len(self.buffer) - keep], out)
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return out

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.in_call:
            self._block(self.buffer, out)
        else:
            self._content(self.buffer, out)
        self.buffer, self.in_call = "", False
        return out
