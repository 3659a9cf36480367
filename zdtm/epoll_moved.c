/* epoll targets whose fd number changed hands: a set keys a target by
 * (file, the fd number it was added as), and that number may have been
 * closed since, or reused by another file, or by the set itself.
 *  - A: added as fd 50, which was closed (the file stays at another fd);
 *  - B, C, D: each added as fd 60 and closed; 60 now holds a locked
 *    close-on-exec regular file (the set sits above it, at fd 90);
 *  - E: an ordinary target at its own number;
 *  - G: added as fd 70 to a second set, which now sits at fd 70 itself.
 * A child shares the first set (forked after it was filled). After restore
 * fdinfo lists the same fd numbers, each pipe's write wakes the set with
 * its data, fd 60 is still the locked close-on-exec file, and the child
 * sees the shared set too.
 * With "lost": a target is held only by the child (the parent closed it),
 * which the dump must refuse. */
#include "zdtmlib.h"
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/wait.h>

static int cmp_int(const void *x, const void *y)
{
	return *(const int *)x - *(const int *)y;
}

/* The tfd numbers of a set, as fdinfo lists them, in ascending order (the
 * set orders its targets by their file's address). */
static void tfds(int ep, char *out, size_t n)
{
	char p[64], line[512];
	int v[64], k = 0;
	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", ep);
	FILE *f = fopen(p, "r");
	while (f && k < 64 && fgets(line, sizeof(line), f))
		if (sscanf(line, "tfd: %d", &v[k]) == 1)
			k++;
	if (f)
		fclose(f);
	qsort(v, k, sizeof(int), cmp_int);
	out[0] = 0;
	for (int i = 0; i < k; i++) {
		size_t l = strlen(out);
		snprintf(out + l, n - l, "%d,", v[i]);
	}
}

static void add(int ep, int fd, uint64_t data)
{
	struct epoll_event e = { .events = EPOLLIN, .data.u64 = data };
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e))
		fail("adding fd %d", fd);
}

/* A byte into the pipe wakes the set with `data`. */
static void wakes(int ep, int p[2], uint64_t data)
{
	struct epoll_event e;
	char b = 1;
	if (write(p[1], &b, 1) != 1)
		fail("write");
	if (epoll_wait(ep, &e, 1, 1000) != 1)
		fail("no event for data %llx", (unsigned long long)data);
	if (e.data.u64 != data)
		fail("event with data %llx, %llx expected", (unsigned long long)e.data.u64, (unsigned long long)data);
	if (read(p[0], &b, 1) != 1)
		fail("read");
}

/* Whether /proc/locks has a POSIX write lock of this process. */
static int locked(void)
{
	char line[256], want[32];
	snprintf(want, sizeof(want), " WRITE %d ", getpid());
	FILE *f = fopen("/proc/locks", "r");
	int found = 0;
	while (f && fgets(line, sizeof(line), f))
		if (strstr(line, "POSIX") && strstr(line, want))
			found = 1;
	if (f)
		fclose(f);
	return found;
}

int main(int argc, char **argv)
{
	int lost = argc > 1 && !strcmp(argv[1], "lost");
	test_init();
	int a[2], b[2], c[2], d[2], e[2], g[2], lp[2], go[2];
	if (pipe(a) || pipe(b) || pipe(c) || pipe(d) || pipe(e) || pipe(g) || pipe(lp) || pipe(go))
		fail("pipe");
	/* Above fd 60: its lock is restored before the set is filled, and
	 * filling it must not drop the lock. */
	int ep = epoll_create1(0);
	if (ep < 0 || dup2(ep, 90) != 90)
		fail("epoll_create1");
	close(ep);
	ep = 90;

	if (dup2(a[0], 50) != 50)
		fail("dup2");
	add(ep, 50, 0xA);
	close(50);
	int *at60[] = { b, c, d };
	for (int i = 0; i < 3; i++) {
		if (dup2(at60[i][0], 60) != 60)
			fail("dup2");
		add(ep, 60, 0xB + i);
		close(60);
	}
	add(ep, e[0], 0xE);
	if (lost)
		add(ep, lp[0], 0x1057);

	char path[4096];
	snprintf(path, sizeof(path), "%s/locked", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	int f = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (f < 0 || dup3(f, 60, O_CLOEXEC) != 60)
		fail("file at 60");
	close(f);
	struct flock l = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
	if (!lost && fcntl(60, F_SETLK, &l))
		fail("lock");

	int ep2 = epoll_create1(0);
	if (dup2(g[0], 70) != 70)
		fail("dup2");
	add(ep2, 70, 0x6);
	close(70);
	if (dup2(ep2, 70) != 70)
		fail("dup2");
	close(ep2);
	ep2 = 70;

	char before[256], before2[64];
	tfds(ep, before, sizeof(before));
	tfds(ep2, before2, sizeof(before2));

	pid_t child = fork();
	if (child == 0) {
		char x;
		close(go[1]);
		if (read(go[0], &x, 1) != 1)
			_exit(2);
		struct epoll_event ev;
		if (write(e[1], &x, 1) != 1 || epoll_wait(ep, &ev, 1, 1000) != 1)
			_exit(3);
		if (ev.data.u64 != 0xE || read(e[0], &x, 1) != 1)
			_exit(4);
		_exit(0);
	}
	close(go[0]);
	if (lost)
		close(lp[0]); /* only the child holds it now */

	test_ready();
	test_waitsig();

	if (write(go[1], "g", 1) != 1)
		fail("go");
	int st;
	if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("the child did not see the shared set (status %x)", st);

	char after[256], after2[64];
	tfds(ep, after, sizeof(after));
	tfds(ep2, after2, sizeof(after2));
	if (strcmp(before, after))
		fail("the set listed fds %s, now %s", before, after);
	if (strcmp(before2, after2))
		fail("the second set listed fds %s, now %s", before2, after2);
	wakes(ep, a, 0xA);
	wakes(ep, b, 0xB);
	wakes(ep, c, 0xC);
	wakes(ep, d, 0xD);
	wakes(ep, e, 0xE);
	wakes(ep2, g, 0x6);
	if (fcntl(60, F_GETFD) != FD_CLOEXEC)
		fail("fd 60 lost close-on-exec");
	struct stat s1, s2;
	if (fstat(60, &s1) || stat(path, &s2) || s1.st_ino != s2.st_ino)
		fail("fd 60 is not the locked file any more");
	if (!locked())
		fail("the lock on fd 60's file is gone");
	pass();
}
