"""A persistent compile cache under ``$TFBACKEND_CACHE``, so the second start of a model skips compilation.

What the GPU path compiles is deterministic for the model's shapes and the installed versions: Inductor's
generated code (its FX graph cache and AOTAutograd cache, both on by default in torch, keyed by graph, config
and versions) and Triton's kernels (keyed by source, constants and versions). Both caches only need a
directory that outlives the process; torch's default is under ``/tmp``, which machines wipe, and Triton's is
``~/.triton``, shared with every other program. Pointing them at ``$TFBACKEND_CACHE/compile`` keeps them with
the converted models and lets ``bench --cold`` start from an empty one.

The ahead-of-time compiled forward (``aot_compile.py``) is kept there too, under ``compile/aot`` (or
``$TFBACKEND_AOT_CACHE_DIR``), one file per model, configuration and set of versions (``aot_artifact_path``).

The environment variables are read lazily, when something first compiles, so they must be set before that
(the engine does it first thing). A value the user set is left alone; so is one torch set itself when this
process already compiled before the engine configured the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Inductor keeps its FX graph, AOTAutograd and autotuning caches here; Triton its compiled kernels (Inductor's
# generated ones too, when TRITON_CACHE_DIR is set).
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_CACHE_ENV = "TRITON_CACHE_DIR"
# The saved compiled forwards (aot_compile.py) go here when it is set, else under the cache root's compile/aot.
AOT_CACHE_ENV = "TFBACKEND_AOT_CACHE_DIR"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the tfbackend package


@dataclass(frozen=True)
class CompileCacheDirs:
    inductor: Path
    triton: Path
    inductor_from_user: bool  # the directory was set before the engine's (the user's, or an earlier compile's)
    triton_from_user: bool


def configure_compile_cache(cache_root: Path) -> CompileCacheDirs:
    """Point Inductor's and Triton's caches at ``cache_root/compile`` unless their variables are already set."""
    compile_root = Path(cache_root) / "compile"
    dirs = {}
    for env, default in ((INDUCTOR_CACHE_ENV, compile_root / "inductor"), (TRITON_CACHE_ENV, compile_root / "triton")):
        preset = os.environ.get(env)
        if preset is None:
            os.environ[env] = str(default)
        dirs[env] = (Path(os.environ[env]), preset is not None)
    result = CompileCacheDirs(
        inductor=dirs[INDUCTOR_CACHE_ENV][0],
        triton=dirs[TRITON_CACHE_ENV][0],
        inductor_from_user=dirs[INDUCTOR_CACHE_ENV][1],
        triton_from_user=dirs[TRITON_CACHE_ENV][1],
    )
    logger.debug("compile cache: inductor %s, triton %s", result.inductor, result.triton)
    return result


def aot_cache_dir(cache_root: Path) -> Path:
    """Where saved compiled forwards live: ``$TFBACKEND_AOT_CACHE_DIR``, else ``cache_root/compile/aot``. Read,
    never written to the environment: only torch's and Triton's caches need their variables set."""
    return Path(os.environ.get(AOT_CACHE_ENV) or Path(cache_root) / "compile" / "aot")


def aot_artifact_path(directory: Path, model: torch.nn.Module, factors: dict[str, Any]) -> Path:
    """Where the ahead-of-time compiled forward of ``model`` (``aot_compile.py``) lives for these ``factors``
    (config, dtype, device, ranks...): a file named by the hash of them, the model's class, the installed
    versions and this package's sources."""
    versions = {name: _version(name) for name in ("torch", "triton", "transformers")}
    key = {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "versions": versions,
        "sources": _sources_digest(),
        "environment": {name: value for name, value in os.environ.items()
                        if name.startswith(("TFBACKEND_", "TORCHINDUCTOR_", "TORCH_COMPILE"))
                        and name not in ("TFBACKEND_CACHE", INDUCTOR_CACHE_ENV, AOT_CACHE_ENV)},
        **factors,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(directory) / f"{digest}.bin"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for source in sorted(_SOURCE_ROOT.rglob("*.py")):
        digest.update(str(source.relative_to(_SOURCE_ROOT)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()
