#!/usr/bin/env bash
# Pre-dump against a full dump: a process holding SIZE MiB (bench/dirtier.c)
# rewrites PCT percent of its pages per second. Per round: a full dump of
# it (restored, verified); then, with a fresh process, two pre-dumps INTERVAL
# seconds apart and a final dump with --prev-images-dir --track-mem
# INTERVAL seconds later (restored through the chain, verified). Reports
# the time the tree was frozen in each (crust's log: "frozen for"), the
# final dump's against the full one's (target: at most 10%), and the bytes
# each later image stored against the pages the process wrote in between.
# Images on tmpfs; the restores are not timed. Memory needed: about twice
# SIZE, plus SIZE for a moment before the full dump (bench/warm.c).
# Usage: bench/predump.sh [-r ROUNDS] [-i INTERVAL_S] [-p PCT] [SIZE_MIB]
# (defaults: 3 rounds, 5 s, 1%/s, 4096 MiB; CRUST=path measures another
# crust binary than this tree's; LOGS=DIR keeps each dump's log there,
# VERBOSITY=N logs at -vN instead of -v3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
interval=5
pct=1
while getopts r:i:p: o; do
    case $o in
    r) rounds=$OPTARG ;;
    i) interval=$OPTARG ;;
    p) pct=$OPTARG ;;
    *) sed -n 's/^# Usage: //p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
size=${1:-4096}
. bench/lib.sh
bench_mount $((3 * size + 512))m
cc -O2 -o "$work/dirtier" bench/dirtier.c

# frozen DIR: seconds the tree was frozen, from crust's log in DIR.
frozen() {
    sed -n 's/.* frozen for \([0-9.]*\)\([µmn]*s\).*/\1 \2/p' "$1/crust.log" | tail -1 |
        awk '{ f = ($2 == "ms") ? 1e-3 : ($2 == "µs") ? 1e-6 : ($2 == "ns") ? 1e-9 : 1; printf "%.4f", $1 * f }'
}
pages_bytes() { stat -c %s "$1"/pages-*.img | awk '{ t += $1 - 4096 } END { print t }'; }
count() {
    rm -f "$work/count"
    kill -USR1 "$pid"
    while [ ! -s "$work/count" ]; do
        kill -0 "$pid" 2>/dev/null || { echo "the process died: $(cat "$work/test.log")" >&2; exit 1; }
        sleep 0.01
    done
    cat "$work/count"
}
start() {
    rm -f "$work/ready"
    ZDTM_READY="$work/ready" ZDTM_DIR="$work" setsid "$work/dirtier" "$size" "$pct" </dev/null >"$work/test.log" 2>&1 &
    pid=$!
    disown "$pid"
    while [ ! -e "$work/ready" ]; do sleep 0.05; done
    # Its writes under way before the first dump.
    sleep 1
}
# finish DIR: restores DIR, has the process check itself. Sets after:
# the process's count of page writes right after the restore, which is
# about its count at the freeze (it writes PCT% a second).
finish() {
    while [ -e "/proc/$pid" ]; do sleep 0.02; done
    "$crust" restore -D "$1" -d -o restore.log || { echo "restore failed: $(tail -3 "$1/restore.log")"; exit 1; }
    after=$(count)
    kill -TERM "$pid"
    while [ -e "/proc/$pid" ]; do sleep 0.05; done
    pid=
    grep -q PASS "$work/test.log" || { echo "the restored process failed its check: $(cat "$work/test.log")"; exit 1; }
}
# sleep_until T: until INTERVAL s after T.
sleep_until() { sleep "$(awk -v t="$1" -v n="$(now)" -v i="$interval" 'BEGIN { d = t + i - n; print (d > 0) ? d : 0 }')"; }
# keep_log DIR NAME: DIR's crust.log into $LOGS/NAME.log, when LOGS is set.
keep_log() { [ -z "${LOGS:-}" ] || { mkdir -p "$LOGS" && cp "$1/crust.log" "$LOGS/$2.log"; }; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

echo "$(date -u +%F), kernel $(uname -r), $(nproc) cores, $size MiB, $pct%/s written, pre-dumps $interval s apart, rounds: $rounds"
echo "write tracking: $("$crust" check --all | sed -n 's/^write_tracking *this kernel: //p')"
for r in $(seq "$rounds"); do
    warm_mib=$((size + 256))
    img=$tmpfs/full
    rm -rf "$tmpfs"/*
    start
    bench_warm
    "$crust" dump -t "$pid" -D "$img" -o crust.log -v${VERBOSITY:-3}
    full=$(frozen "$img")
    keep_log "$img" "full-$r"
    finish "$img"

    rm -rf "$tmpfs"/*
    start
    # The writes counted right before each freeze: those between two
    # freezes are what the later image has to store. Freezes INTERVAL s
    # apart (or as soon as the previous pre-dump is done, when it takes
    # longer).
    c1=$(count)
    ta=$(now)
    "$crust" pre-dump -t "$pid" -D "$tmpfs/pre1" -o crust.log -v${VERBOSITY:-3}
    p1=$(frozen "$tmpfs/pre1")
    b1=$(pages_bytes "$tmpfs/pre1")
    sleep_until "$ta"
    c2=$(count)
    ta=$(now)
    "$crust" pre-dump -t "$pid" -D "$tmpfs/pre2" --prev-images-dir ../pre1 -o crust.log -v${VERBOSITY:-3}
    p2=$(frozen "$tmpfs/pre2")
    b2=$(pages_bytes "$tmpfs/pre2")
    # As much warm memory as the final dump stores, give or take: the
    # machine holds the process and the first pre-dump already.
    warm_mib=$((size / 8))
    bench_warm
    sleep_until "$ta"
    # (The final count is taken after the restore: a dump takes the
    # space for its pages before it freezes the tree, which writes on.)
    "$crust" dump -t "$pid" -D "$tmpfs/final" --prev-images-dir ../pre2 --track-mem -o crust.log -v${VERBOSITY:-3}
    fin=$(frozen "$tmpfs/final")
    for d in pre1 pre2 final; do keep_log "$tmpfs/$d" "$d-$r"; done
    b3=$(pages_bytes "$tmpfs/final")
    finish "$tmpfs/final"
    w2=$(((c2 - c1) * 4096))
    w3=$(((after - c2) * 4096))
    echo "round $r: full dump frozen $full s | pre-dump 1 frozen $p1 s, stored $(mib "$b1") MiB; pre-dump 2 frozen $p2 s, stored $(mib "$b2") MiB for $(mib "$w2") MiB written ($(div "$b2" "$w2")x); final dump frozen $fin s, stored $(mib "$b3") MiB for about $(mib "$w3") MiB written ($(div "$b3" "$w3")x) | final/full frozen $(div "$fin" "$full")"
done
