"""OpenAI wire format: request bodies (pydantic), as OpenAI spells them plus vLLM's extras.

Range checks live in SamplingParams, not here, so the server and the Python API reject the same values
with the same messages. Unknown fields are ignored (as vLLM does), but every field of OpenAI's API that this
server does not implement is declared and refused with a 400 when set, so none is silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator
from pydantic import model_validator

from tfbackend.sampling_params import SamplingParams, StructuredOutputsParams

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_STOP_STRINGS = 256  # each one is searched after every token
# vLLM's older spellings of structured_outputs: field -> the constraint it sets
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Request(_Body):
    """A top-level request body."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        r"""JSON allows ``"\ud800"``, a half of a UTF-16 pair that is no character: it cannot be tokenized,
        encoded or echoed, so refuse it up front."""
        _check_surrogates(data, ())
        return data

    def unsupported(self) -> dict[str, Any]:
        """Fields that OpenAI defines and this server does not implement, with the values sent."""
        return {}


def _check_surrogates(value: Any, path: tuple) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = ".".join(map(str, path)) or "body"
            raise ValueError(f"{where} contains a lone UTF-16 surrogate, which is not a character") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_surrogates(key, path)
            _check_surrogates(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_surrogates(item, (*path, index))


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> dict[str, Any]:
        """The StructuredOutputsParams fields this format sets (none for ``text``)."""
        if self.type == "text":
            return {}
        if self.type == "json_object":
            return {"json_object": True}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError("response_format json_schema needs json_schema.schema")
        return {"json": self.json_schema.schema_}


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` field: one constraint, plus options."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    structural_tag: str | None = None
    whitespace_pattern: str | None = None

    def constraint(self) -> dict[str, Any]:
        """The StructuredOutputsParams fields this body sets (it may carry only options)."""
        fields = {"json": self.json_, "json_object": self.json_object, "regex": self.regex, "choice": self.choice,
                  "grammar": self.grammar}
        return {name: value for name, value in fields.items() if value not in (None, False)}


class _SamplingFields(_Request):
    """Fields shared by both generation endpoints."""

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None  # None: the model's generation config, else 1
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported(self) -> dict[str, Any]:
        unsupported = super().unsupported()
        if self.guided_whitespace_pattern is not None:
            unsupported["guided_whitespace_pattern"] = self.guided_whitespace_pattern
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            unsupported["guided_decoding_backend"] = self.guided_decoding_backend
        if self.structured_outputs is not None:
            for name in ("structural_tag", "whitespace_pattern"):
                if getattr(self.structured_outputs, name) is not None:
                    unsupported[f"structured_outputs.{name}"] = getattr(self.structured_outputs, name)
        return unsupported

    def structured_output_params(self) -> StructuredOutputsParams | None:
        """The one grammar constraint this request sets, from whichever of the synonyms it used."""
        found: dict[str, dict[str, Any]] = {}  # field that set a constraint -> its StructuredOutputsParams fields
        if self.structured_outputs is not None and self.structured_outputs.constraint():
            found["structured_outputs"] = self.structured_outputs.constraint()
        for name, key in _GUIDED_FIELDS.items():
            if getattr(self, name) is not None:
                found[name] = {key: getattr(self, name)}
        if self.response_format is not None and self.response_format.constraint():
            found["response_format"] = self.response_format.constraint()
        if len(found) > 1:
            raise ValueError(f"set one structured output constraint, got {', '.join(found)}")
        if not found:
            return None
        compact = self.structured_outputs is not None and self.structured_outputs.disable_any_whitespace
        return StructuredOutputsParams(**next(iter(found.values())), disable_any_whitespace=compact)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, defaults: dict[str, Any],
        structured_outputs: StructuredOutputsParams | None,
    ) -> SamplingParams:
        """Raises ValueError for out-of-range values (the server answers 400).

        ``defaults``: sampling values for fields the request leaves out (the model's generation config).
        """
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")

        def pick(name: str, builtin: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, builtin)

        return SamplingParams(
            n=self.n,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(dict.fromkeys(self.stop_token_ids or [])),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=_logit_bias(self.logit_bias),
            structured_outputs=structured_outputs,
        )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise ValueError("logit_bias keys must be token ids (integers as strings)") from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM extra: the tokenizer's BOS etc. around a text prompt

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_error_for_prompt(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """Replace pydantic's one error per union member ("prompt.str: ...") with one readable message."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of token id lists")

    def unsupported(self) -> dict[str, Any]:
        unsupported = super().unsupported()
        if self.suffix:
            unsupported["suffix"] = self.suffix  # needs a fill-in-the-middle prompt format per model
        return unsupported

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry: a string, or a list of token ids."""
        prompt = self.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not prompts:
            raise ValueError("prompt must not be empty")
        return prompts


class ContentPart(_Body):
    """A part of a message's content; this server serves text-only models, so only ``text`` parts run."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    def as_text(self) -> str:
        if self.type != "text" or self.text is None:
            raise ValueError(
                f"content parts of type {self.type!r} are not supported: this server runs text-only models "
                "(send text parts or a string)"
            )
        return self.text


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text


class ToolCallBody(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        content = self.content
        return "".join(part.as_text() for part in content) if isinstance(content, list) else content or ""


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False  # the template already writes the special tokens
    echo: bool = False  # vLLM's: not implemented for chat
    best_of: int | None = None  # vLLM's: not implemented for chat
    # OpenAI fields this server does not implement (text-only models, no hosted tools, no reasoning).
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None

    def unsupported(self) -> dict[str, Any]:
        unsupported = super().unsupported()
        for name in ("audio", "prediction", "web_search_options", "functions", "function_call", "reasoning_effort"):
            if getattr(self, name) is not None:
                unsupported[name] = getattr(self, name)
        if self.modalities not in (None, ["text"]):
            unsupported["modalities"] = self.modalities
        if self.echo:
            unsupported["echo"] = self.echo
        if self.best_of not in (None, self.n):
            unsupported["best_of"] = self.best_of
        return unsupported

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object, the body of every 4xx and 5xx."""

    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
