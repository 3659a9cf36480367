/* The seed's counter: counts up once per sleep; after restore the count must
 * go on from where it was, never restart. */
#include "zdtmlib.h"

int main(void)
{
	test_init();
	long count = 0, last_seen = -1;
	test_ready();
	while (!test_done()) {
		if (count != last_seen + 1)
			fail("count jumped from %ld to %ld", last_seen, count);
		last_seen = count;
		printf("%ld\n", count++);
		usleep(20000);
	}
	pass();
}
