# Shared by the benchmark scripts: a release build, a tmpfs for the images,
# and a cleanup that kills the benchmark's own process and unmounts.
# Sets: crust, work, tmpfs; uses: pid (the process under test, if any).
cargo build --release -q
crust=$PWD/target/release/crust
work=$(mktemp -d)
tmpfs=$work/tmpfs
mkdir -p "$tmpfs"
pid=
bench_cleanup() {
    # The program runs in a session of its own (setsid): end its whole group,
    # children included.
    [ -n "$pid" ] && kill -9 -- "-$pid" "$pid" 2>/dev/null || true
    umount "$tmpfs" 2>/dev/null || true
    rm -rf "$work"
}
trap bench_cleanup EXIT
bench_mount() { mount -t tmpfs -o "size=$1" crust-bench "$tmpfs"; }
now() { date +%s.%N; }

# bench_cycle LOG PROGRAM ARGS...: starts PROGRAM (zdtm protocol: it makes
# $ZDTM_READY when set up, checks itself on SIGTERM and prints PASS), dumps
# it with crust, restores it detached, lets it check itself. Sets dump_s and
# restore_s (seconds). Calls bench_before_dump and bench_after_restore when
# the caller defines them. $crust_opts: options for both dump and restore.
bench_cycle() {
    local log=$1 t0 t1 t2 t3
    shift
    rm -f "$work/ready"
    ZDTM_READY="$work/ready" setsid "$@" </dev/null >"$log" 2>&1 &
    pid=$!
    while [ ! -e "$work/ready" ]; do sleep 0.05; done
    if declare -F bench_before_dump >/dev/null; then bench_before_dump; fi
    rm -rf "$tmpfs/img"
    t0=$(now)
    "$crust" dump -t "$pid" -D "$tmpfs/img" ${crust_opts:-}
    t1=$(now)
    wait "$pid" 2>/dev/null || true
    # The killed tree's children are reaped by init, late.
    while [ -e "/proc/$pid" ] || pgrep -f "$1" >/dev/null; do sleep 0.02; done
    t2=$(now)
    "$crust" restore -D "$tmpfs/img" -d ${crust_opts:-}
    t3=$(now)
    if declare -F bench_after_restore >/dev/null; then bench_after_restore; fi
    kill -TERM "$pid"
    while [ -e "/proc/$pid" ]; do sleep 0.05; done
    pid=
    grep -q PASS "$log" || { echo "the restored $1 failed its check: $(cat "$log")"; exit 1; }
    dump_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    restore_s=$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')
}
