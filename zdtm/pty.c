/* A pseudo-terminal pair made inside the tree: the master here, in packet
 * mode, with the slave's termios and window size set; a child session
 * leader has the slave as its controlling terminal. After restore the pair
 * has its index, termios, window size and modes, the child still has its
 * controlling terminal, and bytes flow both ways. */
#include "zdtmlib.h"
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>

int main(void)
{
	test_init();
	int m = posix_openpt(O_RDWR | O_NOCTTY);
	if (m < 0 || grantpt(m) || unlockpt(m))
		fail("posix_openpt: %m");
	char name[64];
	snprintf(name, sizeof(name), "%s", ptsname(m));
	int s = open(name, O_RDWR | O_NOCTTY);
	struct termios t;
	tcgetattr(s, &t);
	t.c_lflag &= ~(ECHO | ICANON);
	t.c_cc[VINTR] = 0x07;
	t.c_cc[VMIN] = 1;
	tcsetattr(s, TCSANOW, &t);
	struct winsize ws = { 33, 77, 0, 0 };
	ioctl(m, TIOCSWINSZ, &ws);
	int one = 1;
	ioctl(m, TIOCPKT, &one);

	int ready[2];
	pipe(ready);
	pid_t child = fork();
	if (child == 0) {
		close(m);
		setsid();
		if (ioctl(s, TIOCSCTTY, 0))
			_exit(9);
		write(ready[1], "r", 1);
		test_waitsig();
		/* Still our controlling terminal, and we lead its session. */
		int tty = open("/dev/tty", O_RDWR);
		if (tty < 0 || tcgetsid(s) != getpid())
			_exit(2);
		char b[16] = { 0 };
		if (read(s, b, 5) != 5 || memcmp(b, "ping\n", 5))
			_exit(3);
		_exit(write(tty, "pong", 4) == 4 ? 0 : 4);
	}
	char b;
	read(ready[0], &b, 1);
	test_ready();
	test_waitsig();

	if (strcmp(ptsname(m), name))
		fail("the pair is %s now, was %s", ptsname(m), name);
	struct termios now;
	tcgetattr(s, &now);
	if ((now.c_lflag & (ECHO | ICANON)) || now.c_cc[VINTR] != 0x07)
		fail("termios changed: lflag %#x VINTR %#x", now.c_lflag, now.c_cc[VINTR]);
	struct winsize w;
	ioctl(m, TIOCGWINSZ, &w);
	if (w.ws_row != 33 || w.ws_col != 77)
		fail("window size %dx%d", w.ws_row, w.ws_col);
	int pkt = 0, lck = 1;
	ioctl(m, TIOCGPKT, &pkt);
	ioctl(m, TIOCGPTLCK, &lck);
	if (pkt != 1 || lck != 0)
		fail("packet mode %d, lock %d", pkt, lck);
	kill(child, SIGTERM);
	write(m, "ping\n", 5);
	char buf[64] = { 0 };
	struct pollfd pfd = { m, POLLIN, 0 };
	if (poll(&pfd, 1, 10000) != 1)
		fail("no answer from the child on the terminal");
	ssize_t n = read(m, buf, sizeof(buf));
	/* Packet mode: a TIOCPKT_DATA byte, then the data. */
	if (n != 5 || buf[0] != TIOCPKT_DATA || memcmp(buf + 1, "pong", 4))
		fail("read %zd bytes from the master: %.*s", n, (int)n, buf);
	int st;
	waitpid(child, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("the child lost its terminal (status %#x)", st);
	pass();
}
