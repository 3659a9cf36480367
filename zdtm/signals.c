/* Signal handlers with their flags and masks, the blocked mask, and the
 * alternate signal stack; handlers must still run (on the altstack) after
 * restore, and a signal blocked before the dump stays blocked. */
#include "zdtmlib.h"

static char altstack[65536];
static volatile int usr1_on_altstack, usr1_count, usr2_count;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
	(void)si; (void)uc; (void)sig;
	char local;
	usr1_on_altstack = (&local >= altstack && &local < altstack + sizeof(altstack));
	usr1_count++;
}

static void on_usr2(int sig) { (void)sig; usr2_count++; }

int main(void)
{
	test_init();
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof(altstack), .ss_flags = 0 };
	if (sigaltstack(&ss, NULL))
		fail("sigaltstack");
	struct sigaction a1 = { 0 }, a2 = { 0 }, ign = { 0 };
	a1.sa_sigaction = on_usr1;
	a1.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	sigaddset(&a1.sa_mask, SIGHUP);
	sigaction(SIGUSR1, &a1, NULL);
	a2.sa_handler = on_usr2;
	a2.sa_flags = SA_RESETHAND | SA_NODEFER;
	sigaction(SIGUSR2, &a2, NULL);
	ign.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &ign, NULL);
	sigset_t blk;
	sigemptyset(&blk);
	sigaddset(&blk, SIGHUP);
	sigaddset(&blk, SIGRTMIN + 3);
	sigprocmask(SIG_BLOCK, &blk, NULL);

	static struct sigaction before[65];
	for (int s = 1; s < 65; s++)
		if (s != SIGKILL && s != SIGSTOP && s != 32 && s != 33)
			sigaction(s, NULL, &before[s]);

	test_ready();
	test_waitsig();

	for (int s = 1; s < 65; s++) {
		if (s == SIGKILL || s == SIGSTOP || s == 32 || s == 33)
			continue;
		struct sigaction now;
		memset(&now, 0, sizeof(now));
		sigaction(s, NULL, &now);
		if (now.sa_handler != before[s].sa_handler || now.sa_flags != before[s].sa_flags ||
		    memcmp(&now.sa_mask, &before[s].sa_mask, 8))
			fail("sigaction of signal %d changed: %p/%x/%lx -> %p/%x/%lx", s, (void *)before[s].sa_handler, before[s].sa_flags, ((unsigned long *)&before[s].sa_mask)[0], (void *)now.sa_handler, now.sa_flags, ((unsigned long *)&now.sa_mask)[0]);
	}
	sigset_t cur;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	if (!sigismember(&cur, SIGHUP) || !sigismember(&cur, SIGRTMIN + 3) || sigismember(&cur, SIGUSR1))
		fail("blocked mask changed");
	stack_t now_ss;
	sigaltstack(NULL, &now_ss);
	if (now_ss.ss_sp != altstack || now_ss.ss_size != sizeof(altstack))
		fail("sigaltstack changed");
	raise(SIGUSR1);
	if (usr1_count != 1 || !usr1_on_altstack)
		fail("SIGUSR1 handler did not run on the altstack");
	raise(SIGUSR2);
	if (usr2_count != 1)
		fail("SIGUSR2 handler did not run");
	struct sigaction reset;
	sigaction(SIGUSR2, NULL, &reset);
	if (reset.sa_handler != SIG_DFL)
		fail("SA_RESETHAND was lost");
	pass();
}
