#!/bin/bash
# The GPU session's benchmark jobs, run in the background on the device machine so that
# short calls can keep it warm (and carry model parts) while they run:
#
#   setsid nohup bash benchmarks/gpu_jobs.sh JOB... > /tmp/logs/jobs.log 2>&1 < /dev/null &
#
# JOBs, in the order given: kernels (GPU test run), bench (bench_attention), cudagraphs
# (e2e tokens job with CUDA graphs), ttft (e2e TTFT on Llama-3.1-8B dummy weights),
# convert (waits for the Qwen2.5-Coder-0.5B GGUF's GGUF_PARTS parts, default 16, in /tmp/gguf
# (benchmarks/device_transfer.sh carries them), makes /tmp/qwen05 once: jobs started side by
# side can each begin with it),
# ttft-qwen (e2e TTFT on Qwen2.5-Coder-0.5B, real weights, essay prompts, with the shipped
# calibrated profile too: where the host's work per layer shows;
# TTFT_CHUNK tokens a step, default 16384; needs /tmp/data/essays),
# calibrate (unisparse calibrate on the GPU: Qwen at CALIB_TOKENS tokens, default 32768, target
# recall CALIB_RECALL, default 0.93, or mean density CALIB_DENSITY where set, c_q 4, c_k
# CALIB_C_K, default 16, c_h 1, peak term
# CALIB_MAX_MIX, default 0.0, block scores CALIB_ESTIMATOR, default unisparse ->
# /tmp/results/qwen05-calibrated-*.yaml; ~25 s on an H200 at 32K),
# tp2 (e2e at tensor parallel 2: Qwen tokens vs FLASH_ATTN, serve and TTFT on Llama-8B
# shapes), ruler (eval_ruler on Qwen with the RULER_SPEC file; RULER_LENGTHS overrides its
# lengths, e.g. one length per run so that each finished length is kept; RULER_SAMPLES and
# RULER_SEED its samples per task and first seed: sample i uses seed + i, so RULER_SEED=25
# RULER_SAMPLES=75 adds samples 25-99 to a 25-sample run; several seeds, e.g. RULER_SEED='0 50'
# with RULER_SAMPLES=50, run one after the other, each kept on its own, so that a machine
# lost in the second half keeps the first (eval_ruler --combine joins them), or side by side
# with RULER_SIDE_BY_SIDE=1 (a 0.5B model's engines leave the GPU idle much of the time: the
# twelfth run's 8 engines at once finished sooner than halves in turn); RULER_GPUS GPUs,
# RULER_PARALLEL
# engines at once; RULER_ENGINE_ARGS, JSON, replaces the spec's engine_args: a fixed memory
# share per engine lets two ruler jobs share one GPU; RULER_ONLY, config names separated by
# ';', runs only those).
# Two ruler jobs side by side need distinct RULER_LENGTHS, RULER_SEED or RULER_TAG: they
# name the log and the results (ruler_<tag>_<lengths>_s<seed>), so that one seed's configs
# can also run as separate jobs: ruler-queue runs RULER_QUEUE, lines "<tag> <seed> <config
# name>", each one engine on RULER_SAMPLES samples from that seed, RULER_MAX_ENGINES (9) at
# once, in the order given (the fifteenth session's launcher, RESULTS.md section 4).
# Expects the shared vLLM bundle installed in /tmp/vllm-site, this checkout installed
# (`pip install -e .`), and for `ruler`: /tmp/data/essays, /tmp/data/qa (squad.json,
# hotpotqa.json) and the gguf wheel in /tmp/gguf-site. Logs go to /tmp/logs/<job>.log,
# results to /tmp/results; each finished job's files are complete on their own.
set -u
export PYTHONPATH=/tmp/vllm-site:/tmp/gguf-site VLLM_USE_FLASHINFER_SAMPLER=0
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PATH=/tmp/vllm-site/bin:$PATH
RESULTS=/tmp/results LOGS=/tmp/logs
GGUF_PARTS=${GGUF_PARTS:-16}
RULER_SPEC=${RULER_SPEC:-benchmarks/ruler_specs/qwen05.yaml} RULER_LENGTHS=${RULER_LENGTHS:-}
RULER_SAMPLES=${RULER_SAMPLES:-} RULER_SEED=${RULER_SEED:-} RULER_ENGINE_ARGS=${RULER_ENGINE_ARGS:-}
RULER_ONLY=${RULER_ONLY:-} RULER_SIDE_BY_SIDE=${RULER_SIDE_BY_SIDE:-0} RULER_TAG=${RULER_TAG:-}
RULER_GPUS=${RULER_GPUS:-1} RULER_PARALLEL=${RULER_PARALLEL:-4}
RULER_QUEUE=${RULER_QUEUE:-} RULER_MAX_ENGINES=${RULER_MAX_ENGINES:-9}
TTFT_CHUNK=${TTFT_CHUNK:-16384} CALIB_TOKENS=${CALIB_TOKENS:-32768} CALIB_RECALL=${CALIB_RECALL:-0.93}
CALIB_ESTIMATOR=${CALIB_ESTIMATOR:-unisparse} CALIB_C_K=${CALIB_C_K:-16} CALIB_MAX_MIX=${CALIB_MAX_MIX:-0.0}
CALIB_DENSITY=${CALIB_DENSITY:-}
mkdir -p "$RESULTS" "$LOGS"
cd "$(dirname "$0")/.."

step() {
    local name=$1 rc
    shift
    echo "$(date +%T) start $name"
    "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    echo "$(date +%T) end $name rc=$rc"
    return $rc
}

for job in "$@"; do
    case $job in
    kernels)
        step kernels timeout 600 python3 -m pytest -q -p no:cacheprovider \
            tests/test_kernels.py tests/test_flash.py tests/test_baselines.py \
            tests/test_core_invariants.py tests/test_backend_units.py ;;
    bench)
        step bench timeout 500 python3 benchmarks/bench_attention.py \
            --seq 4096 32768 65536 131072 --out "$RESULTS/bench.json" ;;
    cudagraphs)
        step cudagraphs timeout 500 python3 benchmarks/e2e_vllm.py --skip serve ttft \
            --cuda-graphs --out "$RESULTS/e2e_cudagraphs.json" ;;
    ttft)
        step ttft timeout 600 python3 benchmarks/e2e_vllm.py --skip tokens serve \
            --out "$RESULTS/e2e_ttft.json" ;;
    convert)
        while [ "$(ls /tmp/gguf/part-* 2> /dev/null | wc -l)" -lt "$GGUF_PARTS" ]; do sleep 3; done
        # Jobs side by side may each start with convert: one converts, the others wait for it.
        (
            flock 9
            [ -e /tmp/qwen05.done ] || step convert bash -c "cat /tmp/gguf/part-* > /tmp/qwen.gguf \
                && python3 benchmarks/prepare_model.py --gguf /tmp/qwen.gguf /tmp/qwen05" \
                && touch /tmp/qwen05.done
        ) 9> /tmp/convert.lock ;;
    ttft-qwen)
        cat /tmp/data/essays/*.txt > /tmp/essays.txt
        step ttft-qwen timeout 600 python3 benchmarks/e2e_vllm.py --skip tokens serve \
            --ttft-model /tmp/qwen05 --ttft-text /tmp/essays.txt \
            --ttft-unisparse '{"profile": "qwen2.5-coder-0.5b-instruct"}' \
            --ttft-chunk "$TTFT_CHUNK" --lengths 16384 32768 \
            --out "$RESULTS/e2e_ttft_qwen.json" ;;
    tp2)
        step tp2 timeout 900 python3 benchmarks/e2e_vllm.py --tp 2 --tokens-model /tmp/qwen05 \
            --serve-model llama-8b --out "$RESULTS/e2e_tp2.json" ;;
    calibrate)
        target=(--target-recall "$CALIB_RECALL") tag=recall$CALIB_RECALL
        [ -n "$CALIB_DENSITY" ] && target=(--target-density "$CALIB_DENSITY") tag=density$CALIB_DENSITY
        name="${CALIB_ESTIMATOR}-${CALIB_TOKENS}-${tag}-ck${CALIB_C_K}-mix${CALIB_MAX_MIX}"
        step "calibrate_$name" timeout 900 python3 -m unisparse_vllm.cli \
            calibrate --model /tmp/qwen05 --text /tmp/data/essays/*.txt --tokens "$CALIB_TOKENS" \
            "${target[@]}" --c-q 4 --c-k "$CALIB_C_K" --c-h 1 \
            --max-mix "$CALIB_MAX_MIX" --estimator "$CALIB_ESTIMATOR" \
            --device cuda --out "$RESULTS/qwen05-calibrated-$name.yaml" ;;
    ruler)
        only=()
        if [ -n "$RULER_ONLY" ]; then
            IFS=';' read -ra only <<< "$RULER_ONLY"
            only=(--only "${only[@]}")
        fi
        read -ra seeds <<< "$RULER_SEED"
        for seed in "${seeds[@]:-}"; do
            name="ruler${RULER_TAG:+_$RULER_TAG}${RULER_LENGTHS:+_${RULER_LENGTHS// /_}}${seed:+_s$seed}"
            # shellcheck disable=SC2086  # the lengths are words
            step "$name" timeout 1700 python3 \
                benchmarks/eval_ruler.py --spec "$RULER_SPEC" --model /tmp/qwen05 \
                --haystack /tmp/data/essays --qa-data /tmp/data/qa \
                ${RULER_LENGTHS:+--lengths $RULER_LENGTHS} ${RULER_SAMPLES:+--samples $RULER_SAMPLES} \
                ${seed:+--seed $seed} "${only[@]}" \
                ${RULER_ENGINE_ARGS:+--engine-args "$RULER_ENGINE_ARGS"} \
                --parallel "$RULER_PARALLEL" --gpus "$RULER_GPUS" --out-dir "$RESULTS/$name" &
            [ "$RULER_SIDE_BY_SIDE" = 1 ] || wait $!
        done
        wait ;;
    ruler-queue)
        # One engine per (config, seed), RULER_MAX_ENGINES (default 9) at once, started in
        # RULER_QUEUE's order (the most wanted first: a machine given back early keeps them).
        while read -r tag seed config; do
            [ -n "$tag" ] || continue
            while [ "$(jobs -rp | wc -l)" -ge "$RULER_MAX_ENGINES" ]; do wait -n; done
            echo "$(date +%T) queue: $tag $seed $config"
            RULER_TAG=$tag RULER_SEED=$seed RULER_ONLY=$config RULER_PARALLEL=1 \
                bash benchmarks/gpu_jobs.sh ruler > "$LOGS/queue_${tag}_s$seed.log" 2>&1 &
        done <<< "$RULER_QUEUE"
        wait ;;
    *)
        echo "unknown job $job" ;;
    esac
done
echo ALLDONE
