#!/usr/bin/env bash
# Per-task cost of dump and restore: a tree of N processes, and one process
# with N threads (default N=100), images on tmpfs. Usage: bench/tasks.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
rounds=${2:-3}
. bench/lib.sh
bench_mount 1g
cc -O2 -pthread -o "$work/many" bench/manytasks.c
echo "N=$n, rounds: $rounds, kernel $(uname -r), $(nproc) cores"
for mode in procs threads; do
    for r in $(seq "$rounds"); do
        bench_cycle "$work/many.log" "$work/many" "$mode" "$n"
        awk -v m="$mode" -v n="$n" -v r="$r" -v d="$dump_s" -v s="$restore_s" 'BEGIN {
            printf "%s round %d: dump %.3f s (%.2f ms per task), restore %.3f s (%.2f ms per task)\n",
                m, r, d, 1000 * d / n, s, 1000 * s / n }'
    done
done
