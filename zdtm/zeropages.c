/* Pages only ever read map the kernel's zero page: they hold nothing to
 * store (the runner checks the pages image is small), and after restore
 * they read as zeros and can be written. */
#include "zdtmlib.h"
#include <sys/mman.h>

#define SIZE (64 << 20)

int main(void)
{
	test_init();
	volatile unsigned char *m = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap");
	/* Keep transparent huge pages out: the huge zero page is another story. */
	madvise((void *)m, SIZE, MADV_NOHUGEPAGE);
	unsigned long sum = 0;
	for (long i = 0; i < SIZE; i += 4096)
		sum += m[i];
	if (sum)
		fail("fresh memory is not zero");
	m[0] = 1;
	test_ready();
	test_waitsig();
	for (long i = 0; i < SIZE; i += 4096)
		if (m[i] != (i == 0))
			fail("page at %ld", i);
	for (long i = 0; i < SIZE; i += 4096)
		m[i] = 2;
	pass();
}
