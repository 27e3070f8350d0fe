#!/usr/bin/env bash
# One unattended call on a lent GPU machine, time-boxed to GPU_CHECK_BUDGET_S (default 450 s, under the 8 minutes
# a call may take). Uses the machine's python3, torch and triton; lit_distill comes from this checkout via
# PYTHONPATH. Everything lands in $OUT (default bench/out/gpu-check):
#   1. env.txt: the GPU (nvidia-smi), torch/triton/CUDA versions, which imports work and what is missing;
#   2. the GPU correctness tests (`pytest -m gpu` on the test files that use the gpu-marked backends), split
#      into GPU_CHECK_SHARDS pytest processes side by side: tests-<i>.log and tests-<i>.xml (junit);
#   3. the BLOCK/warps sweep of the Triton statistics and gradient kernels (python3 -m bench.sweep): sweep/;
#   4. the benchmarks (python3 -m bench), lit-triton and eager (and Liger when installed) on logits forward_kl,
#      reverse_kl and jsd and on fused_linear forward_kl, the sparse-teacher loss (python3 -m bench.sparse, K=64),
#      then torch.compile on forward_kl: bench-*/;
#   5. SUMMARY.md, rewritten after every step: each step's time and status, test counts per file and backend,
#      the tables, the best launch config, and the total wall time.
# Each step runs under `timeout` within its cap and what the budget leaves, so a hang costs that step only;
# the CSVs are written row by row, so a step cut short keeps what it measured. steps.log says what was cut;
# the exit status is 1 when a step failed or was cut.
# `bash bench/gpu_check.sh --dry-run` runs the same steps on a CPU at tiny sizes (tests/test_bench.py does).
set -uo pipefail
out="${OUT:-bench/out/gpu-check}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
budget=${GPU_CHECK_BUDGET_S:-450}
shards=${GPU_CHECK_SHARDS:-8}
reserve=15 # seconds kept for the last summary
start=$SECONDS
dry=0
if [[ ${1:-} == --dry-run ]]; then
    dry=1
    shards=2
    dev=(--device cpu --reps 1 --rows 8 --vocab 300 --hidden 16)
    divergences=(forward_kl) modes=(fwd) fast=(lit-torch eager) slow=(eager lit-torch)
    sweep_args=(--device cpu --rows 2 --vocab 300 --row-configs 128x4 256x8 --grad-configs 64x4 --reps 1)
    sparse_args=(--device cpu --rows 8 --vocab 300 --slots 8 --reps 1)
else
    dev=(--device cuda --rows 8192 --vocab 128256 --hidden 4096)
    divergences=(forward_kl reverse_kl jsd) modes=(fwd+bwd fwd) fast=(lit-triton eager liger) slow=(eager compile)
    sweep_args=(--device cuda)
    sparse_args=(--device cuda --rows 8192 --vocab 128256 --slots 64 --dtype bfloat16 --reps 20)
fi

log() { echo "[$((SECONDS - start))s] $*" | tee -a "$out/steps.log"; }

# limit CAP: the seconds a step may take (its cap, or what the budget leaves); 0 when too little is left.
limit() {
    local left=$((budget - (SECONDS - start) - reserve - 10)) # 10: timeout's grace before its KILL
    ((left > $1)) && left=$1
    ((left < 15)) && left=0
    echo "$left"
}

# record NAME RC SECONDS LIMIT: one line of steps.tsv (name, exit status, seconds, status).
record() {
    local status=ok
    ((${2} != 0)) && status="failed (exit $2)"
    ((${2} == 124 || ${2} == 137)) && status="CUT: timed out after ${4}s"
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$status" >>"$out/steps.tsv"
    log "$1: $status in ${3}s"
}

# step NAME CAP COMMAND...: COMMAND under timeout, output in NAME.log (its tail echoed), then the summary.
step() {
    local name=$1 t0=$SECONDS lim
    lim=$(limit "$2")
    shift 2
    if ((lim == 0)); then
        printf '%s\t-\t0\tCUT: no time left in the budget\n' "$name" >>"$out/steps.tsv"
        log "$name: CUT, no time left in the budget"
        return
    fi
    log "$name: start (limit ${lim}s): $*"
    timeout -k 10 "$lim" "$@" >"$out/$name.log" 2>&1
    record "$name" $? $((SECONDS - t0)) "$lim"
    tail -n 30 "$out/$name.log"
    summarize
}

summarize() {
    python3 - "$out" $((SECONDS - start)) "$budget" "$dry" <<'PY' || echo "the summary failed" >&2
import csv, glob, os, re, sys
import xml.etree.ElementTree as ET

out, elapsed, budget, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"


def path(*parts):
    return os.path.join(out, *parts)


def read(file):
    return open(file, errors="replace").read() if os.path.exists(file) else ""


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]


def csv_rows(*patterns):
    files = [f for p in patterns for f in sorted(glob.glob(path(p)))]
    return [r for f in files for r in csv.DictReader(open(f, newline=""))]


def outcomes():
    """nodeid -> outcome, from each shard's junit XML, or from its -v log when it was cut before writing it."""
    got = {}
    for log_file in sorted(glob.glob(path("tests-*.log"))):
        xml = log_file[:-4] + ".xml"
        if os.path.exists(xml):
            for case in ET.parse(xml).iter("testcase"):
                module = ".".join(case.get("classname", "").split(".")[:2]).replace(".", "/") + ".py"
                kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
                got[f"{module}::{case.get('name')}"] = {"failure": "failed", "error": "error"}.get(
                    kinds[0] if kinds else "", "skipped" if kinds else "passed")
        else:
            for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", read(log_file), re.M):
                got[m[1]] = m[2].lower()
    return got


lines = [f"# GPU check summary{' (dry run on a CPU)' if dry else ''}", "",
         f"Wall time: {elapsed} s when this was written (budget {budget} s).", "", "```", read(path("env.txt")).strip(), "```"]
steps = [dict(zip(("step", "exit", "seconds", "status"), l.split("\t"))) for l in read(path("steps.tsv")).splitlines()]
lines += ["", "## Steps", "", *table(steps, ["step", "exit", "seconds", "status"])]

ids = [l for l in read(path("gpu-test-ids.txt")).splitlines() if "::" in l]
got = outcomes()
groups = {}
for nodeid in ids or list(got):
    backend = re.search(r"(triton|torch)-(cuda|cpu|interpreter)", nodeid)
    key = (nodeid.split("::")[0], backend[0] if backend else "")
    counts = groups.setdefault(key, {"file": key[0], "backend": key[1]})
    outcome = got.get(nodeid, "not run")
    counts[outcome] = counts.get(outcome, 0) + 1
total = {"file": "**all**", "backend": ""}
for counts in groups.values():
    for k, v in counts.items():
        if isinstance(v, int):
            total[k] = total.get(k, 0) + v
kinds = [k for k in ("passed", "failed", "error", "skipped", "not run", "xfail", "xpass") if k in total]
for counts in groups.values():
    for k in kinds:
        counts.setdefault(k, 0)
cols = ["file", "backend", *kinds]
lines += ["", f"## GPU tests: {len(ids)} collected", "", *table([*groups.values(), total], cols)]
bad = sorted(n for n, o in got.items() if o in ("failed", "error"))
lines += [f"- {o}: `{n}`" for n in bad[:40] for o in [got[n]]]
if "not run" in total:
    lines.append("- not run: a shard was cut by its time limit or failed to start (tests-<i>.log)")
if "error" in read(path("collect.log")).lower():
    lines.append("- collection reported errors: see collect.log")

sweep = csv_rows("sweep/*.csv")
for r in sweep:
    cap = r.get("row_registers", "")
    r["row"] = f"{r['row_block']}x{r['row_warps']}" + (f"x{cap}" if cap not in ("", "-") else "")
    r["grad"] = f"{r['grad_block']}x{r['grad_warps']}" if r["grad_block"] else "-"
lines += ["", "## Launch-config sweep (BLOCKxWARPS[xREGISTERS])", ""]
lines += [l for l in read(path("sweep.log")).splitlines() if l.startswith(("best ", "default launch_config"))]
cols = ["divergence", "mode", "config", "row", "grad", "ms", "ms_p20", "ms_p80", "abs_loss_diff_vs_default",
        "grad_rel_diff_vs_default", "error"]
lines += ["", *table(sweep, cols)] if sweep else ["(no sweep results)"]

steps_order = ("logits", "fused", "compile-logits", "compile-fused")  # bench-sparse: its own table below
bench = csv_rows(*(f"bench-{s}/*.csv" for s in steps_order))
lines += ["", "## Benchmarks", ""]
cols = ["case", "divergence", "mode", "shape", "dtype", "provider", "ms", "extra_MiB", "rate", "rate_unit",
        "speedup_vs_eager", "abs_loss_diff_vs_eager"]
lines += table(bench, cols) if bench else ["(no benchmark results)"]
notes = {l for f in glob.glob(path("bench-*.log")) for l in read(f).splitlines() if l.startswith(("FAILED", "skipped:"))}
lines += [f"- {l}" for l in sorted(notes)]
if bench:
    lines += ["", f"Device: {bench[0]['device']}, torch {bench[0]['torch']}, triton {bench[0]['triton']}, {bench[0]['date']}"]
sparse = read(path("bench-sparse.log")).splitlines()
lines += ["", "## Sparse-teacher loss (bench/sparse.py)", "", "```", *(sparse[-15:] or ["(not run)"]), "```"]

with open(path("SUMMARY.md.tmp"), "w") as f:
    f.write("\n".join(lines) + "\n")
os.replace(path("SUMMARY.md.tmp"), path("SUMMARY.md"))
PY
}

# 1. The machine and the imports.
: >"$out/steps.tsv"
{
    echo "date: $(date -u +%FT%TZ), host cores: $(nproc), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi >/dev/null; then
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
} >"$out/env.txt" 2>&1
step imports 60 python3 - <<'PY'
import importlib
import sys

print("python", sys.version.split()[0], sys.executable)
needed = {
    "torch": "everything", "triton": "the kernels and the timings", "numpy": "torch and Triton's tools",
    "pytest": "the GPU tests", "lightning": "the GPU tests (tests/helpers.py)",
    "transformers": "the GPU tests (tests/helpers.py)", "matplotlib": "optional: the benchmark plots",
    "liger_kernel": "optional: the Liger provider", "xdist": "optional: not used (the tests are split by hand)",
}
missing = []
for name, why in needed.items():
    try:
        module = importlib.import_module(name)
        print(f"ok       {name} {getattr(module, '__version__', '')}")
    except Exception as error:  # any import failure is what we report
        missing.append(name)
        print(f"MISSING  {name} ({why}): {type(error).__name__}: {error}")
sys.path.insert(0, "tests")
for name in ("lit_distill.kernels.triton_backend", "bench.sweep", "bench.harness", "helpers"):
    try:
        importlib.import_module(name)
        print(f"ok       import {name}")
    except Exception as error:
        missing.append(name)
        print(f"FAILED   import {name}: {type(error).__name__}: {error}")
import torch

gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}")
print("missing or failing:", " ".join(missing) or "nothing")
PY
grep -E "^(python|ok |MISSING|FAILED|torch |missing)" "$out/imports.log" >>"$out/env.txt"
summarize

# 2. The GPU tests, in shards of consecutive test ids (a test function's variants share compiled kernels).
mapfile -t files < <(grep -lE 'backend_device|pytest\.mark\.gpu|requires_cuda' tests/test_*.py)
step collect 60 python3 -m pytest -o addopts="" --collect-only -q -m gpu -p no:cacheprovider --continue-on-collection-errors "${files[@]}"
grep -E '^tests/[^ ]+::' "$out/collect.log" >"$out/gpu-test-ids.txt"
total=$(wc -l <"$out/gpu-test-ids.txt")
lim=$(limit 180)
if ((lim == 0)); then
    printf 'tests\t-\t0\tCUT: no time left in the budget\n' >>"$out/steps.tsv"
else
    log "tests: $total ids from ${files[*]} in $shards shards (limit ${lim}s each)"
    t0=$SECONDS
    for ((i = 0; i < shards; i++)); do
        if ((total > 0)); then
            awk -v n="$shards" -v i="$i" -v t="$total" 'int((NR - 1) * n / t) == i' "$out/gpu-test-ids.txt" >"$out/tests-$i.ids"
        else # collection failed: one process runs the files itself and its log says why
            ((i > 0)) && break
            printf '%s\n' -m gpu "${files[@]}" >"$out/tests-$i.ids"
        fi
        mapfile -t ids <"$out/tests-$i.ids"
        ((${#ids[@]} == 0)) && continue
        (
            OMP_NUM_THREADS=2 timeout -k 10 "$lim" python3 -m pytest -o addopts="" -v -rfE --tb=short -p no:cacheprovider \
                --junitxml="$out/tests-$i.xml" "${ids[@]}" >"$out/tests-$i.log" 2>&1
            record "tests-$i" $? $((SECONDS - t0)) "$lim"
        ) &
    done
    wait
    for f in "$out"/tests-*.log; do tail -n 3 "$f"; done
fi
summarize

# 3. The launch-config sweep.
step sweep 120 python3 -m bench.sweep --out "$out/sweep" "${sweep_args[@]}"

# 4. The benchmarks: the fast providers first, then torch.compile (slow to compile) on forward KL only.
step bench-logits 90 python3 -m bench --case logits --divergence "${divergences[@]}" --modes "${modes[@]}" \
    --providers "${fast[@]}" --out "$out/bench-logits" "${dev[@]}"
step bench-fused 60 python3 -m bench --case fused_linear --divergence forward_kl --modes "${modes[0]}" \
    --providers "${fast[@]}" --out "$out/bench-fused" "${dev[@]}"
step bench-sparse 45 python3 -m bench.sparse "${sparse_args[@]}" --out "$out/bench-sparse"
step bench-compile-logits 120 python3 -m bench --case logits --divergence forward_kl --modes "${modes[@]}" \
    --providers "${slow[@]}" --out "$out/bench-compile-logits" "${dev[@]}"
step bench-compile-fused 90 python3 -m bench --case fused_linear --divergence forward_kl --modes "${modes[0]}" \
    --providers "${slow[@]}" --out "$out/bench-compile-fused" "${dev[@]}"

log "done in $((SECONDS - start))s; summary in $out/SUMMARY.md"
summarize
cat "$out/SUMMARY.md"
! grep -qv $'\tok$' "$out/steps.tsv" # exit status 1 when a step failed or was cut
