"""A rank of a multi-rank fallback builds its HF model over the memory-mapped checkpoint and copies only its
share (``distributed/mapped_checkpoint.py``): the model it maps computes what transformers' own load
computes, ties what transformers ties, stops depending on the files once detached, and any checkpoint whose
tensors are not the model's by name is left to transformers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.parallel_runs import NEW_TOKENS, generate, prompts_below
from tests.tiny_models import hf_greedy, make_checkpoint

from tfbackend.distributed.mapped_checkpoint import detach_from_files, map_checkpoint
from tfbackend.hf_classes import causal_lm_class, load_hf_config
from tfbackend.native.weights import safetensors_files, tensor_entries


def mapped(model_dir: Path, dtype: torch.dtype = torch.float32):
    hf_config = load_hf_config(model_dir)
    return map_checkpoint(causal_lm_class(hf_config), hf_config, model_dir, dtype, "eager")


def reference(model_dir: Path, dtype: torch.dtype = torch.float32):
    hf_config = load_hf_config(model_dir)
    return causal_lm_class(hf_config).from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}), ("llama", dict(tie_word_embeddings=True)), ("gpt2", {}), ("gemma2", {}),
], ids=["llama", "llama-tied", "gpt2", "gemma2"])
def test_a_mapped_model_computes_what_transformers_loads(model_type, overrides, tmp_path):
    make_checkpoint(model_type, tmp_path, **overrides)
    model, storages = mapped(tmp_path)
    expected = reference(tmp_path)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (
        expected.get_output_embeddings().weight is expected.get_input_embeddings().weight)
    # Every stored tensor is a view of its file, not a copy.
    assert len(storages) == len(tensor_entries(safetensors_files(tmp_path)))
    assert all(p.untyped_storage().data_ptr() in storages for p in model.parameters())
    input_ids = torch.randint(3, 200, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected(input_ids).logits, rtol=0, atol=0)
        detach_from_files(model, storages)
        assert not any(p.untyped_storage().data_ptr() in storages for p in model.parameters())
        torch.testing.assert_close(model(input_ids).logits, expected(input_ids).logits, rtol=0, atol=0)


def test_stored_dtypes_are_cast_as_transformers_casts(tmp_path):
    make_checkpoint("llama", tmp_path)
    path = safetensors_files(tmp_path)[0]
    save_file({name: t.to(torch.bfloat16) for name, t in load_file(path).items()}, path, metadata={"format": "pt"})
    model, _ = mapped(tmp_path, torch.float32)
    expected = reference(tmp_path, torch.float32)
    for (name, got), (_, want) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def test_a_tensor_the_model_lacks_leaves_the_load_to_transformers(tmp_path):
    make_checkpoint("llama", tmp_path)
    path = safetensors_files(tmp_path)[0]
    save_file({**load_file(path), "model.extra.weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    assert mapped(tmp_path) is None


def test_a_checkpoint_transformers_converts_is_left_to_it(tmp_path):
    """Mixtral as this transformers saves it: if the stored names are not the model's (per-expert weights that
    loading fuses), transformers must load it."""
    make_checkpoint("mixtral", tmp_path)
    hf_config = load_hf_config(tmp_path)
    with torch.device("meta"):
        names = set(causal_lm_class(hf_config)(hf_config).state_dict())
    if set(tensor_entries(safetensors_files(tmp_path))) <= names:
        pytest.skip("this transformers stores Mixtral under the model's own names")
    assert mapped(tmp_path) is None


def test_tensor_parallel_fallback_cuts_the_mapped_checkpoint(tmp_path, caplog):
    """GPT-2: tied head split by vocabulary, Conv1D projections split by the inferred plan, all from the map."""
    hf_model = make_checkpoint("gpt2", tmp_path)
    prompts = prompts_below(256)
    with caplog.at_level(logging.INFO, logger="tfbackend.distributed.hf_parallel"):
        tokens, _ = generate(tmp_path, prompts, model_impl="transformers", tensor_parallel_size=2)
    assert "read from the memory-mapped checkpoint" in caplog.text  # rank 0 runs in this process
    assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)


def test_checkpoint_views_hold_what_reading_gives_and_never_write_the_file(tmp_path):
    """What a native port's dense load streams (``iterate_safetensors(views=True)``): tensors over the mapped
    files, equal to the tensors read one by one; writing into one changes neither the file nor a later read."""
    from tfbackend.native.weights import iterate_safetensors

    make_checkpoint("llama", tmp_path)
    path = safetensors_files(tmp_path)[0]
    save_file({**load_file(path), "extra.int_ids": torch.arange(5), "extra.empty": torch.zeros(0)}, path,
              metadata={"format": "pt"})
    read = dict(iterate_safetensors(tmp_path))
    views = dict(iterate_safetensors(tmp_path, views=True))
    assert read.keys() == views.keys()
    for name, tensor in read.items():
        assert views[name].dtype == tensor.dtype and torch.equal(views[name], tensor), name
    name = next(iter(views))
    views[name].fill_(7)
    assert torch.equal(dict(iterate_safetensors(tmp_path))[name], read[name])


def test_a_checkpoint_without_safetensors_is_left_to_transformers(tmp_path):
    hf_model = make_checkpoint("llama", tmp_path)
    for path in safetensors_files(tmp_path):
        path.unlink()
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")  # the older PyTorch format
    assert mapped(tmp_path) is None
