/* Unix sockets connected outside the dumped tree (the runner holds the
 * peers): a datagram socket connected to a named socket outside, and a
 * stream connection to a listener outside, plus a pair of its own with
 * bytes queued. The runner's dumps are refused while the stream peer is
 * there, and leave everything as it was; once the runner closed it, the
 * dump goes through with --ext-unix-sk and the restored datagram socket
 * sends to the outside name again.
 * Usage: unix_ext DGRAM_PATH STREAM_PATH */
#include "zdtmlib.h"
#include <sys/socket.h>
#include <sys/un.h>

static int connect_to(int type, const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	strncpy(a.sun_path, path, sizeof(a.sun_path) - 1);
	int s = socket(AF_UNIX, type, 0);
	if (s < 0 || connect(s, (void *)&a, sizeof(a)))
		fail("connecting to %s", path);
	return s;
}

int main(int argc, char **argv)
{
	test_init();
	if (argc != 3)
		fail("usage");
	int dg = connect_to(SOCK_DGRAM, argv[1]);
	int st = connect_to(SOCK_STREAM, argv[2]);
	int sp[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || write(sp[0], "kept", 4) != 4)
		fail("pair");
	test_ready();
	test_waitsig();
	char buf[16] = { 0 };
	if (read(sp[1], buf, sizeof(buf)) != 4 || memcmp(buf, "kept", 4))
		fail("the bytes in the pair are gone: \"%s\"", buf);
	if (send(dg, "after", 5, 0) != 5)
		fail("sending outside");
	if (read(st, buf, sizeof(buf)) != 0)
		fail("the stream whose peer closed does not read the end");
	pass();
}
