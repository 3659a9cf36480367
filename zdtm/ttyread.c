/* A shell job: stdin/stdout/stderr are a pseudo-terminal; the task is
 * checkpointed while blocked in read() on it, and must read the line typed
 * after restore. */
#include "zdtmlib.h"

int main(void)
{
	test_init();
	if (!isatty(0))
		fail("stdin is not a terminal");
	printf("waiting for a line\n");
	test_ready();
	char buf[128];
	ssize_t n = read(0, buf, sizeof(buf) - 1);
	if (n <= 0)
		fail("read returned %zd", n);
	buf[n] = 0;
	if (strcmp(buf, "hello after restore\n"))
		fail("read %s", buf);
	printf("got it\n");
	pass();
}
