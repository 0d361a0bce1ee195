"""Rendering a chat conversation, tools included, into the prompt text with the model's chat template.

Templates written for tool use (they read ``tools`` and the messages' ``tool_calls``) get both as HF defines
them: tool definitions as OpenAI's ``{"type": "function", "function": {...}}`` dicts and each call's arguments
as a dict. Templates without tool support (like the default model's) would drop them silently, so for those
the conversation is rewritten into plain messages the template can render: the tool definitions and how to
call them become (part of) the system message, a past call becomes the assistant's text in the tool-call
parser's format, and tool results become user messages in ``<tool_response>`` tags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from tfbackend.server.protocol import ChatMessage, Tool
from tfbackend.tool_parsers import ToolParser


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file path, or the template itself (as vLLM accepts both)."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # e.g. a template too long to be a file name
        pass
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


class ChatRenderer:
    """Turns messages (and tools) into prompt text for one tokenizer and template."""

    def __init__(self, tokenizer: Any, template: str | None, call_format: ToolParser) -> None:
        """``template``: overrides the tokenizer's; ``call_format``: how calls are written for templates
        without tool support (the server's tool-call parser, so it reads back what the model imitates)."""
        self.tokenizer = tokenizer
        self.template = template or (getattr(tokenizer, "chat_template", None) if tokenizer is not None else None)
        self.call_format = call_format
        self.renders_tools = self.template is not None and _renders_tools(self.template)

    def render(
        self,
        messages: list[ChatMessage],
        tools: list[Tool] | None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text; ValueError (for the user) when the template cannot render this conversation."""
        if self.tokenizer is None or self.template is None:
            raise ValueError("this model has no chat template; use /v1/completions or start with --chat-template")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        if continue_final_message and messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be from the assistant")
        reserved = {"messages", "tools", "add_generation_prompt", "continue_final_message", "chat_template",
                    "tokenize"} & set(template_kwargs or {})
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
        if self.renders_tools:
            conversation = [_native_message(message) for message in messages]
            tool_dicts = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
        else:
            conversation = self._plain_conversation(messages, tools)
            tool_dicts = None
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                tools=tool_dicts,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # jinja's TemplateError, or a template's own raise_exception()
            raise ValueError(f"the chat template rejected these messages: {exc}") from exc

    def _plain_conversation(self, messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict]:
        conversation: list[dict] = []
        previous_role = None
        for message in messages:
            if message.role == "tool":
                result = f"<tool_response>\n{message.text()}\n</tool_response>"
                if previous_role == "tool":  # parallel calls' results share one user turn
                    conversation[-1]["content"] += "\n" + result
                else:
                    conversation.append({"role": "user", "content": result})
            else:
                text = message.text()
                if message.tool_calls:
                    calls = [self.call_format.render_call(c.function.name, _arguments(c.function.arguments))
                             for c in message.tool_calls]
                    text = "\n".join(([text] if text else []) + calls)
                conversation.append({"role": _template_role(message.role), "content": text})
            previous_role = message.role
        if tools:
            instructions = self._tool_instructions(tools)
            if conversation[0]["role"] == "system":
                conversation[0]["content"] = f"{conversation[0]['content']}\n\n{instructions}"
            else:
                conversation.insert(0, {"role": "system", "content": instructions})
        return conversation

    def _tool_instructions(self, tools: list[Tool]) -> str:
        definitions = "\n".join(json.dumps(tool.function.model_dump(exclude_none=True), ensure_ascii=False)
                                for tool in tools)
        example = self.call_format.render_call("function_name", {"argument": "value"})
        return ("You can call these functions, described as JSON schemas:\n<tools>\n" + definitions
                + "\n</tools>\nTo call one, reply with exactly:\n" + example)


def _renders_tools(template: str) -> bool:
    """Whether a template reads the ``tools`` variable and the messages' ``tool_calls``."""
    try:
        variables = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False  # rendering will report the syntax error
    return "tools" in variables and "tool_calls" in template


def _template_role(role: str) -> str:
    return "system" if role == "developer" else role  # ``developer`` is OpenAI's newer name for ``system``


def _native_message(message: ChatMessage) -> dict:
    entry: dict[str, Any] = {"role": _template_role(message.role), "content": message.text()}
    if message.tool_calls:
        entry["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        entry["name"] = message.name
    return entry


def _arguments(text: str) -> dict:
    """Call arguments as templates expect them: a dict (OpenAI sends JSON text)."""
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"tool call arguments must be a JSON object, got {text[:100]!r}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments must be a JSON object, got {text[:100]!r}")
    return arguments
