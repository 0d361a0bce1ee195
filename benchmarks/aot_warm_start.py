"""Warm starts with and without the saved compiled forward (issue 11), on any device that compiles.

    python3 benchmarks/aot_warm_start.py [--layers 8]

For a tiny random llama (native port) and gemma2 (transformers fallback) checkpoint, three engine starts per
variant, each a fresh process on a cache folder shared by the variant's starts: "in-process" compiles in the
process (the saved forward switched off), warm starts hitting Inductor's caches; "aot" saves the compiled
forward at the first start (``tfbackend/engine/aot_compile.py``) and loads it at the next. Prints each start's
compile phase, the engine's total, whether the forward was loaded, and the first tokens (equal in every row).
On a CPU the engine does not compile by default; the child switches that on, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_START = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from tests.test_piecewise_compile import engine_tokens
from tfbackend.engine import worker
worker.COMPILE_DEVICE_TYPES = ("cuda", "cpu")
if os.environ["VARIANT"] == "in-process":
    worker.Worker._aot_path = lambda self, hf_config: None
tokens, engine = engine_tokens(sys.argv[1], sys.argv[2])
print(json.dumps({"phases": engine.startup.seconds, "loaded": engine.forward.aot_loaded, "tokens": tokens}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    from tests.tiny_models import make_checkpoint

    root = Path(tempfile.mkdtemp(prefix="tfbackend-aot-"))
    for family, impl in (("llama", "native"), ("gemma2", "transformers")):
        checkpoint = root / family
        make_checkpoint(family, checkpoint, max_position_embeddings=128, num_hidden_layers=args.layers)
        for variant in ("in-process", "aot"):
            cache = root / f"cache-{family}-{variant}"
            env = dict(os.environ, REPO=str(ROOT), VARIANT=variant, TFBACKEND_CACHE=str(cache),
                       TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
            for start in ("cold", "warm", "warm"):
                run = subprocess.run([sys.executable, "-c", _START, str(checkpoint), impl], env=env,
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    print(run.stderr[-2000:])
                    return 1
                result = json.loads(run.stdout.strip().splitlines()[-1])
                phases = result["phases"]
                print(f"{family:7} {impl:12} {variant:10} {start:5} compile {phases.get('compile', 0):6.2f} s  "
                      f"total {phases['total']:6.2f} s  loaded {result['loaded']}  tokens {result['tokens'][1][:3]}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
