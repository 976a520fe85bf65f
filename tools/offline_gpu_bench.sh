#!/usr/bin/env bash
# `make bench-gpu` on a GPU machine that cannot reach PyPI or the Hub (a cluster's compute node, a lent box): stage
# everything it needs on a machine that can, carry one folder across, run.
#
#   tools/offline_gpu_bench.sh stage [PYTHON_VERSION]   # here (PyPI reachable): wheels + data + tokenizer -> .offline/
#   tools/offline_gpu_bench.sh run OUT_DIR [ARGS...]    # there (from the repo root, .offline/ beside it)
#
# The GPU machine is expected to have Python with a CUDA build of torch, accelerate and the usual scientific stack
# (numpy, pandas, pyarrow, pyyaml, tokenizers, huggingface_hub, safetensors, jinja2, psutil); `stage` fetches what
# rm_scale's 1-GPU benchmark adds on top, at the versions of constraints.txt: transformers, datasets, trl and their
# small pure-Python dependencies (~17 MB). DeepSpeed is not needed on one GPU (rm_scale imports it lazily; the 2-rank
# ZeRO-3 contenders run only where there are 2 GPUs). `run` installs the wheels into /tmp/rm_scale_site, ahead of the
# machine's own packages, and runs `python3 -m bench --gpu` on the carried hh-rlhf pairs and tokenizer.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="$here/.offline"

pin() { grep -E "^$1==" "$here/constraints.txt" | head -1; }

case "${1:-}" in
stage)
    py="${2:-3.12}"
    rm -rf "$dir" && mkdir -p "$dir/wheels" "$dir/tokenizer"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        "${platforms[@]}" -d "$dir/wheels" \
        "$(pin transformers)" "$(pin datasets)" "$(pin trl)" \
        dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 regex==2026.11.19
    data="$here/../shared/data/hh-rlhf-harmless-base/pairs.jsonl.gz"
    [[ -f "$data" ]] || { echo "offline_gpu_bench: $data not found (../shared/data)" >&2; exit 1; }
    cp "$data" "$dir/pairs.jsonl.gz"
    tok="$("$here/.venv/bin/python" -c 'from rm_scale.model.pretrained import smollm2_path; print(smollm2_path())')"
    cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$dir/tokenizer/"
    [[ -f "$tok/chat_template.jinja" ]] && cp "$tok/chat_template.jinja" "$dir/tokenizer/"
    du -sh "$dir"
    ;;
run)
    out="${2:?usage: $0 run OUT_DIR [ARGS...]}"
    shift 2
    [[ -d "$dir/wheels" ]] || { echo "offline_gpu_bench: $dir/wheels missing: run '$0 stage' where PyPI is reachable" >&2; exit 1; }
    site=/tmp/rm_scale_site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$dir"/wheels/*.whl
    export PYTHONPATH="$here:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
    python3 -c 'import torch, transformers, trl; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "trl", trl.__version__, torch.cuda.get_device_name(0))'
    python3 -m bench --gpu --data "$dir/pairs.jsonl.gz" --tokenizer "$dir/tokenizer" --out "$out" "$@"
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
