/* FIFOs: one held read-write, read-only non-blocking and write-only, with
 * bytes in its buffer and a capacity of its own; a child holds the write
 * end too. After restore the buffered bytes come out first, then what the
 * child writes; flags, capacity and paths are as they were. */
#include "zdtmlib.h"
#include <sys/stat.h>
#include <sys/wait.h>

static char path[4096];

static void check_fd(int fd, int want_flags, const char *what)
{
	int fl = fcntl(fd, F_GETFL);
	if ((fl & (O_ACCMODE | O_NONBLOCK)) != want_flags)
		fail("%s: flags %#o, want %#o", what, fl & (O_ACCMODE | O_NONBLOCK), want_flags);
	char l[64], target[4096];
	snprintf(l, sizeof(l), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(l, target, sizeof(target) - 1);
	target[n > 0 ? n : 0] = 0;
	if (strcmp(target, path))
		fail("%s: fd shows %s, want %s", what, target, path);
}

int main(void)
{
	test_init();
	snprintf(path, sizeof(path), "%s/fifo", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	unlink(path);
	if (mkfifo(path, 0600))
		fail("mkfifo: %m");
	int rw = open(path, O_RDWR);
	int rd = open(path, O_RDONLY | O_NONBLOCK);
	int wr = open(path, O_WRONLY);
	if (rw < 0 || rd < 0 || wr < 0)
		fail("open: %m");
	if (fcntl(rw, F_SETPIPE_SZ, 1 << 18) < 0)
		fail("F_SETPIPE_SZ: %m");
	int cap = fcntl(rw, F_GETPIPE_SZ);
	const char *first = "buffered before the dump;";
	write(wr, first, strlen(first));

	int go[2];
	pipe(go);
	pid_t child = fork();
	if (child == 0) {
		close(rw);
		close(rd);
		char b;
		if (read(go[0], &b, 1) != 1)
			_exit(2);
		const char *more = "written after the restore";
		_exit(write(wr, more, strlen(more)) == (ssize_t)strlen(more) ? 0 : 3);
	}
	close(go[0]);
	test_ready();
	test_waitsig();

	check_fd(rw, O_RDWR, "read-write fd");
	check_fd(rd, O_RDONLY | O_NONBLOCK, "read-only fd");
	check_fd(wr, O_WRONLY, "write-only fd");
	if (fcntl(rw, F_GETPIPE_SZ) != cap)
		fail("capacity %d, want %d", fcntl(rw, F_GETPIPE_SZ), cap);
	write(go[1], "g", 1);
	int st;
	waitpid(child, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("the child could not write (status %#x)", st);
	char buf[256] = { 0 };
	ssize_t n = read(rd, buf, sizeof(buf) - 1);
	const char *want = "buffered before the dump;written after the restore";
	if (n != (ssize_t)strlen(want) || strcmp(buf, want))
		fail("read %zd bytes \"%s\", want \"%s\"", n, buf, want);
	pass();
}
