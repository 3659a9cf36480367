/* Regular files: offsets, open flags, close-on-exec, fds sharing one open
 * file description (dup), /dev/null, a symlink held itself with
 * O_PATH|O_NOFOLLOW, cwd and umask. */
#include "zdtmlib.h"
#include <sys/stat.h>

int main(void)
{
	test_init();
	const char *dir = getenv("ZDTM_DIR");
	char p1[4096], p2[4096], sub[4096];
	snprintf(p1, sizeof(p1), "%s/files.a", dir);
	snprintf(p2, sizeof(p2), "%s/files.b", dir);
	snprintf(sub, sizeof(sub), "%s/files.cwd", dir);
	int a = open(p1, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (a < 0 || write(a, "0123456789abcdef", 16) != 16)
		fail("file a");
	lseek(a, 5, SEEK_SET);
	int b = open(p2, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (b < 0 || write(b, "xyz", 3) != 3)
		fail("file b");
	int r = open(p1, O_RDONLY | O_NONBLOCK);
	lseek(r, 11, SEEK_SET);
	int d = dup(a);
	int hi = fcntl(r, F_DUPFD, 100);
	lseek(hi, 2, SEEK_SET); /* moves r too: they share the description */
	int devnull = open("/dev/null", O_WRONLY);
	char lnk[4096];
	snprintf(lnk, sizeof(lnk), "%s/files.link", dir);
	if (symlink("files.a", lnk))
		fail("symlink");
	int l = open(lnk, O_PATH | O_NOFOLLOW);
	if (l < 0)
		fail("open the symlink itself");
	mkdir(sub, 0700);
	if (chdir(sub))
		fail("chdir");
	umask(027);
	test_ready();
	test_waitsig();
	if (lseek(a, 0, SEEK_CUR) != 5)
		fail("offset of a");
	char c;
	if (read(d, &c, 1) != 1 || c != '5' || lseek(a, 0, SEEK_CUR) != 6)
		fail("dup'd fd does not share the offset");
	if (lseek(r, 0, SEEK_CUR) != 2 || lseek(hi, 0, SEEK_CUR) != 2)
		fail("offset of r/hi");
	if ((fcntl(a, F_GETFL) & O_ACCMODE) != O_RDWR)
		fail("flags of a");
	if (!(fcntl(b, F_GETFL) & O_APPEND) || !(fcntl(b, F_GETFD) & FD_CLOEXEC))
		fail("flags of b");
	if (!(fcntl(r, F_GETFL) & O_NONBLOCK) || (fcntl(r, F_GETFD) & FD_CLOEXEC))
		fail("flags of r");
	if (write(b, "w", 1) != 1 || lseek(b, 0, SEEK_CUR) != 4)
		fail("append on b");
	if (write(devnull, "x", 1) != 1)
		fail("/dev/null");
	struct stat ls;
	char target[64] = { 0 };
	if (fstatat(l, "", &ls, AT_EMPTY_PATH) || !S_ISLNK(ls.st_mode) ||
	    readlinkat(l, "", target, sizeof(target)) < 0 || strcmp(target, "files.a"))
		fail("the O_PATH fd is no longer the symlink itself (%s)", target);
	char cwd[4096];
	if (!getcwd(cwd, sizeof(cwd)) || strcmp(cwd, sub))
		fail("cwd is %s", cwd);
	mode_t m = umask(0);
	if (m != 027)
		fail("umask %o", m);
	pass();
}
