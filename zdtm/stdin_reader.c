/* Holds a pipe from outside the tree as stdin (a CI runner's or a service
 * manager's stray pipe). On SIGTERM it reads what the pipe holds until end
 * of file and prints it: after a restore without --inherit-fd the pipe is a
 * fresh one with the bytes that were buffered and no writer. */
#include "zdtmlib.h"

int main(void)
{
	test_init();
	test_ready();
	test_waitsig();
	char buf[256] = { 0 };
	size_t got = 0;
	ssize_t n;
	while (got < sizeof(buf) - 1 && (n = read(0, buf + got, sizeof(buf) - 1 - got)) > 0)
		got += n;
	if (n < 0)
		fail("read");
	printf("stdin held: %s\n", buf);
	pass();
}
