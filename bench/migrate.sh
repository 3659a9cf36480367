#!/usr/bin/env bash
# Migration through the page server: zdtm/bigmem with SIZE MiB (default
# 1024) runs in one network namespace ("host A"); `crust page-server` runs
# in another ("host B", joined to A by a veth pair) with its directory on a
# tmpfs; the dump runs on A and sends the pages to B; the other images are
# copied to B and the restore runs there; the program verifies its memory.
# Per round: the tree's frozen time (seize to kill, from the dump's log),
# the dump's wall time, and the restore's; for plain TCP, TLS, and a local
# dump to tmpfs for comparison. Then iterative migration (predump): the
# program is bench/dirtier.c instead, rewriting 1% of its pages per second;
# two pre-dumps 2 s apart and the final dump (--prev-images-dir
# --track-mem) 2 s later, each through its own page-server run into its own
# directory on B; the restore on B reads through the chain. Its frozen time
# is the final dump's. Usage: bench/migrate.sh [SIZE_MIB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}
rounds=${2:-3}
. bench/lib.sh
bench_mount $((size * 2 + 256))m
cc -O2 -o "$work/bigmem" zdtm/bigmem.c
cc -O2 -o "$work/dirtier" bench/dirtier.c
a=crust-mig-a-$$
b=crust-mig-b-$$
port=27182
migrate_cleanup() {
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    bench_cleanup
}
trap migrate_cleanup EXIT
ip netns add "$a"
ip netns add "$b"
ip link add "va$$" type veth peer name "vb$$"
ip link set "va$$" netns "$a"
ip link set "vb$$" netns "$b"
ip -n "$a" addr add 10.198.0.1/24 dev "va$$"
ip -n "$b" addr add 10.198.0.2/24 dev "vb$$"
for ns in "$a" "$b"; do
    ip -n "$ns" link set lo up
done
ip -n "$a" link set "va$$" up
ip -n "$b" link set "vb$$" up
on_a() { ip netns exec "$a" "$@"; }
on_b() { ip netns exec "$b" "$@"; }

# A CA and a certificate per side, for --tls.
pki=$work/pki
mkdir -p "$pki"
(
    cd "$pki"
    k="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
    openssl req -x509 $k -keyout ca.key -out ca.pem -days 1 -subj /CN=bench-ca 2>/dev/null
    printf 'subjectAltName=IP:10.198.0.2\nextendedKeyUsage=serverAuth,clientAuth\n' >ext
    for n in server client; do
        openssl req $k -keyout $n.key -out $n.csr -subj /CN=$n 2>/dev/null
        openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem \
            -days 1 -extfile ext 2>/dev/null
    done
)
tls_of() { echo "--tls --tls-cacert $pki/ca.pem --tls-cert $pki/$1.pem --tls-key $pki/$1.key"; }

# serve DIR: a page server on B into DIR, listening when this returns; sets spid.
serve() {
    on_b "$crust" page-server -D "$1" --address 10.198.0.2 --port $port &
    spid=$!
    until on_b ss -Hltn "sport = :$port" | grep -q .; do sleep 0.01; done
}

# frozen_s LOG: the tree's frozen time the dump or pre-dump logged, in s.
frozen_s() {
    sed -n 's/.* frozen for \([0-9.]*\)\([µmn]*s\).*/\1 \2/p' "$1" | tail -1 |
        awk '{ f = ($2 == "ms") ? 1e-3 : ($2 == "µs") ? 1e-6 : ($2 == "ns") ? 1e-9 : 1; printf "%.3f", $1 * f }'
}

# restore_on_b DIR LOG: once the dumped program ($pid) is gone, restores
# DIR on B and has the program check itself (its verdict in LOG); sets
# restore_s.
restore_on_b() {
    local t1 t2
    while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
    t1=$(now)
    on_b "$crust" restore -D "$1" -d -o restore.log --pidfile "$work/restored.pid"
    t2=$(now)
    restore_s=$(echo "$t2 - $t1" | bc)
    pid=$(cat "$work/restored.pid")
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    grep -q PASS "$2" || { echo "restored program failed: $(cat "$2")"; exit 1; }
    pid=
}

# Iterative migration: pre-dumps and the final dump through page servers.
round_predump() {
    local srv=$tmpfs/b img=$tmpfs/a t0 n prev send p1 p2 dump_s
    rm -rf "$srv" "$img" "$work/ready"
    mkdir -p "$srv" "$img"
    (ZDTM_READY="$work/ready" ZDTM_DIR="$work" exec ip netns exec "$a" setsid "$work/dirtier" "$size" 1 </dev/null >"$work/dirtier.log" 2>&1 &)
    while [ ! -e "$work/ready" ]; do sleep 0.05; done
    pid=$(pgrep -n -f "$work/dirtier $size")
    sleep 1
    send="--page-server --address 10.198.0.2 --port $port"
    prev=
    for n in pre1 pre2; do
        serve "$srv/$n"
        # shellcheck disable=SC2086
        on_a "$crust" pre-dump -t "$pid" -D "$img/$n" -o dump.log -v3 $send $prev
        wait "$spid"
        prev="--prev-images-dir ../$n"
        sleep 2
    done
    p1=$(frozen_s "$img/pre1/dump.log")
    p2=$(frozen_s "$img/pre2/dump.log")
    serve "$srv/final"
    t0=$(now)
    # shellcheck disable=SC2086
    on_a "$crust" dump -t "$pid" -D "$img/final" -o dump.log -v3 $send $prev --track-mem
    dump_s=$(echo "$(now) - $t0" | bc)
    wait "$spid"
    for n in pre1 pre2 final; do
        cp "$img/$n"/*.img "$srv/$n"/
        [ -L "$img/$n/parent" ] && cp -P "$img/$n/parent" "$srv/$n/parent"
    done
    restore_on_b "$srv/final" "$work/dirtier.log"
    printf "%-7s frozen %.3f s (pre-dumps %s s, %s s), final dump %.3f s, restore %.3f s; sent %s\n" predump \
        "$(frozen_s "$img/final/dump.log")" "$p1" "$p2" "$dump_s" "$restore_s" \
        "$(for n in pre1 pre2 final; do stat -c %s "$srv/$n"/pages-*.img | awk -v n=$n '{ t += $1 } END { printf "%s %.0f MiB ", n, t / 1048576 }'; done)"
}

# One migration: $1 = plain, tls or local.
round() {
    local mode=$1 srv=$tmpfs/b img=$tmpfs/a t0 spid send="" dump_s
    rm -rf "$srv" "$img" "$work/ready"
    # Not our child (a subshell's): the kill by the dump is no job of ours.
    # exec: no shell is left to report the kill into the program's log.
    (ZDTM_READY="$work/ready" exec ip netns exec "$a" setsid "$work/bigmem" "$size" </dev/null >"$work/bigmem.log" 2>&1 &)
    while [ ! -e "$work/ready" ]; do sleep 0.05; done
    pid=$(pgrep -n -f "$work/bigmem $size")
    if [ "$mode" != local ]; then
        # shellcheck disable=SC2046
        on_b "$crust" page-server -D "$srv" --address 10.198.0.2 --port $port \
            $([ "$mode" = tls ] && tls_of server) &
        spid=$!
        until on_b ss -Hltn "sport = :$port" | grep -q .; do sleep 0.01; done
        send="--page-server --address 10.198.0.2 --port $port"
        [ "$mode" = tls ] && send="$send $(tls_of client)"
    fi
    t0=$(now)
    # shellcheck disable=SC2086
    on_a "$crust" dump -t "$pid" -D "$img" -o dump.log -v3 $send
    dump_s=$(echo "$(now) - $t0" | bc)
    if [ "$mode" != local ]; then
        wait "$spid"
        cp "$img"/*.img "$srv"/
    else
        srv=$img
    fi
    frozen=$(sed -n 's/.*was frozen for \([0-9.]*\)\(m\?s\).*/\1 \2/p' "$img/dump.log")
    restore_on_b "$srv" "$work/bigmem.log"
    awk -v m="$mode" -v f="$frozen" -v d="$dump_s" -v r="$restore_s" 'BEGIN {
        split(f, x, " "); fs = (x[2] == "ms") ? x[1] / 1000 : x[1];
        printf "%-6s frozen %.3f s, dump %.3f s, restore %.3f s\n", m, fs, d, r }'
}

echo "bigmem ${size} MiB, two namespaces over veth, images on tmpfs, rounds: $rounds, kernel $(uname -r), $(nproc) cores"
for r in $(seq "$rounds"); do
    echo "round $r:"
    for mode in local plain tls; do
        round "$mode"
    done
    round_predump
done
