"""tfbackend: LLM inference and serving; native models where they pay, any HF decoder otherwise."""

from tfbackend.llm import LLM
from tfbackend.outputs import CompletionOutput, RequestOutput
from tfbackend.registry import register_model
from tfbackend.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "register_model"]
