"""Write a random-weight checkpoint of any transformers causal-LM type, at a real model's shape.

For benchmarking architectures that have no ``bench --random-weights`` preset (the compat tier's BLOOM, Mamba2,
hybrids): the config is transformers' default for ``MODEL_TYPE`` with the given fields overridden, weights come
from the class's own initialisation (on the GPU when there is one), saved in bf16. Prints the folder.

    python3 benchmarks/random_hf_checkpoint.py bloom /tmp/bloom-560m hidden_size=1024 n_layer=24 n_head=16 \
        vocab_size=250880
    tfbackend bench throughput --model /tmp/bloom-560m --impl compat --peers hf-generate,hf-cb
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_type")
    parser.add_argument("output", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="FIELD=JSON", help="config fields, values parsed as JSON")
    args = parser.parse_args()
    overrides = {}
    for item in args.overrides:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"expected FIELD=VALUE, got {item!r}")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    if (args.output / "config.json").is_file():
        print(args.output)
        return
    config = AutoConfig.for_model(args.model_type, **overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.output)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model_type}: {params / 1e6:.0f}M parameters -> {args.output}", flush=True)
    print(args.output)


if __name__ == "__main__":
    main()
