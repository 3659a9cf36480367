/* Touches MIB of fresh memory and frees it. This VM hands memory that stays
 * free for a few seconds back to its host (virtio-balloon free page
 * reporting); the first write to such memory faults in the host and costs
 * more than the copy itself. A benchmark step run right after this finds
 * memory the host backs, whatever ran before it: every tool and the write()
 * bound start from the same state. Usage: warm MIB */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
	size_t size = (size_t)strtoull(argv[1], NULL, 0) << 20;
	char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 1;
	memset(m, 1, size);
	return 0;
}
