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
		/* Created under another name and renamed: the runner must not
		 * see the file while its fd is still open in the test. */
		char tmp[4096];
		snprintf(tmp, sizeof(tmp), "%s.tmp", p);
		int fd = open(tmp, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
		if (fd >= 0) {
			close(fd);
			rename(tmp, p);
		}
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

/* Waits for SIGTERM with `during` as the signal mask (NULL: the current
 * one). SIGTERM stays blocked between the flag check and sigsuspend(): one
 * arriving in that window would otherwise set the flag and leave sigsuspend
 * waiting for a second one. */
static inline void test_waitsig_mask(const sigset_t *during)
{
	sigset_t term, old, wait;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, &old);
	wait = during ? *during : old;
	sigdelset(&wait, SIGTERM);
	while (!zdtm_stop)
		sigsuspend(&wait);
	sigprocmask(SIG_SETMASK, &old, NULL);
}

static inline void test_waitsig(void) { test_waitsig_mask(NULL); }

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
