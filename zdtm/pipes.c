/* Pipes: one held whole by the root with unread bytes in it, a bigger
 * capacity and a non-blocking read end, plus a second description of that
 * read end (opened through /proc) that blocks, and a dup of the first that
 * shares its flags; a pipe end's flags exactly as pipe(2) gave them; and a
 * pipeline producer -> consumer
 * between two children, checkpointed mid-stream: the consumer must see
 * every number exactly once and in order, across the restore. */
#include "zdtmlib.h"
#include <stdint.h>
#include <sys/wait.h>

int main(void)
{
	test_init();
	int a[2], b[2];
	if (pipe(a) || pipe(b))
		fail("pipe");
	if (fcntl(a[1], F_SETPIPE_SZ, 131072) < 0)
		fail("F_SETPIPE_SZ");
	fcntl(a[0], F_SETFL, O_NONBLOCK);
	char proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", a[0]);
	int second = open(proc, O_RDONLY);
	int dup_of_first = dup(a[0]);
	if (second < 0 || dup_of_first < 0)
		fail("a second description of the pipe");
	int plain = fcntl(b[1], F_GETFL);
	if (write(a[1], "hello pipe", 10) != 10)
		fail("write");
	pid_t prod = fork();
	if (prod == 0) {
		signal(SIGTERM, SIG_DFL);
		close(b[0]);
		for (uint64_t i = 0;; i++) {
			if (write(b[1], &i, sizeof(i)) != sizeof(i))
				_exit(3);
			if (i % 64 == 0)
				usleep(1000);
		}
	}
	pid_t cons = fork();
	if (cons == 0) {
		signal(SIGTERM, SIG_DFL);
		close(b[1]);
		uint64_t want = 0, got;
		ssize_t n;
		while ((n = read(b[0], &got, sizeof(got))) == sizeof(got)) {
			if (got != want)
				_exit(4);
			want++;
		}
		_exit(n == 0 && want > 0 ? 0 : 5);
	}
	close(b[0]);
	usleep(100000);
	test_ready();
	test_waitsig();
	char buf[32] = { 0 };
	if (read(a[0], buf, sizeof(buf)) != 10 || memcmp(buf, "hello pipe", 10))
		fail("the bytes in the pipe are lost: %s", buf);
	if (fcntl(a[1], F_GETPIPE_SZ) != 131072)
		fail("capacity %d", fcntl(a[1], F_GETPIPE_SZ));
	if (!(fcntl(a[0], F_GETFL) & O_NONBLOCK) || !(fcntl(dup_of_first, F_GETFL) & O_NONBLOCK))
		fail("O_NONBLOCK lost");
	if (fcntl(second, F_GETFL) & O_NONBLOCK)
		fail("O_NONBLOCK spread to the second description of the pipe");
	if (fcntl(b[1], F_GETFL) != plain)
		fail("pipe end flags %o, were %o", fcntl(b[1], F_GETFL), plain);
	close(b[1]);
	usleep(50000); /* let the pipeline run after restore */
	kill(prod, SIGTERM);
	int st;
	if (waitpid(prod, &st, 0) != prod || !WIFSIGNALED(st))
		fail("producer did not run until killed");
	if (waitpid(cons, &st, 0) != cons || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("consumer saw a broken stream (status %x)", st);
	pass();
}
