/* File locks (dumped with --file-locks): an flock, a POSIX record lock and
 * an OFD lock are held again after restore, as another process sees. */
#include "zdtmlib.h"
#include <sys/file.h>
#include <sys/wait.h>

static char pa[4096], pb[4096], pc[4096];

static int check_from_child(void)
{
	int a = open(pa, O_RDWR), b = open(pb, O_RDWR), c = open(pc, O_RDWR);
	if (flock(a, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		return 2;
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 7, .l_len = 1 };
	if (fcntl(b, F_GETLK, &fl) || fl.l_type != F_WRLCK || fl.l_pid != getppid() || fl.l_start != 5 || fl.l_len != 10)
		return 3;
	struct flock ofd = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
	if (fcntl(c, F_OFD_GETLK, &ofd) || ofd.l_type != F_RDLCK)
		return 4;
	return 0;
}

int main(void)
{
	test_init();
	const char *d = getenv("ZDTM_DIR");
	snprintf(pa, sizeof(pa), "%s/lock.a", d);
	snprintf(pb, sizeof(pb), "%s/lock.b", d);
	snprintf(pc, sizeof(pc), "%s/lock.c", d);
	int a = open(pa, O_RDWR | O_CREAT, 0600), b = open(pb, O_RDWR | O_CREAT, 0600),
	    c = open(pc, O_RDWR | O_CREAT, 0600);
	if (flock(a, LOCK_EX))
		fail("flock");
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 5, .l_len = 10 };
	if (fcntl(b, F_SETLK, &fl))
		fail("F_SETLK");
	struct flock ofd = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
	if (fcntl(c, F_OFD_SETLK, &ofd))
		fail("F_OFD_SETLK");
	test_ready();
	test_waitsig();
	pid_t p = fork();
	if (p == 0)
		_exit(check_from_child());
	int st;
	waitpid(p, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		fail("a lock is gone after restore (check %d)", WEXITSTATUS(st));
	pass();
}
