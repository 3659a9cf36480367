#!/usr/bin/env bash
# Dump and restore time of a process holding N established TCP connections
# over loopback, both ends in it (2N sockets, default N=1000), of one
# holding N unix socketpairs (2N sockets), and of one holding both, each
# connection and pair with bytes queued both ways; TCP dumped with
# --tcp-established (TCP repair) and the network lock; images on tmpfs.
# Usage: bench/sockets.sh [N] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
rounds=${2:-3}
. bench/lib.sh
bench_mount 256m
cc -O2 -o "$work/socks" bench/manysockets.c
tool_opts="--tcp-established"
echo "N=$n (connections, socketpairs), rounds: $rounds, kernel $(uname -r), $(nproc) cores, network lock: $(command -v nft >/dev/null && echo nftables || echo iptables)"
for r in $(seq "$rounds"); do
    for mix in "tcp $n 0" "unix 0 $n" "both $n $n"; do
        set -- $mix
        bench_cycle "$work/socks.log" "$work/socks" "$2" "$3"
        awk -v what="$1" -v k="$((2 * $2 + 2 * $3))" -v r="$r" -v d="$dump_s" -v s="$restore_s" 'BEGIN {
            printf "round %d %-4s %5d sockets: dump %.3f s (%.1f us per socket), restore %.3f s (%.1f us per socket)\n", r, what, k, d, 1e6 * d / k, s, 1e6 * s / k }'
    done
done
