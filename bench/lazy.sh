#!/usr/bin/env bash
# Lazy restore against a full one, per size (zdtm/bigmem.c: SIZE MiB of a
# known pattern, every word checked after the restore; images on tmpfs):
#  - full:     dump, then restore -d: the program runs again when the
#              restore returns; it was frozen for the dump, and ran nowhere
#              from the dump's start until the restore returned (downtime).
#  - lazy:     the same dump, restore -d --lazy-pages with `crust lazy-pages`
#              serving the images (timed from when the daemon listens, its
#              check of the images done): the restore returns before the
#              memory is in; "all in" is when the daemon placed the last page.
#  - migrate:  dump --lazy-pages serving the pages on 127.0.0.1 from the
#              frozen source, restore --lazy-pages --pid-ns (the frozen
#              source holds the PIDs on this one machine) with lazy-pages
#              --page-server pulling them: downtime is from the dump's start
#              until the program runs there (the daemon started once the
#              images are there, as it would on another host); the source stays frozen until the
#              daemon has every page (then the dump ends it).
#  - tls (-t): the same migration with the page stream in TLS (--tls on
#              both sides, a CA and a certificate per side made with
#              openssl in the work directory).
# Each restored program checks its memory (SIGTERM) after the daemon is done.
# Usage: bench/lazy.sh [-r ROUNDS] [-t] [SIZE_MIB...]   (defaults: 3 rounds, 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
tls=
while getopts r:t o; do
    case $o in
    r) rounds=$OPTARG ;;
    t) tls=1 ;;
    *) sed -n 's/^# Usage: //p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1024)
. bench/lib.sh
max=0
for s in "${sizes[@]}"; do [ "$s" -gt "$max" ] && max=$s; done
bench_mount $((2 * max + 512))m
cc -O2 -o "$work/mem" zdtm/bigmem.c
if [ -n "$tls" ]; then
    # A CA, and a certificate signed by it for each side (the dump's names
    # 127.0.0.1, the address the daemon connects to).
    (
        cd "$work"
        key="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
        openssl req -x509 $key -keyout ca.key -out ca.pem -days 2 -subj /CN=ca 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' >ext
        for side in dump daemon; do
            openssl req $key -keyout $side.key -out $side.csr -subj /CN=$side 2>/dev/null
            openssl x509 -req -in $side.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                -out $side.pem -days 2 -extfile ext 2>/dev/null
        done
    )
fi
# tls_args SIDE: --tls with SIDE's certificate, when -t.
tls_args() { echo --tls --tls-cacert "$work/ca.pem" --tls-cert "$work/$1.pem" --tls-key "$work/$1.key"; }
img=$tmpfs/img
port=$((29000 + $$ % 1000))
daemon=
rpid=
cleanup_lazy() {
    [ -n "$daemon" ] && kill -9 "$daemon" 2>/dev/null || true
    [ -n "$rpid" ] && kill -9 "$rpid" 2>/dev/null || true
    bench_cleanup
}
trap cleanup_lazy EXIT
sec() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
range() { sort -g "$1" | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.3f-%.3f", lo, hi }'; }

# start SIZE: the program, ready, in a session of its own ($pid).
start() {
    rm -f "$work/ready" "$work/out"
    ZDTM_READY="$work/ready" setsid "$work/mem" "$1" </dev/null >"$work/out" 2>&1 &
    pid=$!
    disown "$pid"
    while [ ! -e "$work/ready" ]; do sleep 0.05; done
    rm -rf "$img"
}
gone() { while [ -e "/proc/$1" ]; do sleep 0.01; done; }
# check PID: SIGTERM, wait until it is gone, PASS or fail.
check() {
    kill -TERM "$1"
    gone "$1"
    grep -q PASS "$work/out" || { echo "the restored program failed its check: $(cat "$work/out")"; exit 1; }
}
# The restored program's PID under a --pid-ns restore: the init's child
# named like it.
inner_root() {
    local init
    init=$(pgrep -P "$1" | head -1)
    pgrep -P "$init" -x mem | head -1
}

# migrate TAG [DUMP_OPTS DAEMON_OPTS]: one lazy migration through
# 127.0.0.1 of a program of $size MiB; its figures go to $s/TAG-*.
migrate() {
    start "$size"
    src=$pid
    t0=$(now)
    "$crust" dump -t "$src" -D "$img" -o dump.log --lazy-pages --address 127.0.0.1 --port "$port" ${2:-} &
    dumper=$!
    while [ ! -e "$img/inventory.img" ]; do sleep 0.002; done
    mkdir -p "$tmpfs/dst"
    rm -rf "$tmpfs/dst"/*
    cp "$img"/*.img "$tmpfs/dst/"
    "$crust" lazy-pages -D "$tmpfs/dst" -o lazy.log --page-server --address 127.0.0.1 --port "$port" ${3:-} &
    daemon=$!
    "$crust" restore -D "$tmpfs/dst" --lazy-pages --pid-ns -o restore.log &
    rpid=$!
    while [ -z "$(inner_root "$rpid" 2>/dev/null)" ] || grep -q "^TracerPid:[[:space:]]*[1-9]" "/proc/$(inner_root "$rpid")/status" 2>/dev/null; do
        sleep 0.002
    done
    t3=$(now)
    wait "$daemon"
    t4=$(now)
    daemon=
    wait "$dumper"
    t5=$(now)
    pid=$(inner_root "$rpid")
    check "$pid"
    wait "$rpid" || { echo "the migrated program failed: $(cat "$work/out")"; exit 1; }
    rpid=
    pid=
    gone "$src"
    sec "$t0" "$t3" >>"$s/$1-down"
    echo >>"$s/$1-down"
    sec "$t0" "$t5" >>"$s/$1-frozen"
    echo >>"$s/$1-frozen"
    sec "$t0" "$t4" >>"$s/$1-allin"
    echo >>"$s/$1-allin"
}

echo "$(date -u +%F), kernel $(uname -r), $(nproc) cores, rounds: $rounds"
for size in "${sizes[@]}"; do
    s=$work/stats-$size
    mkdir -p "$s"
    for r in $(seq "$rounds"); do
        # Full dump and restore.
        start "$size"
        t0=$(now)
        "$crust" dump -t "$pid" -D "$img" -o dump.log
        t1=$(now)
        gone "$pid"
        t2=$(now)
        "$crust" restore -D "$img" -d -o restore.log
        t3=$(now)
        check "$pid"
        pid=
        sec "$t0" "$t1" >>"$s/full-frozen"
        echo >>"$s/full-frozen"
        sec "$t2" "$t3" >>"$s/full-restore"
        echo >>"$s/full-restore"

        # Lazy restore from the images.
        start "$size"
        "$crust" dump -t "$pid" -D "$img" -o dump.log
        gone "$pid"
        t1=$(now)
        "$crust" lazy-pages -D "$img" -o lazy.log &
        daemon=$!
        # Timed from when the daemon listens (it checks the images first).
        while [ ! -S "$img/lazy-pages.socket" ]; do sleep 0.002; done
        t2=$(now)
        sec "$t1" "$t2" >>"$s/lazy-start"
        echo >>"$s/lazy-start"
        "$crust" restore -D "$img" -d --lazy-pages -o restore.log
        t3=$(now)
        wait "$daemon"
        t4=$(now)
        daemon=
        check "$pid"
        pid=
        sec "$t2" "$t3" >>"$s/lazy-restore"
        echo >>"$s/lazy-restore"
        sec "$t2" "$t4" >>"$s/lazy-allin"
        echo >>"$s/lazy-allin"

        # Lazy migration through 127.0.0.1, plain, then in TLS with -t.
        migrate mig
        [ -z "$tls" ] || migrate tls "$(tls_args dump)" "$(tls_args daemon)"
    done
    for f in "$s"/*; do
        sed -i '/^$/d' "$f"
    done
    echo "$size MiB:"
    echo "  full:    frozen (dump) $(range "$s/full-frozen") s, restore until it runs $(range "$s/full-restore") s"
    echo "  lazy:    daemon's start (images checked) $(range "$s/lazy-start") s; then restore until it runs $(range "$s/lazy-restore") s, until every page is in $(range "$s/lazy-allin") s"
    echo "  migrate: downtime (dump start to running there) $(range "$s/mig-down") s, source frozen $(range "$s/mig-frozen") s, every page in $(range "$s/mig-allin") s after the dump's start"
    [ -z "$tls" ] || echo "  tls:     downtime (dump start to running there) $(range "$s/tls-down") s, source frozen $(range "$s/tls-frozen") s, every page in $(range "$s/tls-allin") s after the dump's start"
done
