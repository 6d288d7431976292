"""UNISPARSE inside vLLM on a GPU (the shared vLLM 0.26 bundle): correctness against
FLASH_ATTN (greedy tokens), the OpenAI server, and time to first token on Llama-3.1-8B
shapes with random weights (``load_format="dummy"``). Every engine runs in its own process;
each reports the sparse-path counters of every process that ran attention (one per rank
under tensor parallelism), read from ``UNISPARSE_STATS_PATH`` files.

    python benchmarks/e2e_vllm.py --out e2e.json [--lengths 32768 65536 131072]
    python benchmarks/e2e_vllm.py --tp 2 --tokens-model /tmp/qwen05 --serve-model llama-8b
    python benchmarks/e2e_vllm.py --skip tokens serve --ttft-model /tmp/qwen05 --lengths 32768
    python benchmarks/e2e_vllm.py --skip tokens serve --ttft-model /tmp/qwen05 --lengths 32768 \
        --ttft-text essays.txt --ttft-unisparse '{"profile": "qwen2.5-coder-0.5b-instruct"}' \
        --ttft-chunk 32768   # real weights; one more engine per --ttft-unisparse
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Every prefill through estimator, selection and kernel (no dense fallback at density 1).
SPARSE_SMALL = {
    "min_sparse_tokens": 0,
    "block_size": 64,
    "tau": 1.0,
    "dense_layers": [],
    "dense_above_density": None,
    "on_error": "raise",  # a failing sparse path fails the run instead of falling back
}


def worker(spec: dict) -> dict:
    """One engine, one job; runs in a child process."""
    from tiny_model import corpus
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=spec["model"],
        attention_backend=spec["backend"],
        enforce_eager=not spec.get("cuda_graphs", False),
        additional_config={"unisparse": spec.get("unisparse", {})},
        seed=0,
        gpu_memory_utilization=0.85,
        tensor_parallel_size=spec.get("tp", 1),
    )
    if spec["job"] == "tokens":
        llm = LLM(
            **kwargs, max_model_len=4096, max_num_batched_tokens=256, enable_prefix_caching=True
        )
        # varied text, so that a real model's continuations differ between prompts
        prompts = [
            "Write a Python function that tells whether a number is prime.",
            " ".join(corpus(12)),
            "Summarize this text in one sentence: " + " ".join(corpus(60)),
        ]
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
        result = {"tokens": [list(o.outputs[0].token_ids) for o in outs]}
    else:  # ttft
        text = spec.get("text")
        random_weights = {"load_format": "dummy", "skip_tokenizer_init": True}
        llm = LLM(
            **kwargs,
            **({} if text else random_weights),
            max_model_len=max(spec["lengths"]),
            max_num_batched_tokens=spec.get("chunk", 16384),
            enable_prefix_caching=False,
        )
        text_ids = None
        if text:
            tokenizer = llm.get_tokenizer()
            text_ids = tokenizer.encode(Path(text).read_text(errors="ignore"))
        params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
        llm.generate([{"prompt_token_ids": [1] * 1024}], params, use_tqdm=False)  # warm up
        result = {"ttft_s": {}}
        for n in spec["lengths"]:
            times = []
            for rep in range(2):
                # n - 1 prompt tokens: the generated one must fit in max_model_len
                ids = prompt_ids(n - 1, rep, text_ids)
                start = time.perf_counter()
                llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
                times.append(time.perf_counter() - start)
            result["ttft_s"][n] = min(times)
    return result


def prompt_ids(length: int, rep: int, text_ids: list[int] | None = None) -> list[int]:
    """A TTFT prompt of ``length`` tokens; ``rep`` makes each repetition a different prompt
    (no cache can serve it). From ``text_ids`` (the text cycled, starting ``rep`` thousand
    tokens in) for real weights, whose sparsity depends on the text; otherwise spread ids."""
    if not text_ids:
        return [(i * 7919 + rep) % 120000 + 1000 for i in range(length)]
    start = rep * 1000
    return [text_ids[(start + i) % len(text_ids)] for i in range(length)]


def process_counters(stats_dir: Path) -> dict[str, dict]:
    """Sparse-path counters per process (``UNISPARSE_STATS_PATH`` files, one per pid that
    ran a sparse step): sparse/dense prefill tokens summed over layers, layers, density."""
    counters = {}
    for path in sorted(stats_dir.glob("stats.*.json")):
        layers = json.loads(path.read_text())
        selected = sum(c["selected_blocks"] for c in layers.values())
        causal = sum(c["causal_blocks"] for c in layers.values())
        counters[path.name] = {
            "layers": len(layers),
            "sparse_tokens": sum(c["sparse_prefill_tokens"] for c in layers.values()),
            "dense_tokens": sum(c["dense_prefill_tokens"] for c in layers.values()),
            "density": round(selected / causal, 4) if causal else 1.0,
        }
    return counters


def run(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as stats_dir:
        env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "UNISPARSE_STATS_PATH": f"{stats_dir}/stats",
        }
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        counters = process_counters(Path(stats_dir))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}"}
    result = json.loads(line[-1][7:])
    if spec["backend"] == "UNISPARSE":
        result["counters_per_process"] = counters
    if spec.get("cuda_graphs"):  # vLLM's own report of what it captured
        log = proc.stdout + proc.stderr
        result["cudagraph_log"] = [x[-200:] for x in log.splitlines() if "graph" in x.lower()]
    return result


def serve_requests(serve_model: str, tiny: str, llama: Path) -> tuple[list[str], list]:
    """The server's model arguments and requests: the tiny model answers a completion and a
    chat; Llama-3.1-8B shapes (random weights, no tokenizer) one 32K-token prompt."""
    if serve_model == "tiny":
        model_args = ["--model", tiny, "--max-model-len", "4096"]
        requests = [
            ("completions", {"prompt": "the quick brown fox " * 40, "max_tokens": 8}),
            (
                "chat/completions",
                {"max_tokens": 8, "messages": [{"role": "user", "content": "lazy dog " * 50}]},
            ),
        ]
        return model_args, requests
    length = 32768
    model_args = ["--model", str(llama), "--load-format", "dummy", "--skip-tokenizer-init"]
    model_args += ["--max-model-len", str(length + 64)]
    ids = [(i * 7919) % 120000 + 1000 for i in range(length)]
    return model_args, [("completions", {"prompt": ids, "max_tokens": 4})]


def serve_check(model_args: list[str], requests: list, tp: int) -> dict:
    """``vllm serve --attention-backend unisparse`` answering ``requests``; reports their
    usage, the counters of every process that ran attention and ``/metrics``' sparse total."""
    port = 8123
    work = Path(tempfile.mkdtemp(prefix="unisparse-serve-"))
    (work / "prometheus").mkdir()
    env = {
        **os.environ,
        "UNISPARSE_STATS_PATH": str(work / "stats"),
        "PROMETHEUS_MULTIPROC_DIR": str(work / "prometheus"),
    }
    # top-k keeps the sparse path whatever random weights make of top-p
    config = SPARSE_SMALL | {"mode": "topk", "density": 0.1}
    # to a file: a pipe left unread would stall the server
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                *model_args,
                *("--served-model-name", "m", "--port", str(port)),
                *("--attention-backend", "unisparse", "--enforce-eager"),
                *("--gpu-memory-utilization", "0.5", "--tensor-parallel-size", str(tp)),
                *("--additional-config", json.dumps({"unisparse": config})),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError(f"the server exited with {server.returncode}") from None
                    time.sleep(1)
            out: dict = {}
            for path, body in requests:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/{path}",
                    json.dumps({"model": "m", **body}).encode(),
                    {"Content-Type": "application/json"},
                )
                reply = json.loads(urllib.request.urlopen(req, timeout=300).read())
                out[path] = reply["usage"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                metrics = reply.read().decode()
            out["metrics_sparse_tokens"] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("unisparse:prefill_tokens_total") and 'path="sparse"' in line
            )
            out["counters_per_process"] = process_counters(work)
            return out
        except (OSError, RuntimeError) as err:
            body = err.read().decode() if isinstance(err, urllib.error.HTTPError) else ""
            log_tail = (work / "server.log").read_text()[-4000:]
            return {"error": f"{err!r} {body}", "server_log": log_tail}
        finally:
            server.terminate()
            server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every engine")
    parser.add_argument(
        "--tokens-model", help="model folder of the tokens job (default: a tiny random Llama)"
    )
    parser.add_argument(
        "--serve-model",
        choices=["tiny", "llama-8b"],
        default="tiny",
        help="the server's model: the tiny one, or Llama-3.1-8B shapes with random weights",
    )
    parser.add_argument(
        "--ttft-model",
        help="model folder of the TTFT job; without --ttft-text only its config is read, the "
        "weights are random (default: Llama-3.1-8B shapes)",
    )
    parser.add_argument(
        "--ttft-text",
        type=Path,
        help="with --ttft-model: its real weights, and prompts cut from this text (the "
        "selection's density depends on real attention, which random weights do not have)",
    )
    parser.add_argument(
        "--ttft-unisparse",
        type=json.loads,
        action="append",
        default=[],
        metavar="JSON",
        help='one more TTFT engine: UNISPARSE with these settings, e.g. \'{"profile": '
        '"qwen2.5-coder-0.5b-instruct", "tau": 0.85}\' (repeatable)',
    )
    parser.add_argument(
        "--ttft-chunk",
        type=int,
        default=16384,
        help="max_num_batched_tokens of every TTFT engine (32768: a 32K prompt in one step)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["tokens", "serve", "ttft"])
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="the tokens job with CUDA graphs (not eager)"
    )
    args = parser.parse_args()
    if args.ttft_text and not args.ttft_model:
        parser.error("--ttft-text needs --ttft-model (a folder with weights and a tokenizer)")
    if args.ttft_text and not args.ttft_text.is_file():
        parser.error(f"--ttft-text {args.ttft_text}: no such file")
    from unisparse_vllm.config import ConfigError, resolve_config

    for settings in args.ttft_unisparse:  # a bad budget is refused before any engine starts
        try:
            if not isinstance(settings, dict):
                raise ConfigError(f"must be a JSON object of UniSparse settings, got {settings!r}")
            resolve_config(settings)
        except ConfigError as err:
            parser.error(f"--ttft-unisparse: {err}")
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    from tiny_model import build_tiny_llama

    report: dict = {}
    tiny = str(build_tiny_llama(Path("/tmp/unisparse-tiny"), head_dim=64))
    llama = Path("/tmp/llama-3.1-8b-config")
    llama.mkdir(exist_ok=True)
    (llama / "config.json").write_text(json.dumps(LLAMA_31_8B))
    if "tokens" not in args.skip:
        base = {
            "job": "tokens",
            "model": args.tokens_model or tiny,
            "cuda_graphs": args.cuda_graphs,
            "tp": args.tp,
        }
        engines = {
            "FLASH_ATTN": base | {"backend": "FLASH_ATTN"},
            "UNISPARSE (sparsity off: below min_sparse_tokens)": base | {"backend": "UNISPARSE"},
            "UNISPARSE (tau=1 through the sparse path)": base
            | {"backend": "UNISPARSE", "unisparse": SPARSE_SMALL},
        }
        if args.cuda_graphs:  # each engine compiles and captures: keep the pair that matters
            del engines["UNISPARSE (sparsity off: below min_sparse_tokens)"]
        report["tokens"] = {name: run(spec) for name, spec in engines.items()}
    if "serve" not in args.skip:
        report["serve"] = serve_check(*serve_requests(args.serve_model, tiny, llama), args.tp)
    if "ttft" not in args.skip:
        model = args.ttft_model or str(llama)
        base = {
            "job": "ttft",
            "model": model,
            "lengths": args.lengths,
            "tp": args.tp,
            "chunk": args.ttft_chunk,
        }
        if args.ttft_text:
            base["text"] = str(args.ttft_text)
        report["ttft"] = {
            "FLASH_ATTN": run(base | {"backend": "FLASH_ATTN"}),
            "UNISPARSE topk density 0.1": run(
                base | {"backend": "UNISPARSE", "unisparse": {"mode": "topk", "density": 0.1}}
            ),
            "UNISPARSE top_p tau 0.9 (default)": run(base | {"backend": "UNISPARSE"}),
        }
        for settings in args.ttft_unisparse:
            report["ttft"][f"UNISPARSE {json.dumps(settings)}"] = run(
                base | {"backend": "UNISPARSE", "unisparse": settings}
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
