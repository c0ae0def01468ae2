#!/usr/bin/env bash
# `make fuzz`: every fuzz target in fuzz/ under libFuzzer (AddressSanitizer,
# debug assertions) for a while each, starting from the checked-in seed
# corpus (fuzz/corpus/<target>) and every crash ever found
# (fuzz/regressions/<target>).
#
#   scripts/fuzz.sh [--time SECONDS] [--jobs N] [--merge] [--record] [TARGET...]
#
# --time     seconds per target (default $FUZZ_TIME, else 600)
# --jobs     targets fuzzed at once (default $FUZZ_JOBS, else 1); each
#            libFuzzer process uses one CPU, so up to the CPU count
# --merge    afterwards, add the inputs that found new coverage to
#            fuzz/corpus/<target> (libFuzzer's -merge=1), to be committed
# --record   write the run's table to docs/benchmarks.md (its fuzzing
#            section; `make fuzz` does, `make test`'s short run does not)
#
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the run;
# once fixed, the input goes to fuzz/regressions/<target>/, where
# `make test` replays it (fuzz-targets/tests/corpus.rs). The statistics of
# the run are written to fuzz/work/report.md.
#
# The machine's one Rust toolchain is stable; cargo-fuzz passes nightly
# flags (-Zsanitizer), which RUSTC_BOOTSTRAP=1 lets stable accept.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
time=${FUZZ_TIME:-600}
jobs=${FUZZ_JOBS:-1}
merge=0
record=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time) time=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --merge) merge=1; shift ;;
        --record) record=1; shift ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
cd "$repo"
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^tegmen-fuzz$')
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --quiet --locked cargo-fuzz@0.13.2
fi
export RUSTC_BOOTSTRAP=1
echo "fuzz: building ${#targets[@]} targets (AddressSanitizer, debug assertions)"
cargo fuzz build 2>&1 | grep -vE "^ *(Compiling|Finished|Blocking)" || true
bin=fuzz/target/x86_64-unknown-linux-gnu/release

mkdir -p fuzz/work/tmp
report=fuzz/work/report.md
{
    echo "| target | seconds | executions | exec/s | corpus (seeds → after) | result |"
    echo "|---|---:|---:|---:|---|---|"
} > "$report"
# One target: its run, its table row in fuzz/work/<target>.row.
fuzz_one() {
    local t=$1
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t" "fuzz/regressions/$t" "fuzz/corpus/$t"
    local seeds log rc execs rate after result
    seeds=$(find "fuzz/corpus/$t" -type f | wc -l)
    log="fuzz/work/$t.log"
    echo "fuzz: $t for ${time} s"
    set +e
    "$bin/$t" -max_total_time="$time" -print_final_stats=1 -timeout=20 -rss_limit_mb=4096 \
        -artifact_prefix="fuzz/artifacts/$t/" "fuzz/work/$t" "fuzz/corpus/$t" "fuzz/regressions/$t" > "$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    after=$(( $(find "fuzz/work/$t" -type f | wc -l) + seeds ))
    if [ $rc -eq 0 ]; then
        result=ok
    else
        result="FAILED (exit $rc, input in fuzz/artifacts/$t/)"
        grep -E "panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer|SUMMARY" "$log" | head -5 >&2 || true
    fi
    echo "| $t | $time | ${execs:-?} | ${rate:-?} | $seeds → $after | $result |" > "fuzz/work/$t.row"
    if [ $merge -eq 1 ] && [ $rc -eq 0 ]; then
        # The merge control file must be where the jailed fs target sees it.
        TMPDIR="$repo/fuzz/work/tmp" "$bin/$t" -merge=1 -artifact_prefix="fuzz/artifacts/$t/" "fuzz/corpus/$t" "fuzz/work/$t" >> "$log" 2>&1
    fi
}
running=0
for t in "${targets[@]}"; do
    rm -f "fuzz/work/$t.row"
    if [ "$jobs" -le 1 ]; then
        fuzz_one "$t"
        continue
    fi
    if [ $running -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    fuzz_one "$t" &
    running=$((running + 1))
done
wait
# The rows in the targets' order; a target without one did not finish.
failed=()
for t in "${targets[@]}"; do
    if [ -f "fuzz/work/$t.row" ]; then
        cat "fuzz/work/$t.row" >> "$report"
        grep -q "| ok |$" "fuzz/work/$t.row" || failed+=("$t")
    else
        echo "| $t | $time | ? | ? | ? | FAILED (no result) |" >> "$report"
        failed+=("$t")
    fi
done
cat "$report"
if [ $record -eq 1 ]; then
    python3 - "$report" "$time" "${targets[*]}" "$jobs" <<'PY'
import os, platform, sys, time
report, secs, targets, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
path = "docs/benchmarks.md"
heading = "## Fuzzing (`make fuzz`)"
lines = [
    heading,
    "",
    f"`scripts/fuzz.sh --time {secs}{f' --jobs {jobs}' if jobs > 1 else ''} --record` on "
    f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, kernel {platform.release()}: each target for "
    f"{secs} s ({f'{jobs} at a time, each libFuzzer process on one CPU' if jobs > 1 else 'alone'}) "
    "under libFuzzer with AddressSanitizer and debug assertions, from the checked-in corpus "
    "(fuzz/corpus) and the regression inputs.",
    "",
    *open(report).read().rstrip("\n").split("\n"),
    "",
    "What the fuzzers have found, and the fixes: fuzz/regressions/README.md.",
    "",
]
sys.path.insert(0, "scripts/bench")
from bench import replace_section  # the one section writer of docs/benchmarks.md
replace_section(path, heading, lines)
PY
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in ${failed[*]}; logs in fuzz/work/<target>.log" >&2
    exit 1
fi
