/* Benchmark target and kill-safety test: SIZE MiB (argv[1], default 1 GiB) of touched anonymous memory with a known pattern.
 * After restore, SIGTERM makes it verify every page and exit 0 on success. */
#include "zdtmlib.h"
#include <stdint.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
	size_t size = (argc > 1 ? strtoull(argv[1], NULL, 0) : 1024) << 20;
	test_init();
	/* Whatever fds the benchmark's caller leaked must not reach the dump. */
	syscall(436 /* close_range */, 3, ~0U, 0);
	uint64_t *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap");
	for (size_t i = 0; i < size / 8; i++)
		m[i] = i * 0x9e3779b97f4a7c15ULL;
	test_ready();
	test_waitsig();
	for (size_t i = 0; i < size / 8; i++)
		if (m[i] != i * 0x9e3779b97f4a7c15ULL)
			fail("word %zu", i);
	pass();
}
