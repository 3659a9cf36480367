/* fd tables and fs contexts shared by processes (CLONE_FILES, CLONE_FS).
 *
 *   root ─┬─ files  (CLONE_FILES)             ─┬─ grand (CLONE_FILES | CLONE_FS)
 *         │                                    └─ own   (fork: a copy of the table)
 *         └─ fs     (CLONE_FS)
 *
 * After restore, kcmp tells the same sharing as before, and it behaves as
 * one: an fd the root opens is read by files and grand and is not in own;
 * an fd grand closes is gone in the root; a directory and umask fs sets
 * are the root's, and those grand sets are files'. The processes talk
 * through shared anonymous memory, so no fd of theirs is a test device.
 *
 * With "siblings": the root clones two children with CLONE_FILES and then
 * unshares its own table, so the children share one that is not their
 * parent's, which crust refuses to dump; the tree runs on. */
#include "zdtmlib.h"
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef KCMP_FILES
#define KCMP_FILES 2
#define KCMP_FS 3
#endif

#define OLD_FD 50  /* opened before the dump, closed by grand after */
#define NEW_FD 100 /* opened by the root after the restore */

enum { FILES, GRAND, OWN, FS, N };
#define LAST 4 /* every process ends */
static const char *names[N] = { "files", "grand", "own", "fs" };

struct shm {
	volatile int step;
	volatile int done[N];
	volatile pid_t pid[N];
	char err[N][160];
};
static struct shm *shm;
static char dir_a[4096], dir_b[4096], dir_c[4096], old_path[4096], new_path[4096];

static pid_t clone_sharing(unsigned long flags)
{
	return syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
}

static int kcmp(pid_t a, pid_t b, int type)
{
	return syscall(SYS_kcmp, a, b, type, 0, 0);
}

static void wait_step(int s)
{
	while (shm->step < s)
		usleep(1000);
}

/* A child's verdict on a step: 1 passed, 2 failed (err says why). */
static void ok(int i)
{
	__sync_synchronize();
	shm->done[i] = 1;
}

/* A child failed: says why, and ends once the root gave up. */
static void child_fail(int i, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(shm->err[i], sizeof(shm->err[i]), fmt, ap);
	va_end(ap);
	__sync_synchronize();
	shm->done[i] = 2;
	wait_step(LAST);
	_exit(1);
}

/* The root: lets every child end, then fails. */
#define root_fail(...)                   \
	do {                             \
		shm->step = LAST;        \
		fail(__VA_ARGS__);       \
	} while (0)

/* The root waits until child i answered the step; fails on its failure. */
static void wait_child(int i)
{
	for (int t = 0; !shm->done[i]; t++) {
		if (t > 20000)
			root_fail("%s did not answer", names[i]);
		usleep(1000);
	}
	if (shm->done[i] != 1)
		root_fail("%s: %s", names[i], shm->err[i]);
	shm->done[i] = 0;
}

static int read_is(int fd, const char *want)
{
	char b[64] = { 0 };
	return pread(fd, b, sizeof(b) - 1, 0) == (ssize_t)strlen(want) && !strcmp(b, want);
}

static int cwd_is(const char *d)
{
	char b[4096];
	return getcwd(b, sizeof(b)) && !strcmp(b, d);
}

static mode_t get_umask(void)
{
	mode_t m = umask(0);
	umask(m);
	return m;
}

static void run_grand(void)
{
	shm->pid[GRAND] = getpid();
	wait_step(1);
	if (!read_is(OLD_FD, "old") || !read_is(NEW_FD, "new"))
		child_fail(GRAND, "fd %d or %d does not read back (errno %d)", OLD_FD, NEW_FD, errno);
	if (close(OLD_FD))
		child_fail(GRAND, "closing fd %d: %m", OLD_FD);
	ok(GRAND);
	wait_step(2);
	/* Shared with files, not with the root: files sees this directory. */
	if (chdir(dir_c) || !cwd_is(dir_c))
		child_fail(GRAND, "chdir %s: %m", dir_c);
	umask(0033);
	ok(GRAND);
	wait_step(LAST);
	_exit(0);
}

static void run_own(void)
{
	shm->pid[OWN] = getpid();
	wait_step(1);
	/* A copy of the table made at fork: the old fd, none of the new. */
	if (!read_is(OLD_FD, "old"))
		child_fail(OWN, "fd %d is lost in the copied table (errno %d)", OLD_FD, errno);
	if (fcntl(NEW_FD, F_GETFD) != -1)
		child_fail(OWN, "fd %d, opened after the fork in another table, is here", NEW_FD);
	ok(OWN);
	wait_step(LAST);
	if (fcntl(OLD_FD, F_GETFD) == -1)
		_exit(3); /* grand's close must not reach this table */
	_exit(0);
}

static void run_files(void)
{
	shm->pid[FILES] = getpid();
	pid_t g = clone_sharing(CLONE_FILES | CLONE_FS);
	if (g == 0)
		run_grand();
	pid_t o = fork();
	if (o == 0)
		run_own();
	if (g < 0 || o < 0)
		_exit(2);
	wait_step(1);
	if (!read_is(NEW_FD, "new"))
		child_fail(FILES, "fd %d the root opened does not read back (errno %d)", NEW_FD, errno);
	if (!cwd_is(dir_a))
		child_fail(FILES, "cwd is not %s (the root's fs reached it?)", dir_a);
	ok(FILES);
	wait_step(3);
	/* grand changed the fs context it shares with this process. */
	if (!cwd_is(dir_c) || get_umask() != 0033)
		child_fail(FILES, "grand's cwd %s and umask 033 did not reach files (umask %03o)", dir_c,
			   get_umask());
	ok(FILES);
	int st, bad = 0;
	while (wait(&st) > 0)
		bad |= !WIFEXITED(st) || WEXITSTATUS(st);
	_exit(bad ? 4 : 0);
}

static void run_fs(void)
{
	shm->pid[FS] = getpid();
	wait_step(1);
	if (fcntl(NEW_FD, F_GETFD) != -1)
		child_fail(FS, "fd %d of the root's table is here", NEW_FD);
	if (chdir(dir_b))
		child_fail(FS, "chdir %s: %m", dir_b);
	umask(0027);
	ok(FS);
	wait_step(LAST);
	_exit(0);
}

static void siblings(void)
{
	pid_t kids[2];
	for (int i = 0; i < 2; i++) {
		kids[i] = clone_sharing(CLONE_FILES);
		if (kids[i] == 0) {
			wait_step(LAST);
			_exit(0);
		}
		if (kids[i] < 0)
			root_fail("clone: %m");
	}
	if (unshare(CLONE_FILES))
		root_fail("unshare: %m");
	if (kcmp(kids[0], kids[1], KCMP_FILES) || !kcmp(getpid(), kids[0], KCMP_FILES))
		root_fail("the children do not share a table apart from the root");
	test_ready();
	test_waitsig();
	shm->step = LAST;
	int st, bad = 0;
	while (wait(&st) > 0)
		if (!WIFEXITED(st) || WEXITSTATUS(st))
			bad = st;
	if (bad)
		fail("a child ended with status %#x", bad);
	pass();
}

int main(int argc, char **argv)
{
	test_init();
	const char *wd = getenv("ZDTM_DIR");
	if (!wd)
		wd = "/tmp";
	snprintf(dir_a, sizeof(dir_a), "%s/fdt-a", wd);
	snprintf(dir_b, sizeof(dir_b), "%s/fdt-b", wd);
	snprintf(dir_c, sizeof(dir_c), "%s/fdt-c", wd);
	snprintf(old_path, sizeof(old_path), "%s/fdt-old", wd);
	snprintf(new_path, sizeof(new_path), "%s/fdt-new", wd);
	if (mkdir(dir_a, 0755) || mkdir(dir_b, 0755) || mkdir(dir_c, 0755) || chdir(dir_a))
		fail("making directories: %m");
	umask(0022);
	int fd = open(old_path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, "old", 3) != 3 || dup2(fd, OLD_FD) != OLD_FD || close(fd))
		fail("opening %s: %m", old_path);
	shm = mmap(NULL, sizeof(*shm), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shm == MAP_FAILED)
		fail("mmap: %m");
	if (argc > 1 && !strcmp(argv[1], "siblings"))
		siblings();

	pid_t files = clone_sharing(CLONE_FILES);
	if (files == 0)
		run_files();
	pid_t fs = clone_sharing(CLONE_FS);
	if (fs == 0)
		run_fs();
	if (files < 0 || fs < 0)
		fail("clone: %m");
	for (int i = 0; i < N; i++)
		while (!shm->pid[i])
			usleep(1000);
	test_ready();
	test_waitsig();

	pid_t me = getpid(), grand = shm->pid[GRAND], own = shm->pid[OWN];
	if (kcmp(me, files, KCMP_FILES) || kcmp(files, grand, KCMP_FILES))
		root_fail("root, files and grand no longer share one fd table");
	if (!kcmp(files, own, KCMP_FILES) || !kcmp(me, fs, KCMP_FILES))
		root_fail("own or fs shares an fd table it did not");
	if (kcmp(me, fs, KCMP_FS) || kcmp(files, grand, KCMP_FS))
		root_fail("root and fs, or files and grand, no longer share their fs context");
	if (!kcmp(me, files, KCMP_FS) || !kcmp(files, own, KCMP_FS))
		root_fail("files or own shares an fs context it did not");

	/* Step 1: a new fd in the shared table, which grand reads and where it
	 * closes the old one; fs moves the fs context it shares with the root. */
	fd = open(new_path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, "new", 3) != 3 || dup2(fd, NEW_FD) != NEW_FD || close(fd))
		root_fail("opening %s: %m", new_path);
	shm->step = 1;
	for (int i = 0; i < N; i++)
		wait_child(i);
	if (fcntl(OLD_FD, F_GETFD) != -1)
		root_fail("fd %d, closed by grand, is still in the root's table", OLD_FD);
	if (!cwd_is(dir_b) || get_umask() != 0027)
		root_fail("the cwd %s and umask 027 fs set did not reach the root (umask %03o)", dir_b,
			  get_umask());

	/* Steps 2 and 3: grand moves the fs context it shares with files. */
	shm->step = 2;
	wait_child(GRAND);
	shm->step = 3;
	wait_child(FILES);

	shm->step = LAST;
	int st, bad = 0;
	while (wait(&st) > 0)
		if (!WIFEXITED(st) || WEXITSTATUS(st))
			bad = st;
	if (bad)
		fail("a child ended with status %#x", bad);
	pass();
}
