/* argv and environment, and the kernel's view of them (/proc/self/cmdline,
 * environ), which lives in the mm's arg/env areas. */
#include "zdtmlib.h"

static char *read_file(const char *p, size_t *len)
{
	static char buf[65536];
	int fd = open(p, O_RDONLY);
	if (fd < 0)
		fail("open %s", p);
	ssize_t n = read(fd, buf, sizeof(buf));
	close(fd);
	if (n < 0)
		fail("read %s", p);
	*len = n;
	return buf;
}

int main(int argc, char **argv)
{
	test_init();
	if (argc != 3 || strcmp(argv[1], "first arg") || strcmp(argv[2], "second"))
		fail("unexpected argv");
	setenv("ZDTM_ENV_MARK", "before-dump", 1);
	size_t len;
	char *c = read_file("/proc/self/cmdline", &len);
	char *cmd = malloc(len);
	memcpy(cmd, c, len);
	size_t cmdlen = len;
	char *e = read_file("/proc/self/environ", &len);
	char *env = malloc(len);
	memcpy(env, e, len);
	size_t envlen = len;
	char exe[4096], exe_after[4096];
	ssize_t el = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (el <= 0)
		fail("readlink exe");
	exe[el] = 0;
	test_ready();
	test_waitsig();
	el = readlink("/proc/self/exe", exe_after, sizeof(exe_after) - 1);
	if (el <= 0)
		fail("readlink exe after restore");
	exe_after[el] = 0;
	if (strcmp(exe, exe_after))
		fail("exe link %s, was %s", exe_after, exe);
	if (argc != 3 || strcmp(argv[1], "first arg") || strcmp(argv[2], "second"))
		fail("argv changed");
	if (!getenv("ZDTM_ENV_MARK") || strcmp(getenv("ZDTM_ENV_MARK"), "before-dump"))
		fail("environment changed");
	c = read_file("/proc/self/cmdline", &len);
	if (len != cmdlen || memcmp(c, cmd, len))
		fail("/proc/self/cmdline changed");
	e = read_file("/proc/self/environ", &len);
	if (len != envlen || memcmp(e, env, len))
		fail("/proc/self/environ changed");
	pass();
}
