#!/usr/bin/env bash
# Dump and restore time of a process holding N established TCP connections
# over loopback, both ends in it (2N sockets, default N=1000), each with
# bytes queued both ways, dumped with --tcp-established (TCP repair) and
# the network lock; images on tmpfs. Usage: bench/sockets.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
rounds=${2:-3}
. bench/lib.sh
bench_mount 256m
cc -O2 -o "$work/socks" bench/manysockets.c
crust_opts="--tcp-established"
echo "N=$n connections ($((2 * n)) sockets), rounds: $rounds, kernel $(uname -r), $(nproc) cores, network lock: $(command -v nft >/dev/null && echo nftables || echo iptables)"
for r in $(seq "$rounds"); do
    bench_cycle "$work/socks.log" "$work/socks" "$n"
    awk -v n="$((2 * n))" -v r="$r" -v d="$dump_s" -v s="$restore_s" 'BEGIN {
        printf "round %d: dump %.3f s (%.1f us per socket), restore %.3f s (%.1f us per socket)\n", r, d, 1e6 * d / n, s, 1e6 * s / n }'
done
