/* The zdtm test protocol, shared by every test program.
 *
 * A test sets up its state, calls test_ready() (which creates the file named
 * by $ZDTM_READY), and then keeps its state alive until SIGTERM: either in
 * test_waitsig(), or in its own loop polling test_done(). After SIGTERM it
 * checks its state itself and ends with pass() or fail(). The runner checks
 * the exit status and the last line ("PASS"). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t zdtm_stop;

static inline void zdtm_on_term(int sig) { (void)sig; zdtm_stop = 1; }

static inline void test_init(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = zdtm_on_term;
	sigaction(SIGTERM, &sa, NULL);
	setvbuf(stdout, NULL, _IONBF, 0);
}

static inline void test_ready(void)
{
	const char *p = getenv("ZDTM_READY");
	if (p) {
		int fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
		if (fd >= 0)
			close(fd);
	}
}

/* For threads other than the one in test_waitsig(): leave SIGTERM to it. */
static inline void test_thread_ignores_sigterm(void)
{
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &term, NULL);
}

static inline int test_done(void) { return zdtm_stop; }

static inline void test_waitsig(void)
{
	sigset_t none;
	sigemptyset(&none);
	while (!zdtm_stop)
		sigsuspend(&none);
}

static inline void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	printf("FAIL: ");
	vprintf(fmt, ap);
	printf(" (errno %d)\n", errno);
	va_end(ap);
	exit(1);
}

static inline void pass(void)
{
	printf("PASS\n");
	exit(0);
}
