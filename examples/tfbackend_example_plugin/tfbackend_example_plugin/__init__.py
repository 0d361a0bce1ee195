"""An out-of-tree tfbackend plugin: native implementations for architectures tfbackend does not know.

Installing this package is enough: its ``tfbackend.plugins`` entry point (see pyproject.toml) makes
tfbackend call ``register()`` before resolving the first model.
"""

from tfbackend.registry import register_model

# A checkpoint whose config.json says "architectures": ["ExampleLlamaForCausalLM"] but is otherwise a
# Llama: the built-in native Llama runs it. A new architecture would name its own "module:Class" here,
# a subclass of tfbackend.native.NativeCausalLM (see docs/adding_a_model.md).
ARCHITECTURES = {
    "ExampleLlamaForCausalLM": "tfbackend.native.llama:LlamaForCausalLM",
}


def register() -> None:
    # Lazy "module:Class" strings: nothing is imported until a checkpoint of that architecture is loaded.
    for architecture, model_class in ARCHITECTURES.items():
        register_model(architecture, model_class)
