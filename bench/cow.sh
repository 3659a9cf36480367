#!/usr/bin/env bash
# Memory shared copy-on-write by a parent and its 4 children (zdtm/cow.c,
# SIZE MiB written by the parent before the fork, default 1024): the tree's
# summed RSS and PSS before the dump and after the restore, and the dump and
# restore times. Usage: bench/cow.sh [SIZE_MIB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}
rounds=${2:-2}
. bench/lib.sh
bench_mount $((size * 6 + 256))m
cc -O2 -o "$work/cow" zdtm/cow.c

# "RSS PSS" in MiB, summed over $pid and its children.
tree_mem() {
    local p rss=0 pss=0 r s
    for p in "$pid" $(cat "/proc/$pid/task/$pid/children"); do
        r=$(awk '/^Rss:/ { print $2 }' "/proc/$p/smaps_rollup")
        s=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup")
        rss=$((rss + r))
        pss=$((pss + s))
    done
    echo "$((rss / 1024)) $((pss / 1024))"
}
bench_before_dump() { before=$(tree_mem); }
bench_after_restore() { after=$(tree_mem); }

echo "parent with ${size} MiB and 4 children, rounds: $rounds, kernel $(uname -r), $(nproc) cores"
for r in $(seq "$rounds"); do
    bench_cycle "$work/cow.log" "$work/cow" "$size"
    read -r rss0 pss0 <<<"$before"
    read -r rss1 pss1 <<<"$after"
    echo "round $r: before dump RSS ${rss0} MiB PSS ${pss0} MiB | after restore RSS ${rss1} MiB PSS ${pss1} MiB | dump ${dump_s} s, restore ${restore_s} s"
done
