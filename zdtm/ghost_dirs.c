/* Deleted directories and roots: the task's cwd was removed, it holds an
 * fd of a directory whose parent was removed too, and a child lives
 * chrooted in a jail with its cwd inside it. After restore the deleted
 * ones are still deleted (nlink 0, "(deleted)" in /proc) with their mode
 * and owner, the fd still lists its entries, and the child still sees the
 * jail as its root. */
#include "zdtmlib.h"
#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>

static void check_deleted(int fd, const char *what, mode_t mode)
{
	struct stat st;
	if (fstat(fd, &st))
		fail("fstat %s", what);
	if (!S_ISDIR(st.st_mode) || st.st_nlink != 0)
		fail("%s: nlink %lu, not a deleted directory", what, (unsigned long)st.st_nlink);
	if ((st.st_mode & 07777) != mode)
		fail("%s: mode %o, expected %o", what, st.st_mode & 07777, mode);
	if (st.st_uid != 123 || st.st_gid != 456)
		fail("%s: owner %d:%d", what, st.st_uid, st.st_gid);
}

int main(void)
{
	test_init();
	const char *dir = getenv("ZDTM_DIR");
	char p[4096], q[4096];

	/* A jailed child: root dir/jail, cwd /inner. */
	snprintf(p, sizeof(p), "%s/jail", dir);
	mkdir(p, 0755);
	snprintf(p, sizeof(p), "%s/jail/inner", dir);
	mkdir(p, 0755);
	snprintf(p, sizeof(p), "%s/jail/marker", dir);
	close(open(p, O_CREAT | O_WRONLY, 0644));
	int ready[2];
	if (pipe(ready))
		fail("pipe");
	pid_t child = fork();
	if (child == 0) {
		snprintf(p, sizeof(p), "%s/jail", dir);
		if (chroot(p) || chdir("/inner"))
			_exit(2);
		close(ready[0]);
		close(ready[1]);
		test_waitsig();
		struct stat st;
		if (stat("/marker", &st) || !S_ISREG(st.st_mode))
			_exit(3);
		if (!getcwd(q, sizeof(q)) || strcmp(q, "/inner"))
			_exit(4);
		_exit(0);
	}
	close(ready[1]);
	char b;
	if (read(ready[0], &b, 1) != 0)
		fail("child did not start");
	close(ready[0]);

	/* Our cwd, removed. */
	snprintf(p, sizeof(p), "%s/gone", dir);
	if (mkdir(p, 0700) || chmod(p, 0751) || chown(p, 123, 456) || chdir(p) || rmdir(p))
		fail("making a deleted cwd");
	/* An fd of a directory with an entry... */
	snprintf(p, sizeof(p), "%s/gone2", dir);
	snprintf(q, sizeof(q), "%s/gone2/sub", dir);
	if (mkdir(p, 0755) || mkdir(q, 0700) || chmod(q, 0710) || chown(q, 123, 456))
		fail("mkdir");
	int dfd = open(q, O_RDONLY | O_DIRECTORY);
	if (dfd < 0)
		fail("open dir");
	/* ...then removed, with its parent. */
	if (rmdir(q) || rmdir(p))
		fail("rmdir");
	off_t pos = lseek(dfd, 0, SEEK_CUR);

	test_ready();
	test_waitsig();

	int cwd = open(".", O_RDONLY | O_DIRECTORY);
	if (cwd < 0)
		fail("open cwd");
	check_deleted(cwd, "cwd", 0751);
	check_deleted(dfd, "fd", 0710);
	ssize_t n = readlink("/proc/self/cwd", q, sizeof(q) - 1);
	if (n < 0)
		fail("readlink cwd");
	q[n] = 0;
	if (!strstr(q, "/gone") || !strstr(q, "(deleted)"))
		fail("cwd reads %s", q);
	if (lseek(dfd, 0, SEEK_CUR) != pos)
		fail("fd offset moved");
	int fl = fcntl(dfd, F_GETFL);
	if ((fl & O_ACCMODE) != O_RDONLY || !(fl & O_DIRECTORY))
		fail("fd flags %o", fl);
	/* A deleted directory lists nothing at all (the kernel answers ENOENT). */
	DIR *d = fdopendir(dfd);
	if (!d)
		fail("fdopendir");
	if (readdir(d))
		fail("readdir of the deleted directory found an entry");
	kill(child, SIGTERM);
	int st;
	if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("the jailed child: status %x", st);
	pass();
}
