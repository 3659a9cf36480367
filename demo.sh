#!/usr/bin/env bash
# The README's walk-through, runnable: build crust, check the kernel, start
# the counter from the seed article, checkpoint it, restore it, watch it go
# on counting where it stopped. Needs root (or CAP_CHECKPOINT_RESTORE and
# CAP_SYS_PTRACE) and a C compiler.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q
crust=$PWD/target/release/crust
$crust check

work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cat > "$work/counter.c" <<'C'
#include <stdio.h>
#include <unistd.h>
int main(void)
{
	int count = 0;
	setvbuf(stdout, NULL, _IONBF, 0);
	printf("My PID is %i\n", getpid());
	while (1) {
		printf("%d\n", count++);
		sleep(1);
	}
}
C
cc -o "$work/counter" "$work/counter.c"

echo "== start the counter"
# A new session and no inherited fds: the counter holds only its log file.
(
    for fd in $(ls /proc/$BASHPID/fd); do
        [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    exec setsid "$work/counter" </dev/null >"$work/counter.log" 2>&1
) &
pid=$!
sleep 3
cat "$work/counter.log"

echo "== crust dump -t $pid -D $work/images"
$crust dump -t "$pid" -D "$work/images"
while [ -e "/proc/$pid" ]; do sleep 0.1; done
echo "the counter is gone; the images:"
ls -l "$work/images"

echo "== crust restore -D $work/images --restore-detached"
$crust restore -D "$work/images" --restore-detached
sleep 3
echo "the counter goes on with its PID $pid:"
cat "$work/counter.log"
$crust show "$work/images/inventory.img"
