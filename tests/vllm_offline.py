"""Run offline generation in a fresh process and print JSON: what the vLLM tests compare.

python vllm_offline.py MODEL BACKEND '{"unisparse": {...}}' [--multiprocess] [--tp N] \
    [--prompts I ...] [--no-prefix-caching]
"""

from __future__ import annotations

import argparse
import json
import os


def prompts() -> list[str]:
    base = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
    shared = base * 12  # a shared prefix: prefix-cache hits for the later prompts
    return [
        base * 3,
        shared + "boxing matches under pale moonlight",
        shared + "rivers mountains cities",
        base * 40,
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("backend")
    parser.add_argument("additional_config", nargs="?", default="{}")
    parser.add_argument("--multiprocess", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--prompts", type=int, nargs="+", help="indices into prompts() (all)")
    parser.add_argument(
        "--no-prefix-caching", action="store_true", help="every prompt token computed"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiprocess else "0"

    from vllm import LLM, SamplingParams

    llm = LLM(
        args.model,
        attention_backend=args.backend,
        dtype="float32",
        max_model_len=4096,
        max_num_batched_tokens=64,  # forces chunked prefill of every prompt here
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=True,
        tensor_parallel_size=args.tp,
        additional_config=json.loads(args.additional_config),
        seed=0,
    )
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=5)
    chosen = [prompts()[i] for i in args.prompts] if args.prompts else prompts()
    outputs = llm.generate(chosen, params)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        "first_logprobs": [
            {str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outputs
        ],
    }
    if not args.multiprocess:
        from unisparse_vllm.backend.stats import STATS

        result["stats"] = STATS.snapshot()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
