"""The fused MoE kernel and the attention kernel at Gemma-2 shapes, on one CUDA GPU: checks and timings (~2 min).

Run from the repository root: ``python3 benchmarks/moe_attention_check.py [--sweep]``. Exits non-zero if a check
fails. Everything is bf16 with random weights.

- MoE, at the experts shapes of OLMoE-1B-7B (64 experts, top-8, hidden 2048, intermediate 1024) and
  Qwen3-30B-A3B (128 experts, top-8, hidden 2048, intermediate 768), for 1, 8, 64, 256 and 2048 tokens: the
  Triton kernels (our ``"tfbackend"`` experts implementation, on transformers' own experts module) against the
  torch reference (relative L2 error < 2e-2) and against transformers' default ``grouped_mm`` implementation,
  then the time of each, eagerly and as CUDA-graph replays. "weights GB/s" is the bytes of the experts the
  tokens hit over our graph time: at few tokens the kernel streams weights, so compare it with the HBM peak.
- Attention with Gemma-2-2B's shapes (8 query heads over 4 KV heads of 256, logits softcapped at 50): decode at
  batch 1 and 256 and a prefill, against the torch reference, timed eagerly and as graph replays. Decode
  metadata carry ``max_seq_len = 1024`` as the engine's graphs do with ``max_model_len`` 1024, so the batch-1
  rows show the split-KV partitions following the real context. A last table times batch-1 decode for several
  ``min_keys_per_split`` values ("off": no split).

``--sweep`` also times alternative tile configurations of both kernels (for retuning ``moe_tiles`` and
``_tile_config``); it adds about a minute.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from gpu_attention_check import BLOCK_SIZE, DEVICE, DTYPE, graph_time_ms, make_metadata, relative_error  # noqa: E402
from transformers import OlmoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

from tfbackend.attention import triton_backend  # noqa: E402
from tfbackend.attention.backend import LayerAttentionOptions  # noqa: E402
from tfbackend.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tfbackend.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tfbackend.kernels import fused_moe  # noqa: E402
from tfbackend.kernels.fused_moe_reference import fused_experts_reference  # noqa: E402
from tfbackend.kernels.hf_experts import experts_layout, tfbackend_experts_forward  # noqa: E402

MOE_TOKENS = [1, 8, 64, 256, 2048]
MOE_MAX_REL_ERROR = 2e-2
ATTENTION_MAX_REL_ERROR = 1e-2
GRAPH_MAX_SEQ_LEN = 1024  # the engine's decode graphs use max_model_len; T1/T2 presets run 1024


@dataclass
class MoEShape:
    name: str
    experts: Callable[[], torch.nn.Module]  # transformers' experts module at this shape, uninitialised


MOE_SHAPES = [
    MoEShape(
        "olmoe-1b-7b",
        lambda: OlmoeExperts(
            OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8)
        ),
    ),
    MoEShape(
        "qwen3-30b-a3b",
        lambda: Qwen3MoeExperts(
            Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
        ),
    ),
]
TOP_K = 8


def sweep_time(fn: Callable[[], object]) -> str:
    """Graph time of one sweep candidate, or why it did not run (a tile may not fit the GPU's resources)."""
    try:
        return f"{fmt(time_us(fn)[1]).strip()} us"
    except Exception as error:
        torch.cuda.synchronize()
        return f"failed ({type(error).__name__})"


def time_us(fn: Callable[[], object]) -> tuple[float, float | None]:
    """(eager, graph-replay) microseconds per call; graph None when the call cannot be captured."""
    fn()
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(fn, return_mode="median") * 1e3
    try:
        graph = graph_time_ms(fn) * 1e3
    except Exception as error:  # e.g. an implementation that syncs with the host
        print(f"  (not capturable: {type(error).__name__}: {str(error).splitlines()[0][:80]})")
        torch.cuda.synchronize()
        graph = None
    return eager, graph


def fmt(us: float | None) -> str:
    return f"{us:>9.1f}" if us is not None else f"{'n/a':>9}"


def make_experts(shape: MoEShape) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        module = shape.experts().to(DTYPE)
    hidden_size = module.gate_up_proj.shape[-1]
    with torch.no_grad():
        for weight in (module.gate_up_proj, module.down_proj):
            weight.normal_(0.0, hidden_size**-0.5)
    module.config._experts_implementation = "grouped_mm"  # transformers' default
    layout = experts_layout(module)
    if isinstance(layout, str):
        raise RuntimeError(layout)
    module._tfbackend_layout = layout
    return module


def routing(num_tokens: int, num_experts: int, hidden_size: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, hidden_size, device=DEVICE, dtype=DTYPE, generator=generator)
    logits = torch.randn(num_tokens, num_experts, device=DEVICE, generator=generator)
    weights, ids = torch.topk(logits.softmax(dim=-1), TOP_K, dim=-1)
    return hidden, ids, weights / weights.sum(dim=-1, keepdim=True)


def run_moe(shape: MoEShape, rows: list[str]) -> bool:
    module = make_experts(shape)
    num_experts, two_inter, hidden_size = module.gate_up_proj.shape
    expert_bytes = module.gate_up_proj[0].nbytes + module.down_proj[0].nbytes
    all_ok = True
    for num_tokens in MOE_TOKENS:
        hidden, ids, weights = routing(num_tokens, num_experts, hidden_size)

        def ours() -> torch.Tensor:
            return tfbackend_experts_forward(module, hidden, ids, weights)

        def hf() -> torch.Tensor:
            return module(hidden, ids, weights)  # dispatches to config._experts_implementation: grouped_mm

        out = ours()
        expected = fused_experts_reference(
            hidden, ids, weights, module.gate_up_proj, module.down_proj, module._tfbackend_layout.activation
        )
        error, error_hf = relative_error(out, expected), relative_error(hf(), expected)
        ok = error < MOE_MAX_REL_ERROR  # NaN compares false
        all_ok &= ok
        ours_eager, ours_graph = time_us(ours)
        hf_eager, hf_graph = time_us(hf)
        hit = ids.unique().numel()
        bandwidth = hit * expert_bytes / (ours_graph * 1e-6) / 1e9 if ours_graph else float("nan")
        speedup = (hf_graph or hf_eager) / (ours_graph or ours_eager)
        row = (
            f"{shape.name:<14} {num_tokens:>6} {hit:>4} {error:>8.1e} {error_hf:>8.1e} {'ok' if ok else 'FAIL':>5} "
            f"{fmt(ours_eager)} {fmt(ours_graph)} {fmt(hf_eager)} {fmt(hf_graph)} {speedup:>7.2f}x {bandwidth:>8.0f}"
        )
        rows.append(row)
        print(row, flush=True)
    return all_ok


def moe_sweep(shape: MoEShape) -> None:
    """Graph time of our kernels for alternative tile configurations, at the fewest and the most tokens."""
    module = make_experts(shape)
    num_experts, _, hidden_size = module.gate_up_proj.shape
    candidates = {  # MoETiles fields: block_m, block_n_gate_up, block_n_down, block_k, group_m, warps, stages
        1: [(16, 64, 64, 128, 1, 4, 4), (16, 32, 64, 128, 1, 4, 4), (16, 64, 128, 256, 1, 4, 3),
            (16, 32, 32, 256, 1, 4, 3)],
        256: [(64, 64, 64, 128, 4, 4, 3), (32, 64, 64, 128, 4, 4, 4), (128, 64, 128, 64, 8, 8, 4),
              (64, 128, 128, 64, 4, 8, 3)],
        2048: [(128, 64, 128, 64, 8, 8, 4), (64, 64, 128, 64, 8, 4, 3), (128, 128, 128, 64, 8, 8, 3),
               (128, 64, 64, 128, 8, 8, 3)],
    }
    for num_tokens, configs in candidates.items():
        hidden, ids, weights = routing(num_tokens, num_experts, hidden_size)

        def ours() -> torch.Tensor:
            return tfbackend_experts_forward(module, hidden, ids, weights)

        results = []
        for config in configs:
            tiles = fused_moe.MoETiles(*config)
            with mock.patch.object(fused_moe, "moe_tiles", lambda *args, tiles=tiles: tiles):
                results.append(f"{config}: {sweep_time(ours)}")
        print(f"sweep {shape.name} T={num_tokens}: " + "; ".join(results), flush=True)


@dataclass
class AttentionCase:
    name: str
    cached: list[int]
    new: list[int]
    max_seq_len: int | None = None  # the metadata's bound, as a CUDA graph has it
    num_q_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    softcap: float = 50.0


def make_attention_step(case: AttentionCase):
    torch.manual_seed(0)
    metadata = make_metadata(case.cached, case.new, case.max_seq_len)
    num_tokens, d = sum(case.new), case.head_dim
    num_blocks = int(metadata.block_tables.max().item()) + 1
    cache_shape = (num_blocks, BLOCK_SIZE, case.num_kv_heads, d)
    # Queries of std 8 give logits of std 8 at Gemma 2's scale (query_pre_attn_scalar 256 ** -0.5), so the
    # largest reach the curved part of the softcap's tanh.
    query = 8 * torch.randn(num_tokens, case.num_q_heads, d, device=DEVICE, dtype=DTYPE)
    key_cache = torch.randn(cache_shape, device=DEVICE, dtype=DTYPE)
    value_cache = torch.randn(cache_shape, device=DEVICE, dtype=DTYPE)
    options = LayerAttentionOptions(scale=d**-0.5, softcap=case.softcap)
    return metadata, query, key_cache, value_cache, options


def run_attention(case: AttentionCase, rows: list[str], backend: TritonAttentionBackend | None = None) -> bool:
    metadata, query, key_cache, value_cache, options = make_attention_step(case)
    backend = backend or TritonAttentionBackend()
    out = torch.empty_like(query)

    def attend() -> None:
        backend.attend(query, key_cache, value_cache, metadata, options, out=out)

    attend()
    expected = TorchAttentionBackend().attend(query, key_cache, value_cache, metadata, options)
    error = relative_error(out, expected)
    ok = error < ATTENTION_MAX_REL_ERROR
    eager, graph = time_us(attend)
    keys = sum(c + n for c, n in zip(case.cached, case.new))
    kv_bytes = keys * case.num_kv_heads * 2 * case.head_dim * DTYPE.itemsize
    plan = backend.plan(query, key_cache, value_cache, metadata)
    row = (
        f"{case.name:<36} {sum(case.new):>6} {plan.num_splits:>6} {plan.block_m:>3}x{plan.tile_n:<3} {error:>8.1e} "
        f"{'ok' if ok else 'FAIL':>5} {fmt(eager)} {fmt(graph)} {kv_bytes / (graph * 1e-6) / 1e9 if graph else 0:>8.0f}"
    )
    rows.append(row)
    print(row, flush=True)
    return ok


def attention_sweep(case: AttentionCase, configs: list[tuple[int, int, int, int]]) -> None:
    """Graph time for alternative (BLOCK_M, TILE_N, num_warps, num_stages)."""
    metadata, query, key_cache, value_cache, options = make_attention_step(case)
    backend, out = TritonAttentionBackend(), torch.empty_like(query)

    def attend() -> None:
        backend.attend(query, key_cache, value_cache, metadata, options, out=out)

    results = []
    for config in configs:
        with mock.patch.object(triton_backend, "_tile_config", lambda *args, config=config: config):
            results.append(f"{config}: {sweep_time(attend)}")
    print(f"sweep {case.name}: " + "; ".join(results), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    import transformers

    print(
        torch.cuda.get_device_name(), f"| torch {torch.__version__} | triton {triton.__version__} "
        f"| transformers {transformers.__version__}", flush=True,
    )
    all_ok = True

    moe_header = (
        f"{'MoE shape':<14} {'tokens':>6} {'hit':>4} {'rel err':>8} {'HF err':>8} {'check':>5} "
        f"{'ours us':>9} {'graph us':>9} {'HF us':>9} {'HF graph':>9} {'speedup':>8} {'wGB/s':>8}"
    )
    moe_rows = [moe_header, "-" * len(moe_header)]
    print(moe_header, flush=True)
    for shape in MOE_SHAPES:
        all_ok &= run_moe(shape, moe_rows)
        torch.cuda.empty_cache()

    generator = torch.Generator().manual_seed(0)
    contexts = torch.randint(64, 513, (256,), generator=generator).tolist()
    cases = [
        AttentionCase("gemma2 decode B=1 ctx 128", [127], [1], GRAPH_MAX_SEQ_LEN),
        AttentionCase("gemma2 decode B=1 ctx 512", [511], [1], GRAPH_MAX_SEQ_LEN),
        AttentionCase("gemma2 decode B=1 ctx 1024", [1023], [1], GRAPH_MAX_SEQ_LEN),
        AttentionCase("gemma2 decode B=256 ctx 64-512", [c - 1 for c in contexts], [1] * 256, GRAPH_MAX_SEQ_LEN),
        AttentionCase("gemma2 prefill 4 x 512", [0, 0, 0, 0], [512] * 4),
    ]
    attention_header = (
        f"{'attention case':<36} {'tokens':>6} {'splits':>6} {'tile':>7} {'rel err':>8} {'check':>5} "
        f"{'eager us':>9} {'graph us':>9} {'KV GB/s':>8}"
    )
    attention_rows = [attention_header, "-" * len(attention_header)]
    print(attention_header, flush=True)
    for case in cases:
        all_ok &= run_attention(case, attention_rows)

    split_rows = ["batch-1 decode, graph us by min_keys_per_split (splits used <= cdiv(context, it)):"]
    for context in (128, 512, 1024):
        case = AttentionCase(f"ctx {context}", [context - 1], [1], GRAPH_MAX_SEQ_LEN)
        timings = []
        for min_keys in (64, 128, 256, 512, None):
            backend = TritonAttentionBackend(split_kv=False) if min_keys is None else TritonAttentionBackend(
                min_keys_per_split=min_keys
            )
            metadata, query, key_cache, value_cache, options = make_attention_step(case)
            out = torch.empty_like(query)
            _, graph = time_us(lambda: backend.attend(query, key_cache, value_cache, metadata, options, out=out))
            timings.append(f"{min_keys or 'off'}: {fmt(graph).strip()}")
        split_rows.append(f"  {case.name:<9} " + "  ".join(timings))
        print(split_rows[-1], flush=True)

    if "--sweep" in sys.argv[1:]:
        moe_sweep(MOE_SHAPES[0])
        decode_configs = [(16, 64, 4, 2), (16, 32, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2), (16, 64, 8, 2)]
        attention_sweep(cases[3], decode_configs)
        attention_sweep(cases[0], decode_configs)
        attention_sweep(cases[4], [(64, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2)])

    print("\n" + "\n".join(moe_rows + [""] + attention_rows + [""] + split_rows))
    print("ALL CHECKS PASSED" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
