#!/usr/bin/env bash
# The GPU check, one command: versions and the GPU, the real-size training benchmark of stages 1 and 2, then
# tests/test_cuda.py, then stage 0's benchmark. Each part has its own time limit and runs whatever the part before
# it returned, so a failing test never costs the throughput figures; a summary ends it.
#
#   bash dev/gpu_check.sh          # one GPU; the time limits of its parts are in LIMITS
#   bash dev/gpu_check.sh --cpu    # the same plumbing on a CPU at the tiny size (tests/test_bench.py runs it)
#
# It runs from the repository root wherever it is called from. Logs go to $OUT if it is set, else out/gpu_check/
# (under the repository root). The exit status is 0 only if every part passed. Uses python3 (else python), or $PYTHON.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
LOGS=${OUT:-out/gpu_check}
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1
TESTS=${GPU_CHECK_TESTS:-tests/test_cuda.py}  # the plumbing test points this at a file of its own

if [ "${1:-}" = "--cpu" ]; then
    MODE=cpu
    BENCH=(--size=tiny --device=cpu --dtype=float32 --batch_size=4 --steps=1 --warmup=1 --threads=1)
    LIMITS=(120 180 180 180 180)  # generous: a shared CI machine
else
    MODE=cuda
    # batch 128 in bf16 at the real sizes (each stage's peak memory is in the summary)
    BENCH=(--size=real --device=cuda --dtype=bfloat16 --batch_size=128 --steps=3 --warmup=2)
    # seconds: versions; stage 1, stage 2 (each: start-up and random init on the GPU, a FLOP-counting step, 2 + 3
    # timed + 3 profiled steps); the CUDA tests (the tiny world, tiny training runs, a torchrun); stage 0 (the LLM
    # only). About 1.5 times what each part took on an H200 (docs/speed.md), stage 1 more
    LIMITS=(30 130 90 240 60)
fi

status=0
part() {  # part NAME LIMIT COMMAND...: run under `timeout`, log to $LOGS/NAME.log, remember the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - t0))" > "$LOGS/$name.rc"
    tail -n 3 "$LOGS/$name.log"
    [ "$rc" = 0 ] || status=1
}

part versions "${LIMITS[0]}" "$PY" - "$MODE" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

need = {"torch": (2, 3), "transformers": (5, 0), "timm": (1, 0)}  # as requirements.txt
found = {}
for name, least in need.items():
    try:
        found[name] = version(name)
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed: this code needs {name} >= {'.'.join(map(str, least))}")
print(f"python {sys.version.split()[0]} | " + " | ".join(f"{name} {v}" for name, v in found.items()))
for name, least in need.items():
    if tuple(int(x) for x in found[name].split("+")[0].split(".")[:2]) < least:
        sys.exit(f"{name} {found[name]} is too old: this code needs {name} >= {'.'.join(map(str, least))}")
if sys.argv[1] == "cuda":
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to torch (run with --cpu for the plumbing only)")
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
else:
    print("GPU: none (--cpu: tiny sizes)")
EOF
[ "$status" = 0 ] || exit 1  # nothing else can run: the reason is printed above, in the first seconds
part bench_stage1 "${LIMITS[1]}" "$PY" -m dev.bench --stage=1 "${BENCH[@]}"
part bench_stage2 "${LIMITS[2]}" "$PY" -m dev.bench --stage=2 "${BENCH[@]}" --compare_hf=False
COLUMNS=400 part tests "${LIMITS[3]}" "$PY" -m pytest -q -rfE -p no:cacheprovider "$TESTS"
part bench_stage0 "${LIMITS[4]}" "$PY" -m dev.bench --stage=0 "${BENCH[@]}"

"$PY" - "$LOGS" <<'EOF' | tee "$LOGS/summary.txt"
import os, re, sys
logs = sys.argv[1]

def read(name):
    path = os.path.join(logs, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""

def outcome(name):
    rc, secs = (read(name + ".rc").split() or ["?", "?"])
    state = {"0": "ok", "124": "TIMED OUT", "137": "KILLED (time limit)"}.get(rc, f"FAILED (exit {rc})")
    return f"{state}, {secs} s"

print(f"=== GPU check summary (logs in {logs})")
versions = read("versions.log").strip().splitlines()
print("\n".join(versions[-2:]) if versions else "versions: no output")
print(f"versions: {outcome('versions')}")
for stage in (1, 2, 0):
    name = f"bench_stage{stage}"
    log = read(name + ".log")
    speed = re.search(r"\| ([\d.]+) samples/s", log)
    mfu = re.search(r"MFU ([^|]+?) \|", log)
    mem = re.search(r"peak memory ([\d.]+ \S+)", log)
    figures = (f"{speed.group(1)} img/s, MFU {mfu.group(1).strip()}, peak {mem.group(1)}" if speed and mem
               else "no figures")
    error = [l for l in log.splitlines() if re.match(r"\w*(Error|Exception)\b", l)]
    print(f"stage {stage}: {figures} [{outcome(name)}]" + (f" {error[-1][:200]}" if error else ""))
tests = read("tests.log")
counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", tests.splitlines()[-1] if tests.strip() else "")
print(f"tests: {', '.join(f'{n} {what}' for n, what in counts) or 'no result'} [{outcome('tests')}]")
for line in tests.splitlines():
    if line.startswith(("FAILED ", "ERROR ")):
        print("  " + line[:300])
EOF
exit $status
