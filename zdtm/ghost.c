/* Files with no name: a file deleted while open (contents, mode, offset),
 * a memfd (name, contents, seals), and an O_PATH fd. */
#include "zdtmlib.h"
#include <sys/mman.h>
#include <sys/stat.h>

int main(void)
{
	test_init();
	char path[4096];
	snprintf(path, sizeof(path), "%s/ghost.txt", getenv("ZDTM_DIR"));
	int g = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
	if (g < 0 || write(g, "ghost data", 10) != 10)
		fail("ghost file");
	unlink(path);
	lseek(g, 3, SEEK_SET);
	int m = memfd_create("crust-test", MFD_ALLOW_SEALING);
	if (m < 0 || write(m, "memfd content", 13) != 13)
		fail("memfd");
	if (fcntl(m, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK))
		fail("seals");
	lseek(m, 6, SEEK_SET);
	int op = open(getenv("ZDTM_DIR"), O_PATH | O_DIRECTORY);
	if (op < 0)
		fail("O_PATH");
	test_ready();
	test_waitsig();
	char buf[32] = { 0 };
	if (read(g, buf, 7) != 7 || memcmp(buf, "st data", 7))
		fail("ghost file contents/offset: %s", buf);
	struct stat st;
	fstat(g, &st);
	if (st.st_nlink != 0 || (st.st_mode & 0777) != 0640)
		fail("ghost file: nlink %ld mode %o", (long)st.st_nlink, st.st_mode & 0777);
	memset(buf, 0, sizeof(buf));
	if (read(m, buf, 7) != 7 || memcmp(buf, "content", 7))
		fail("memfd contents/offset: %s", buf);
	if (fcntl(m, F_GET_SEALS) != (F_SEAL_GROW | F_SEAL_SHRINK))
		fail("memfd seals %x", fcntl(m, F_GET_SEALS));
	char link[256] = { 0 }, fdp[64];
	snprintf(fdp, sizeof(fdp), "/proc/self/fd/%d", m);
	readlink(fdp, link, sizeof(link) - 1);
	if (strncmp(link, "/memfd:crust-test", 17))
		fail("memfd name %s", link);
	if (!(fcntl(op, F_GETFL) & O_PATH))
		fail("O_PATH lost");
	if (fstatat(op, "test.log", &st, 0))
		fail("O_PATH dir fd does not resolve");
	pass();
}
