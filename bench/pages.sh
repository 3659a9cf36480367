#!/usr/bin/env bash
# The page pipeline side by side: per size, plain write() of that much
# memory into a tmpfs file, crust's dump and restore of a process holding it
# (zdtm/bigmem.c, which verifies every word after the restore), and, with
# -c, the same with CRIU; then a tree of small processes with a few threads
# each. Images on tmpfs; each timed step starts from the same memory state
# (bench/warm.c). Ratios above 1 mean crust is faster.
# Usage: bench/pages.sh [-c CRIU_BINARY] [-r ROUNDS] [-p PROCS] [-t THREADS] [SIZE_MIB...]
# (defaults: 3 rounds, sizes 1024 2048 4096, a tree of 31 processes with 3
# threads each; CRUST=path measures another crust binary than this tree's)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
procs=31
threads=3
criu=
while getopts c:r:p:t: o; do
    case $o in
    c) criu=$(realpath "$OPTARG") ;;
    r) rounds=$OPTARG ;;
    p) procs=$OPTARG ;;
    t) threads=$OPTARG ;;
    *) sed -n 's/^# Usage: //p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1024 2048 4096)
. bench/lib.sh
max=0
for s in "${sizes[@]}"; do [ "$s" -gt "$max" ] && max=$s; done
bench_mount $((max + max / 8 + 512))m
cc -O2 -o "$work/mem" zdtm/bigmem.c
cc -O2 -o "$work/write" bench/write1g.c
cc -O2 -pthread -o "$work/many" bench/manytasks.c
tools=(crust)
[ -n "$criu" ] && tools+=(criu)

div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# ratio FILE A B: appends A/B to FILE, one a line.
ratio() { div "$2" "$3" >>"$1"; echo >>"$1"; }
# criu_ratios: criu's dump and restore times against crust's of this round.
criu_ratios() {
    ratio "$stats/criu-dump-ratio" "$dump_s" "$crust_dump"
    ratio "$stats/criu-restore-ratio" "$restore_s" "$crust_restore"
}
# range FILE: "min-max" of the numbers in FILE.
range() { sort -g "$1" | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'; }
# When crust's images were complete and durable, from its log ("images of
# PID complete in T"): the dump without the wait for the dumped tree to
# die (its exit frees its memory, which write() does not have to do).
images_s() {
    sed -n 's/.* images of [0-9]* complete in \([0-9.]*\)\(m\?s\).*/\1 \2/p' "$tmpfs/img/dump.log" |
        awk '{ t += ($2 == "ms") ? $1 / 1000 : $1 } END { printf "%.3f", t }'
}

echo "$(date -u +%F), kernel $(uname -r), $(nproc) cores, rounds: $rounds"
[ -n "$criu" ] && echo "criu: $criu ($("$criu" --version | head -1))"
for size in "${sizes[@]}"; do
    stats=$work/stats-$size
    mkdir -p "$stats"
    for r in $(seq "$rounds"); do
        rm -rf "$tmpfs/img"
        warm_mib=$((2 * size + 256))
        bench_warm
        w=$("$work/write" "$tmpfs/write.bin" "$size" buffer)
        warm_mib=$((size + 256))
        line="$size MiB round $r: write() $w s"
        for tool in "${tools[@]}"; do
            bench_cycle "$work/mem.log" "$work/mem" "$size"
            echo "$dump_s" >>"$stats/$tool-dump"
            echo "$restore_s" >>"$stats/$tool-restore"
            line+=" | $tool dump $dump_s s"
            if [ "$tool" = crust ]; then
                ratio "$stats/write-ratio" "$w" "$dump_s"
                p=$(images_s)
                # An older crust does not log it.
                if [ "$p" != 0.000 ]; then
                    line+=" (images complete $p s)"
                    ratio "$stats/images-ratio" "$w" "$p"
                fi
                crust_dump=$dump_s
                crust_restore=$restore_s
            else
                criu_ratios
            fi
            line+=", restore $restore_s s"
        done
        line+=" | write/dump $(div "$w" "$crust_dump")"
        [ -n "$criu" ] && line+=", criu/crust dump $(div "$dump_s" "$crust_dump") restore $(div "$restore_s" "$crust_restore")"
        echo "$line"
    done
    sum="$size MiB: crust dump $(range "$stats/crust-dump") s ($(awk -v s="$size" '{ print $1 * 1024 / s }' "$stats/crust-dump" >"$stats/pergib"; range "$stats/pergib") s/GiB), restore $(range "$stats/crust-restore") s"
    sum+="; write/dump $(range "$stats/write-ratio")"
    [ -s "$stats/images-ratio" ] && sum+=" (write/images complete $(range "$stats/images-ratio"))"
    if [ -n "$criu" ]; then
        sum+="; criu dump $(range "$stats/criu-dump") s, restore $(range "$stats/criu-restore") s"
        sum+="; criu/crust dump $(range "$stats/criu-dump-ratio"), restore $(range "$stats/criu-restore-ratio")"
    fi
    echo "$sum"
done

# Per-task cost: a tree of small processes with a few threads each.
warm_mib=0
stats=$work/stats-tree
mkdir -p "$stats"
for r in $(seq "$rounds"); do
    line="tree of $procs processes x $threads threads round $r:"
    for tool in "${tools[@]}"; do
        bench_cycle "$work/many.log" "$work/many" tree "$procs" "$threads"
        line+=" $tool dump $dump_s s ($(awk -v d="$dump_s" -v n="$procs" 'BEGIN { printf "%.1f", 1000 * d / n }') ms/process), restore $restore_s s ($(awk -v d="$restore_s" -v n="$procs" 'BEGIN { printf "%.1f", 1000 * d / n }') ms/process) |"
        if [ "$tool" = crust ]; then
            crust_dump=$dump_s
            crust_restore=$restore_s
        else
            criu_ratios
            line+=" criu/crust dump $(div "$dump_s" "$crust_dump") restore $(div "$restore_s" "$crust_restore")"
        fi
    done
    echo "$line"
done
[ -n "$criu" ] && echo "tree: criu/crust dump $(range "$stats/criu-dump-ratio"), restore $(range "$stats/criu-restore-ratio")"
exit 0
