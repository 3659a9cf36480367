/* Files without a name, each kind the kernel has:
 *  - a sparse deleted file of 1 GiB with three runs of data: after restore
 *    the same size, the same data, and holes where the holes were (the
 *    runner checks that the images hold the data, not the gigabyte);
 *  - one deleted file opened twice (two descriptions) and by a child: a
 *    write through one is read through the others, it is one file still;
 *  - owner, mode and times of a deleted file and of a memfd;
 *  - a memfd holding an executable, run with execveat after restore (a
 *    reopened memfd would count as a writer: ETXTBSY);
 *  - an O_TMPFILE file, and a deleted file opened with O_NOFOLLOW;
 *  - a deleted FIFO with bytes in its buffer, a deleted device node and a
 *    deleted symlink held with O_PATH.
 * With "linked": a file deleted at one name but linked at another comes back
 * as that same file (dumped with --link-remap). */
#include "zdtmlib.h"
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>

#define GIB (1L << 30)

static char path[4096];
static const char *dir;

static const char *at(const char *name)
{
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return path;
}

static void check_owner_mode_times(int fd, const char *what, mode_t mode)
{
	struct stat st;
	if (fstat(fd, &st))
		fail("fstat %s", what);
	if (st.st_uid != 1234 || st.st_gid != 5678)
		fail("%s: owner %d:%d", what, st.st_uid, st.st_gid);
	if ((st.st_mode & 07777) != mode)
		fail("%s: mode %o", what, st.st_mode & 07777);
	if (st.st_mtim.tv_sec != 1000000000 || st.st_mtim.tv_nsec != 123456789)
		fail("%s: mtime %ld.%09ld", what, st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
}

static void set_owner_mode_times(int fd, mode_t mode)
{
	struct timespec t[2] = { { 999999999, 0 }, { 1000000000, 123456789 } };
	if (fchown(fd, 1234, 5678) || fchmod(fd, mode) || futimens(fd, t))
		fail("owner, mode or times");
}

static int linked_mode(void)
{
	char first[4096];
	snprintf(first, sizeof(first), "%s", at("linked.a"));
	int fd = open(first, O_CREAT | O_RDWR, 0644);
	if (fd < 0 || write(fd, "same file", 9) != 9 || link(first, at("linked.b")))
		fail("making a file with two names");
	unlink(at("linked.a"));
	test_ready();
	test_waitsig();
	struct stat a, b;
	if (fstat(fd, &a) || stat(at("linked.b"), &b))
		fail("stat");
	if (a.st_ino != b.st_ino || a.st_dev != b.st_dev)
		fail("the fd holds another file than linked.b (inode %lu, not %lu)", a.st_ino, b.st_ino);
	if (pwrite(fd, "SAME", 4, 0) != 4)
		fail("pwrite");
	char buf[16] = { 0 };
	int other = open(at("linked.b"), O_RDONLY);
	if (other < 0 || read(other, buf, 9) != 9 || strcmp(buf, "SAME file"))
		fail("linked.b reads %s", buf);
	char dirents[256];
	snprintf(dirents, sizeof(dirents), "ls -a %s | grep -q link-remap", dir);
	if (system(dirents) == 0)
		fail("the --link-remap name was left behind");
	pass();
	return 0;
}

int main(int argc, char **argv)
{
	test_init();
	dir = getenv("ZDTM_DIR");
	if (argc > 1 && !strcmp(argv[1], "linked"))
		return linked_mode();

	/* Sparse. */
	int sparse = open(at("sparse"), O_CREAT | O_RDWR, 0600);
	if (sparse < 0 || ftruncate(sparse, GIB))
		fail("sparse file");
	long offs[3] = { 0, GIB / 2, GIB - 8192 };
	for (int i = 0; i < 3; i++)
		if (pwrite(sparse, "data run", 8, offs[i]) != 8)
			fail("pwrite");
	unlink(at("sparse"));

	/* One deleted file, two descriptions and a child. */
	int a = open(at("shared"), O_CREAT | O_RDWR, 0600);
	int b = open(at("shared"), O_RDWR);
	unlink(at("shared"));
	int go[2];
	if (a < 0 || b < 0 || pipe(go))
		fail("shared file");
	pid_t child = fork();
	if (child == 0) {
		char c, buf[8] = { 0 };
		close(go[1]);
		if (read(go[0], &c, 1) != 1)
			_exit(2);
		_exit(pread(b, buf, 5, 0) == 5 && !strcmp(buf, "hello") ? 0 : 3);
	}
	close(go[0]);

	/* Owner, mode, times. */
	int owned = open(at("owned"), O_CREAT | O_RDWR, 0600);
	if (owned < 0 || write(owned, "x", 1) != 1)
		fail("owned file");
	set_owner_mode_times(owned, 0641);
	unlink(at("owned"));
	int mfd = memfd_create("owned-memfd", MFD_ALLOW_SEALING);
	if (mfd < 0 || write(mfd, "memfd", 5) != 5)
		fail("memfd");
	set_owner_mode_times(mfd, 0642);
	fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK);

	/* An executable memfd. */
	int exe = memfd_create("true", 0);
	int src = open("/bin/true", O_RDONLY);
	char buf[65536];
	ssize_t n;
	while (src >= 0 && (n = read(src, buf, sizeof(buf))) > 0)
		if (write(exe, buf, n) != n)
			fail("copying /bin/true");
	close(src);

	/* O_TMPFILE, O_NOFOLLOW. */
	int tmpf = open(dir, O_TMPFILE | O_RDWR, 0600);
	int nofollow = open(at("nofollow"), O_CREAT | O_RDWR | O_NOFOLLOW, 0600);
	if (tmpf < 0 || nofollow < 0 || write(tmpf, "tmp", 3) != 3 || write(nofollow, "nf", 2) != 2)
		fail("O_TMPFILE or O_NOFOLLOW file");
	unlink(at("nofollow"));

	/* FIFO, device node, symlink. */
	if (mkfifo(at("fifo"), 0600))
		fail("mkfifo");
	int fifo = open(at("fifo"), O_RDWR);
	if (fifo < 0 || write(fifo, "queued", 6) != 6)
		fail("fifo");
	unlink(at("fifo"));
	if (mknod(at("null"), S_IFCHR | 0600, makedev(1, 3)))
		fail("mknod");
	int null = open(at("null"), O_WRONLY);
	unlink(at("null"));
	if (symlink("somewhere/else", at("link")))
		fail("symlink");
	int link = open(at("link"), O_PATH | O_NOFOLLOW);
	unlink(at("link"));
	if (null < 0 || link < 0)
		fail("device or symlink");

	test_ready();
	test_waitsig();

	struct stat st;
	if (fstat(sparse, &st) || st.st_size != GIB)
		fail("sparse size %ld", (long)st.st_size);
	for (int i = 0; i < 3; i++) {
		char d[9] = { 0 };
		if (pread(sparse, d, 8, offs[i]) != 8 || strcmp(d, "data run"))
			fail("sparse data at %ld: %s", offs[i], d);
	}
	if (lseek(sparse, 8, SEEK_HOLE) > 4096 || lseek(sparse, 8192, SEEK_DATA) != GIB / 2 - (GIB / 2) % 4096)
		fail("the holes of the sparse file were filled");
	if (st.st_blocks * 512 > 1 << 20)
		fail("the sparse file takes %ld bytes", (long)st.st_blocks * 512);

	if (pwrite(a, "hello", 5, 0) != 5)
		fail("pwrite");
	char r[8] = { 0 };
	if (pread(b, r, 5, 0) != 5 || strcmp(r, "hello"))
		fail("the second description reads %s: another file", r);
	if (write(go[1], "g", 1) != 1)
		fail("waking the child");
	int cst;
	if (waitpid(child, &cst, 0) != child || !WIFEXITED(cst) || WEXITSTATUS(cst))
		fail("the child read another file (status %x)", cst);

	check_owner_mode_times(owned, "deleted file", 0641);
	check_owner_mode_times(mfd, "memfd", 0642);
	if (fcntl(mfd, F_GET_SEALS) != F_SEAL_SHRINK)
		fail("memfd seals %x", fcntl(mfd, F_GET_SEALS));

	pid_t t = fork();
	if (t == 0) {
		char *args[] = { "true", NULL }, *env[] = { NULL };
		syscall(SYS_execveat, exe, "", args, env, AT_EMPTY_PATH);
		_exit(errno);
	}
	if (waitpid(t, &cst, 0) != t || !WIFEXITED(cst) || WEXITSTATUS(cst))
		fail("running the memfd: status %x (errno %d)", cst, WEXITSTATUS(cst));

	char tb[4] = { 0 };
	if (pread(tmpf, tb, 3, 0) != 3 || strcmp(tb, "tmp"))
		fail("O_TMPFILE file reads %s", tb);
	if (pread(nofollow, tb, 2, 0) != 2 || strncmp(tb, "nf", 2))
		fail("O_NOFOLLOW file");
	char q[8] = { 0 };
	if (read(fifo, q, 6) != 6 || strcmp(q, "queued"))
		fail("the deleted FIFO held %s", q);
	if (fstat(null, &st) || !S_ISCHR(st.st_mode) || st.st_rdev != makedev(1, 3) || write(null, "x", 1) != 1)
		fail("the deleted device node");
	char target[64] = { 0 };
	if (readlinkat(link, "", target, sizeof(target)) < 0 || strcmp(target, "somewhere/else"))
		fail("the deleted symlink points to %s", target);
	pass();
}
