#!/usr/bin/env bash
# Dump and restore time of a process with N open files (default 10000),
# images on tmpfs. Usage: bench/files.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
rounds=${2:-3}
. bench/lib.sh
bench_mount 256m
mkdir -p "$work/files"
cc -O2 -o "$work/many" bench/manyfiles.c
echo "N=$n open files, rounds: $rounds, kernel $(uname -r), $(nproc) cores"
for r in $(seq "$rounds"); do
    bench_cycle "$work/many.log" "$work/many" "$n" "$work/files"
    awk -v n="$n" -v r="$r" -v d="$dump_s" -v s="$restore_s" 'BEGIN {
        printf "round %d: dump %.3f s (%.1f us per fd), restore %.3f s (%.1f us per fd)\n", r, d, 1e6 * d / n, s, 1e6 * s / n }'
done
