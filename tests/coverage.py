"""The coverage sweep: does tfbackend generate what HF generates, for each causal-LM type of transformers?

For one model type: build a tiny random checkpoint (``model_zoo``), reload it from disk as HF's reference,
decode a few prompts greedily with HF ``generate`` one at a time, and with our engine all together (blocks of 4
tokens, prompts split into chunks by a small token budget). ``check_model_type`` returns what happened;
``run_isolated`` runs it in a subprocess with a time limit, so that one model that hangs or crashes cannot
take the sweep down. tests/test_coverage.py asserts on it; scripts/coverage_sweep.py writes
docs/supported_models.md from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT_LENGTHS = [5, 17, 30]
NEW_TOKENS = 12

# Outcomes: the type's greedy tokens equal HF's / it is refused with a reason / it does not build tiny (not
# counted) / tokens differ / the engine raised. The last two are bugs.
MATCH, REFUSED, NOT_BUILT, MISMATCH, ERROR, TIMEOUT = "match", "refused", "not built", "mismatch", "error", "timeout"


@dataclass
class Outcome:
    model_type: str
    status: str
    model_impl: str | None = None  # the tier that served it
    reason: str = ""  # why that tier (or why refused / what failed)
    hf_class: str | None = None
    seconds: float = 0.0


def check_model_type(model_type: str) -> Outcome:
    import torch
    import transformers

    from tests.model_zoo import prompt_token_ids, save_tiny_checkpoint
    from tests.tiny_models import hf_greedy
    from tfbackend import LLM, SamplingParams

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        try:
            # Encoder families (BERT & co.) generate as causal decoders only with is_decoder=True, as HF says.
            save_tiny_checkpoint(model_type, Path(directory), is_decoder=True)
            reference = load_reference(Path(directory))
            prompts = prompt_token_ids(PROMPT_LENGTHS)
            expected = hf_greedy(reference, prompts, NEW_TOKENS)
        except Exception as error:  # the type has no tiny form that HF itself can run
            return Outcome(model_type, NOT_BUILT, reason=_short(error), seconds=time.perf_counter() - start)
        hf_class = type(reference).__name__
        del reference
        try:
            llm = LLM(directory, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=24,
                      max_model_len=128, max_num_seqs=8)
        except ValueError as error:
            return Outcome(model_type, REFUSED, reason=str(error), hf_class=hf_class,
                           seconds=time.perf_counter() - start)
        except Exception as error:
            return Outcome(model_type, ERROR, reason=_short(error, trace=True), hf_class=hf_class,
                           seconds=time.perf_counter() - start)
        try:
            with torch.inference_mode():
                outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                       SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
        except Exception as error:
            return Outcome(model_type, ERROR, llm.model_impl, _short(error, trace=True), hf_class,
                           time.perf_counter() - start)
        tokens = [out.outputs[0].token_ids for out in outputs]
        status = MATCH if tokens == expected else MISMATCH
        reason = llm.model_impl_reason
        if status == MISMATCH:
            reason = f"{reason} | tokens {tokens} vs HF {expected}"
        return Outcome(model_type, status, llm.model_impl, reason, hf_class, time.perf_counter() - start)


def load_reference(directory: Path):
    """The checkpoint reloaded from disk by HF, with the class HF generates with (found as tfbackend finds it:
    text decoders of multimodal checkpoints save a config type no auto class maps)."""
    import torch
    from transformers import AutoConfig

    from tfbackend.hf_classes import causal_lm_class

    hf_class = causal_lm_class(AutoConfig.from_pretrained(directory))
    return hf_class.from_pretrained(directory, dtype=torch.float32).eval()


def _short(error: BaseException, trace: bool = False) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0][:400]
    if trace:
        frames = traceback.extract_tb(error.__traceback__)[-2:]
        text += " at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return text


def run_isolated(model_type: str, timeout: float) -> Outcome:
    """``check_model_type`` in a fresh interpreter, killed after ``timeout`` seconds."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "tests.coverage", model_type]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(model_type, TIMEOUT, reason=f"took longer than {timeout:.0f} s", seconds=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return Outcome(model_type, ERROR, reason=f"exit {result.returncode}: {tail[0][:300]}",
                       seconds=time.perf_counter() - start)
    return Outcome(**json.loads(lines[-1]))


if __name__ == "__main__":
    print(json.dumps(asdict(check_model_type(sys.argv[1]))))
