# Shared by the benchmark scripts: a release build, a tmpfs for the images,
# and a cleanup that kills the benchmark's own process and unmounts.
# Sets: crust, work, tmpfs; uses: pid (the process under test, if any),
# tool (crust, or criu with $criu the path of its binary), warm_mib.
# $CRUST: another crust binary to measure (an older build, for before and
# after figures); by default the one built from this tree.
if [ -n "${CRUST:-}" ]; then
    crust=$(realpath "$CRUST")
else
    cargo build --release -q
    crust=$PWD/target/release/crust
fi
criu=${criu:-}
tool=crust
warm_mib=0
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

# bench_warm: see bench/warm.c; nothing unless warm_mib is set.
bench_warm() {
    if [ "$warm_mib" -gt 0 ]; then
        [ -x "$work/warm" ] || cc -O2 -o "$work/warm" bench/warm.c
        "$work/warm" "$warm_mib"
    fi
}

# The dump and the restore (detached) with the tool under test. CRIU logs
# at its default level into the images directory; crust at -v3, for the
# lines bench scripts read (per-process page times, "images complete",
# the frozen time), a few lines per process. $tool_opts: options both
# take (--tcp-established for a tree with connections).
bench_dump() {
    case $tool in
    crust) "$crust" dump -t "$1" -D "$2" -o dump.log -v3 ${tool_opts:-} ;;
    criu) mkdir -p "$2" && "$criu" dump -t "$1" -D "$2" -o dump.log ${tool_opts:-} ;;
    esac
}
bench_restore() {
    case $tool in
    crust) "$crust" restore -D "$1" -d -o restore.log ${tool_opts:-} ;;
    criu) "$criu" restore -D "$1" -d -o restore.log ${tool_opts:-} ;;
    esac
}

# bench_cycle LOG PROGRAM ARGS...: starts PROGRAM (zdtm protocol: it makes
# $ZDTM_READY when set up, checks itself on SIGTERM and prints PASS), dumps
# it with $tool, restores it detached, lets it check itself. Sets dump_s and
# restore_s (seconds). Calls bench_before_dump and bench_after_restore when
# the caller defines them. $tool_opts: options for both dump and restore.
bench_cycle() {
    local log=$1 t0 t1 t2 t3
    shift
    rm -f "$work/ready"
    ZDTM_READY="$work/ready" setsid "$@" </dev/null >"$log" 2>&1 &
    pid=$!
    # Killed by the dump on purpose: no "Killed" job report from bash.
    disown "$pid"
    while [ ! -e "$work/ready" ]; do sleep 0.05; done
    if declare -F bench_before_dump >/dev/null; then bench_before_dump; fi
    rm -rf "$tmpfs/img"
    # Every process of the tree (its own session), to wait for all to be
    # gone, zombies reaped, before the restore needs their PIDs.
    tree_pids=$(pgrep -s "$pid" || true)
    bench_warm
    t0=$(now)
    bench_dump "$pid" "$tmpfs/img" || { echo "$tool dump failed: $(tail -3 "$tmpfs/img/dump.log")"; exit 1; }
    t1=$(now)
    wait "$pid" 2>/dev/null || true
    # The killed tree's children are reaped by init, late.
    local p
    for p in $pid $tree_pids; do
        while [ -e "/proc/$p" ]; do sleep 0.02; done
    done
    bench_warm
    t2=$(now)
    bench_restore "$tmpfs/img" || { echo "$tool restore failed: $(tail -3 "$tmpfs/img/restore.log")"; exit 1; }
    t3=$(now)
    if declare -F bench_after_restore >/dev/null; then bench_after_restore; fi
    kill -TERM "$pid"
    while [ -e "/proc/$pid" ]; do sleep 0.05; done
    pid=
    grep -q PASS "$log" || { echo "the restored $1 failed its check ($tool): $(cat "$log")"; exit 1; }
    dump_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    restore_s=$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')
}
