/* Mappings of files with no name: a memfd mapped shared by this process and
 * its child while an fd to it stays open; a sealed memfd mapped read-only
 * with no fd left; a deleted file mapped both private (with a page of its
 * own) and shared; and, with argv[1] = "self-delete", the program's own
 * binary deleted under it. After restore each mapping holds its data and
 * the mappings, fds and processes of one file still share it. */
#include "zdtmlib.h"
#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096

static char *shm, *sealed, *priv, *shared;
static int shm_fd;

static void fill(char *p, int seed, int pages)
{
	for (int i = 0; i < pages * PG; i++)
		p[i] = (char)(seed + i * 13);
}

static int same(const char *p, int seed, int from, int to)
{
	for (int i = from; i < to; i++)
		if (p[i] != (char)(seed + i * 13))
			return 0;
	return 1;
}

int main(int argc, char **argv)
{
	test_init();
	if (argc > 1 && !strcmp(argv[1], "self-delete")) {
		char exe[4096];
		ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
		if (n <= 0)
			fail("readlink: %m");
		exe[n] = 0;
		if (unlink(exe))
			fail("unlink %s: %m", exe);
	}

	shm_fd = memfd_create("shm-a", MFD_CLOEXEC);
	ftruncate(shm_fd, 16 * PG);
	shm = mmap(NULL, 16 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
	fill(shm, 1, 16);

	int sfd = memfd_create("sealed", MFD_ALLOW_SEALING);
	ftruncate(sfd, 4 * PG);
	char *w = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
	fill(w, 2, 4);
	munmap(w, 4 * PG);
	int seals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
	if (fcntl(sfd, F_ADD_SEALS, seals))
		fail("F_ADD_SEALS: %m");
	sealed = mmap(NULL, 4 * PG, PROT_READ, MAP_SHARED, sfd, 0);
	close(sfd);

	char path[4096];
	snprintf(path, sizeof(path), "%s/deleted.bin", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	int dfd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
	char buf[3 * PG];
	fill(buf, 3, 3);
	write(dfd, buf, sizeof(buf));
	priv = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, dfd, 0);
	shared = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, 0);
	memset(priv + PG, 'p', PG);   /* a private copy of page 1 */
	memset(shared + 2 * PG, 's', PG); /* page 2 changed in the file */
	close(dfd);
	unlink(path);

	int ready[2];
	pipe(ready);
	pid_t child = fork();
	if (child == 0) {
		write(ready[1], "r", 1);
		test_waitsig();
		/* The parent wrote "hello" through its fd after the restore. */
		if (memcmp(shm + 100, "hello", 5))
			_exit(2);
		memcpy(shm + 200, "world", 5);
		_exit(same(sealed, 2, 0, 4 * PG) ? 0 : 3);
	}
	char b;
	read(ready[0], &b, 1);
	test_ready();
	test_waitsig();

	if (!same(shm, 1, 0, 16 * PG))
		fail("memfd mapping lost its data");
	if (!same(sealed, 2, 0, 4 * PG))
		fail("sealed memfd mapping lost its data");
	if (!same(priv, 3, 0, PG) || priv[PG] != 'p' || priv[2 * PG] != 's')
		fail("private mapping of the deleted file differs");
	if (!same(shared, 3, 0, 2 * PG) || shared[2 * PG] != 's')
		fail("shared mapping of the deleted file differs");
	/* One file behind both mappings of the deleted file. */
	shared[0] = 'X';
	if (priv[0] != 'X')
		fail("the two mappings of the deleted file no longer share it");
	/* The memfd: fd, own mapping and the child's mapping are one file. */
	if (pwrite(shm_fd, "hello", 5, 100) != 5)
		fail("pwrite: %m");
	if (memcmp(shm + 100, "hello", 5))
		fail("the memfd's fd and mapping no longer share it");
	kill(child, SIGTERM);
	int st;
	waitpid(child, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("the child saw wrong memfd contents (status %#x)", st);
	char got[5];
	if (pread(shm_fd, got, 5, 200) != 5 || memcmp(got, "world", 5))
		fail("the child's write to the shared memfd did not reach the parent");
	/* Seals came back (the file is reachable through map_files). */
	char mf[128];
	snprintf(mf, sizeof(mf), "/proc/self/map_files/%lx-%lx", (unsigned long)sealed,
		 (unsigned long)sealed + 4 * PG);
	int rfd = open(mf, O_RDONLY);
	if (rfd < 0 || fcntl(rfd, F_GET_SEALS) != seals)
		fail("the memfd's seals changed: %#x", rfd < 0 ? -1 : fcntl(rfd, F_GET_SEALS));
	if (argc > 1) {
		char exe[4096];
		ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
		exe[n > 0 ? n : 0] = 0;
		if (!strstr(exe, "(deleted)"))
			fail("/proc/self/exe is %s, not a deleted file", exe);
	}
	pass();
}
