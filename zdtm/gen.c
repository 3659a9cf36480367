/* Producer for the shell pipeline test: writes MIB mebibytes of a fixed
 * pseudo-random stream to stdout, paced, and creates $ZDTM_READY once it
 * is under way. */
#include "zdtmlib.h"
#include <stdint.h>

int main(int argc, char **argv)
{
	long mib = argc > 1 ? atol(argv[1]) : 16;
	static uint64_t buf[8192];
	uint64_t x = 88172645463325252ULL;
	for (long c = 0; c < mib * 16; c++) {
		for (int i = 0; i < 8192; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			buf[i] = x;
		}
		/* A write to a pipe may be cut short when the writer is
		 * stopped (a freeze is one way): write the rest. */
		for (size_t off = 0; off < sizeof(buf);) {
			ssize_t n = write(1, (char *)buf + off, sizeof(buf) - off);
			if (n <= 0)
				return 1;
			off += n;
		}
		if (c == 16)
			test_ready();
		usleep(3000);
	}
	return 0;
}
