/* One shared anonymous memory object seen four ways: its MAP_SHARED
 * mapping, an fd opened through /proc/self/map_files, a second MAP_SHARED
 * mapping of that fd, and a MAP_PRIVATE mapping of it with one page copied
 * on write. After restore they are still one object: a write through the
 * first mapping shows in the second, through the fd, and in the private
 * mapping's pages that were never written, not in the copied one. */
#include "zdtmlib.h"
#include <sys/mman.h>

int main(void)
{
	test_init();
	long pg = sysconf(_SC_PAGESIZE);
	char *shared = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED)
		fail("mmap");
	char path[128];
	snprintf(path, sizeof(path), "/proc/self/map_files/%lx-%lx", (long)shared, (long)shared + 4 * pg);
	int fd = open(path, O_RDWR);
	if (fd < 0)
		fail("open %s", path);
	char *again = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 2 * pg);
	char *priv = mmap(NULL, 3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, pg);
	if (again == MAP_FAILED || priv == MAP_FAILED)
		fail("mmap of the fd");
	for (int i = 0; i < 4; i++)
		shared[i * pg] = 'a' + i;
	priv[0] = 'P'; /* page 1 of the object, copied */
	test_ready();
	test_waitsig();

	if (priv[0] != 'P' || priv[pg] != 'c' || priv[2 * pg] != 'd' || again[0] != 'c')
		fail("contents: priv %c %c %c, again %c", priv[0], priv[pg], priv[2 * pg], again[0]);
	shared[pg] = 'X';
	shared[2 * pg] = 'Y';
	if (again[0] != 'Y')
		fail("the second shared mapping does not see the object (%c)", again[0]);
	if (priv[pg] != 'Y')
		fail("the private mapping's unwritten page does not see the object (%c)", priv[pg]);
	if (priv[0] != 'P')
		fail("the private copy changed (%c)", priv[0]);
	char c;
	if (pread(fd, &c, 1, pg) != 1 || c != 'X')
		fail("the fd reads %c", c);
	if (pwrite(fd, "Z", 1, 3 * pg) != 1 || shared[3 * pg] != 'Z' || priv[2 * pg] != 'Z')
		fail("a write through the fd does not show in the mappings");
	pass();
}
