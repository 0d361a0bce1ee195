"""Broken or unsupported quantized checkpoints fail at load, by native port and fallback alike, saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tests.quant_checkpoints import write_quantized
from tests.test_quant_loading import dense_model, load

from tfbackend.distributed import CommGroup, ParallelContext, use_parallel

IMPLS = ["native", "transformers"]
K_SCALE = "model.layers.1.self_attn.k_proj.weight_scale_inv"
GATE_SCALE = "model.layers.0.mlp.gate_proj.weight_scale_inv"


@pytest.fixture(scope="module")
def fp8_block(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8-block")
    write_quantized(dense_model(), path, "fp8-block")
    return path


def edited(source: Path, target: Path, tensors=None, quantization_config=None) -> Path:
    """A copy of ``source`` with tensors changed by ``tensors(dict)`` and/or another quantization_config."""
    target.mkdir(exist_ok=True)
    weights = load_file(source / "model.safetensors")
    if tensors is not None:
        tensors(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (target / "config.json").write_text(json.dumps(config))
    return target


def load_error(path: Path, impl: str, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        load(path, impl, **kwargs)
    return str(error.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_missing_scale_of_a_fused_shard(fp8_block, tmp_path, impl):
    path = edited(fp8_block, tmp_path, tensors=lambda w: w.pop(K_SCALE))
    message = load_error(path, impl)
    if impl == "native":  # q/k/v are one layer: k cannot be dense while q and v are FP8
        assert "stores ['model.layers.1.self_attn.k_proj'] unquantized" in message
    else:  # k_proj alone would be dense: its FP8 weight must not load unscaled
        assert "model.layers.1.self_attn.k_proj.weight is torch.float8_e4m3fn" in message
        assert "scales are missing" in message


@pytest.mark.parametrize("impl", IMPLS)
def test_missing_scale_of_every_layer(fp8_block, tmp_path, impl):
    path = edited(fp8_block, tmp_path, tensors=lambda w: [w.pop(k) for k in list(w) if k.endswith("_scale_inv")])
    assert "none of its linear layers has fp8 tensors" in load_error(path, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_of_the_wrong_shape(fp8_block, tmp_path, impl):
    def transpose(weights):  # gate_proj is 256 x 128: its 128x128 block grid is 2 x 1
        weights[GATE_SCALE] = weights[GATE_SCALE].T.contiguous()
    message = load_error(edited(fp8_block, tmp_path, tensors=transpose), impl)
    assert "model.layers.0.mlp.gate_proj: weight scale has shape (1, 2)" in message
    assert "need (2, 1)" in message


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0])
def test_scales_must_be_finite_and_positive(fp8_block, tmp_path, bad):
    def poison(weights):
        weights[GATE_SCALE][0, 0] = bad
    message = load_error(edited(fp8_block, tmp_path, tensors=poison), "native")
    assert "weight scales must be finite and positive" in message


def test_missing_static_input_scale(tmp_path):
    source = tmp_path / "static"
    write_quantized(dense_model(), source, "fp8-tensor-static")
    path = edited(source, tmp_path / "edited", tensors=lambda w: w.pop("model.layers.0.self_attn.o_proj.input_scale"))
    message = load_error(path, "native")
    assert "missing ['model.layers.0.self_attn.o_proj.input_scale|model.layers.0.self_attn.o_proj.activation_scale']" \
        in message


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config, expected", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     "unsupported quantization_config quant_method 'bitsandbytes'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq with 8 bits is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
     "compressed-tensors with 4-bit int weights is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128]},
     "fp8 weight_block_size must be two positive integers"),
])
def test_unsupported_formats(fp8_block, tmp_path, impl, config, expected):
    assert expected in load_error(edited(fp8_block, tmp_path, quantization_config=config), impl)


def test_quantization_flag_must_match_the_checkpoint(fp8_block, tmp_path):
    assert "quantized with 'fp8', which quantization='awq' does not match" in \
        load_error(fp8_block, "native", quantization="awq")
    dense = tmp_path / "dense"
    dense_model().save_pretrained(dense)
    assert "only 'fp8' quantizes an unquantized checkpoint" in load_error(dense, "transformers", quantization="gptq")
    assert "quantization must be one of" in load_error(dense, "native", quantization="int3")


@pytest.mark.parametrize(("impl", "expected"), [
    ("native", "fp8 linear layers are not split over tensor-parallel ranks yet"),
    ("transformers", "the transformers fallback cannot split quantized linear layers over several ranks"),
])
def test_quantized_linears_are_not_split_over_tensor_parallel_ranks(fp8_block, impl, expected):
    with use_parallel(ParallelContext(world_size=2, tp=CommGroup(rank=0, size=2))):
        assert expected in load_error(fp8_block, impl)
