#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md: Llama-2-7B shape at bf16 and Q4_K, InferFlux's runtime beside
# transformers' own generate on the same GPU. Needs an NVIDIA GPU with jax[cuda] (and torch + transformers
# for the baseline); about 16 GB of GPU memory for the bf16 model, 40 GB for batch 256.
#
#   bash benchmarks/gpu_recipe.sh [STEP ...]     STEP: pallas bf16 q4k sweep hf (default: all, in that order)
#   (SHAPE, BATCHES, PROMPT_LEN, PREFILL_RUNS, SWEEP override the defaults: llama-2-7b, 1,16,64,256, 2048, 20,
#   128,512,2048,4000; e.g. SHAPE=tiny BATCHES=1,4 PROMPT_LEN=128 PREFILL_RUNS=3 SWEEP=128,256 to try it on a CPU)
#
# Results (JSON per step, every step's output in log.txt) go to $OUT (default ./gpu-results). Models are made in $MODELS
# (default /tmp/inferflux-bench-models): random weights of the real shape, nothing is downloaded.
set -u -o pipefail
OUT=${OUT:-./gpu-results}
MODELS=${MODELS:-/tmp/inferflux-bench-models}
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
mkdir -p "$OUT" "$MODELS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BATCHES=${BATCHES:-1,16,64,256}
SHAPE=${SHAPE:-llama-2-7b}
PROMPT_LEN=${PROMPT_LEN:-2048}
PREFILL_RUNS=${PREFILL_RUNS:-20}
SWEEP=${SWEEP:-128,512,2048,4000}

run() {  # run NAME CMD...: one step, its output appended to $OUT/log.txt; a failure does not stop the others
    local name=$1 rc; shift
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.txt.part" 2>&1; rc=$?
    cat "$OUT/$name.txt.part" >> "$OUT/log.txt"; tail -n 30 "$OUT/$name.txt.part"; rm -f "$OUT/$name.txt.part"
    [ $rc -eq 0 ] || echo "!! $name failed (exit $rc)" | tee -a "$OUT/log.txt"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(pallas bf16 q4k sweep hf)
for step in "${steps[@]}"; do
    case $step in
    pallas)  # the Triton paged-attention kernel compiled for the GPU and checked against the reference
        JAX_PLATFORMS=cuda run pallas "$PY" -m pytest -q -p no:cacheprovider tests/test_paged_attention.py ;;
    bf16)
        run ifx_bf16 "$PY" -m benchmarks.bench_decode --make $SHAPE:BF16 --cache-dir "$MODELS" \
            --set dtype=bfloat16 --batch "$BATCHES" --prompt-len "$PROMPT_LEN" --prefill-runs "$PREFILL_RUNS" --json "$OUT/ifx_bf16.json" ;;
    q4k)
        run ifx_q4k "$PY" -m benchmarks.bench_decode --make $SHAPE:Q4_K --cache-dir "$MODELS" \
            --set dtype=bfloat16 --batch "$BATCHES" --prompt-len "$PROMPT_LEN" --prefill-runs "$PREFILL_RUNS" --json "$OUT/ifx_q4k.json" ;;
    sweep)  # decode step time against context length, batch 1 and 16
        run ifx_sweep "$PY" -m benchmarks.bench_decode --make $SHAPE:BF16 --cache-dir "$MODELS" \
            --set dtype=bfloat16 --batch 16 --prefill-runs 1 --prompt-len 128 \
            --context-sweep "$SWEEP" --sweep-batch 16 --json "$OUT/ifx_sweep.json" ;;
    hf)
        run hf_bf16 "$PY" -m benchmarks.hf_baseline --shape "$SHAPE" --dtype bfloat16 --batch "$BATCHES" \
            --prompt-len "$PROMPT_LEN" --prefill-runs "$PREFILL_RUNS" --json "$OUT/hf_bf16.json" ;;
    *) echo "unknown step $step (pallas bf16 q4k sweep hf)"; exit 2 ;;
    esac
done
