"""tfbackend: LLM inference and serving; native models where they pay, any HF decoder otherwise."""

from tfbackend.engine.startup import paused_gc

with paused_gc():  # torch and transformers: several hundred thousand objects the collector need not walk
    from tfbackend.llm import LLM
    from tfbackend.outputs import CompletionOutput, RequestOutput
    from tfbackend.registry import register_model
    from tfbackend.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "register_model"]
