#!/usr/bin/env bash
# The issue-7 GPU check as one prepared device run (H200 task machines: Python 3.12 with torch,
# transformers, scikit-learn, pandas, tqdm; no transformer-lens, datasets or plotly, no network).
#
#   bash benchmarks/gpu_kit.sh prepare   # here (package registries reachable): the missing wheels -> .whl/
#   bash benchmarks/gpu_kit.sh run       # there: one `run` call with carry [".whl"], timeout_s ~540;
#                                        # $OUT gets gpu.txt, smoke.txt, gpu_sweep.log, RESULTS.md
#   PY=.venv/bin/python bash benchmarks/gpu_kit.sh run --quick   # here: the same steps on CPU
#
# `run` installs the wheels into /tmp/site, checks that the package imports and sees the GPU, then
# runs `benchmarks/gpu_sweep.py --append` (fp32 and bf16, 195 x 1024 tokens per evaluation; random
# tokens, since ../shared does not travel -- timing does not depend on the token values) and copies the
# appended benchmarks/RESULTS.md back. Extra arguments go to gpu_sweep.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=(transformer-lens==3.9.0 better-abc==0.0.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 plotly==7.1.0)

case "${1:-}" in
prepare)
    rm -rf .whl && mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -la .whl && du -sh .whl
    ;;
run)
    shift
    OUT=${OUT:-/tmp/gpu_kit_out}
    mkdir -p "$OUT"
    if [ "$PY" = python3 ]; then  # the device machine: install the carried wheels beside its packages
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD
    fi
    export PYTHONUNBUFFERED=1
    # datasets 5.2 needs pyarrow >= 24 and huggingface-hub >= 1.31 (the image had hub 1.33; pyarrow's version
    # was not recorded): say so plainly rather than fail deep inside an import
    "$PY" -c "import pyarrow, huggingface_hub as h; print('pyarrow', pyarrow.__version__, 'huggingface_hub', h.__version__); assert int(pyarrow.__version__.split('.')[0]) >= 24, 'pyarrow < 24: carry a pyarrow>=24 cp312 wheel (55 MB) in .whl/'" | tee "$OUT/versions.txt"
    (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") | tee "$OUT/gpu.txt"
    "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/smoke.txt"
import torch, transformer_lens, qk_subspace as qs
from transformer_lens import HookedTransformer, HookedTransformerConfig
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "qk_subspace", qs.__version__, qs.__file__)
dev = "cuda" if torch.cuda.is_available() else "cpu"
cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50,
                              act_fn="gelu_new", normalization_type="LN", device=dev, seed=0)
m = HookedTransformer(cfg).eval()
toks = torch.randint(0, 50, (4, 32), device=dev)
fast, std = qs.perplexity(m, toks, progress=False), qs.perplexity(m, toks, progress=False, fast=False)
W = qs.qk_matrices(m)
with qs.inject_qk(m, qs.HeadPCA().fit(W).reconstruct(K=W.shape[0] * W.shape[1])) as edit:
    k_all = qs.perplexity(m, toks, progress=False)
print(f"smoke: fast {fast.mean_nll:.6f} ({fast.path}) standard {std.mean_nll:.6f}; K=all {k_all.mean_nll:.6f}, "
      f"max residual {float(edit.residual.max()):.1e}")
assert abs(fast.mean_nll - std.mean_nll) / std.mean_nll < 1e-5 and abs(k_all.mean_nll - fast.mean_nll) < 1e-5
PYEOF
    set -o pipefail
    "$PY" benchmarks/gpu_sweep.py --append "$@" 2>&1 | tee "$OUT/gpu_sweep.log"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    ;;
*)
    echo "usage: bash benchmarks/gpu_kit.sh prepare | run [gpu_sweep.py arguments]" >&2
    exit 2
    ;;
esac
