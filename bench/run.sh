#!/usr/bin/env bash
# Dump/restore throughput of a process with SIZE MiB (default 1024) of touched
# anonymous memory, images on tmpfs, against plain write() of the same amount
# to tmpfs measured in the same run. Usage: bench/run.sh [SIZE_MIB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}
rounds=${2:-3}
. bench/lib.sh
bench_mount $((size * 3 + 256))m
cc -O2 -o "$work/mem" zdtm/bigmem.c
cc -O2 -o "$work/write" bench/write1g.c

mibps() { awk -v s="$size" -v t="$1" 'BEGIN { printf "%.0f", s / t }'; }

echo "size: ${size} MiB, rounds: $rounds, kernel $(uname -r), $(nproc) cores"
for r in $(seq "$rounds"); do
    w=$("$work/write" "$tmpfs/write.bin" "$size" buffer)
    h=$("$work/write" "$tmpfs/write.bin" "$size" hot)
    bench_cycle "$work/mem.log" "$work/mem" "$size"
    d=$dump_s
    rs=$restore_s
    ratio=$(awk -v w="$w" -v d="$d" 'BEGIN { printf "%.0f", 100 * w / d }')
    hratio=$(awk -v w="$h" -v d="$d" 'BEGIN { printf "%.0f", 100 * w / d }')
    echo "round $r: write() from 1 GiB buffer $(mibps "$w") MiB/s, from hot 1 MiB $(mibps "$h") MiB/s | dump $(mibps "$d") MiB/s (${ratio}% / ${hratio}% of them) | restore $(mibps "$rs") MiB/s"
done
