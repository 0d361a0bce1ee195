"""Per-request generation settings, named and defaulted as in vLLM and the OpenAI API."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_N = 128  # most completions one request may ask for (OpenAI's limit for n)
MAX_TEMPERATURE = 2.0  # OpenAI's and vLLM's upper bound
MIN_NONZERO_TEMPERATURE = 1e-2  # smaller positive temperatures overflow the softmax; vLLM raises them to this
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as vLLM's protocol allows


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's ``structured_outputs``): exactly one of the constraints.

    ``json``: a JSON schema (dict or string); ``json_object``: any JSON object; ``regex``: a regular expression
    the whole output matches; ``choice``: the output is one of these strings; ``grammar``: an EBNF grammar
    (GBNF syntax, with a ``root`` rule). ``disable_any_whitespace`` makes JSON compact (no free whitespace
    between tokens).
    """

    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, dict):  # a canonical string: hashable, and the compiled-grammar cache key
            object.__setattr__(self, "json", json.dumps(self.json, ensure_ascii=False))
        set_fields = [name for name in ("json", "json_object", "regex", "choice", "grammar")
                      if getattr(self, name) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, json_object, regex, choice or grammar"
                + (f", got {', '.join(set_fields)}" if set_fields else "")
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured outputs choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "json_object", "regex", "choice", "grammar")
                    if getattr(self, name) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top-k
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (clamped to [-100, 100])
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.top_k == -1:
            self.top_k = 0
        if 0 < self.temperature < MIN_NONZERO_TEMPERATURE:
            self.temperature = MIN_NONZERO_TEMPERATURE
        if self.logit_bias:
            if any(math.isnan(bias) for bias in self.logit_bias.values()):
                raise ValueError("logit_bias values must be numbers, got NaN")
            self.logit_bias = {
                int(token): min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(bias)))
                for token, bias in self.logit_bias.items()
            }
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a readable message for any out-of-range field."""
        checks = [
            (1 <= self.n <= MAX_N, f"n must be between 1 and {MAX_N}, got {self.n}"),
            (
                math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                f"repetition_penalty must be a positive number, got {self.repetition_penalty}",
            ),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                f"seed must be a 64-bit signed integer, got {self.seed}",
            ),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be non-negative, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                self.structured_outputs is None or self.min_tokens == 0,
                "min_tokens cannot be combined with structured outputs: the grammar decides where the output ends",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
