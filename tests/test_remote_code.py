"""Checkpoints that ship their own modeling code run only with trust_remote_code, and then run that code."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tests.tiny_models import hf_greedy, make_checkpoint, random_prompts
from tfbackend import LLM, SamplingParams

# A Llama whose attention scores are sharpened: the same weights give other tokens than the stock class, so
# matching HF proves the checkpoint's own code ran.
MODELING = textwrap.dedent(
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama


    class SharpAttention(modeling_llama.LlamaAttention):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            self.scaling = self.scaling * 3.0


    class SharpLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                old = layer.self_attn
                layer.self_attn = SharpAttention(config, old.layer_idx)
                layer.self_attn.load_state_dict(old.state_dict())
    """
)


@pytest.fixture(scope="module")
def remote_code_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("remote")
    make_checkpoint("llama", directory)
    (directory / "modeling_sharp.py").write_text(MODELING)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_sharp.SharpLlamaForCausalLM"}
    config["architectures"] = ["SharpLlamaForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_remote_code_is_refused_without_the_flag(remote_code_checkpoint: Path):
    with pytest.raises(ValueError, match="--trust-remote-code"):
        LLM(str(remote_code_checkpoint), dtype="float32", device="cpu")


def test_remote_code_runs_with_the_flag_and_matches_hf(remote_code_checkpoint: Path):
    reference = AutoModelForCausalLM.from_pretrained(remote_code_checkpoint, trust_remote_code=True, dtype=torch.float32)
    assert type(reference).__name__ == "SharpLlamaForCausalLM"
    prompts = random_prompts([5, 13])
    llm = LLM(str(remote_code_checkpoint), dtype="float32", device="cpu", block_size=4, max_model_len=64,
              trust_remote_code=True)
    assert llm.model_impl == "transformers" and "ships its own modeling code" in llm.model_impl_reason
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12))
    expected = hf_greedy(reference, prompts, 12)
    assert [out.outputs[0].token_ids for out in outputs] == expected
    stock = LlamaForCausalLM.from_pretrained(remote_code_checkpoint, dtype=torch.float32)
    assert hf_greedy(stock, prompts, 12) != expected  # the checkpoint's code is what made the difference
