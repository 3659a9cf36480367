/* Event fds: an eventfd with a count (semaphore mode on another), a
 * signalfd with a mask and a signal waiting in it, a timerfd with an
 * interval and expirations not read yet, and an epoll set watching them,
 * with its events and data. */
#include "zdtmlib.h"
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

int main(void)
{
	test_init();
	int ev = eventfd(0, EFD_NONBLOCK);
	uint64_t v = 0x123456789ULL;
	if (write(ev, &v, 8) != 8)
		fail("eventfd write");
	int sem = eventfd(3, EFD_SEMAPHORE);
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR1);
	sigaddset(&m, SIGUSR2);
	sigprocmask(SIG_BLOCK, &m, NULL);
	int sfd = signalfd(-1, &m, SFD_NONBLOCK);
	int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
	struct itimerspec its = { { 0, 20000000 }, { 0, 20000000 } };
	timerfd_settime(tfd, 0, &its, NULL);
	int ep = epoll_create1(0);
	struct epoll_event e1 = { .events = EPOLLIN, .data.u64 = 0xabcdef };
	struct epoll_event e2 = { .events = EPOLLIN | EPOLLET, .data.u64 = 77 };
	epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e1);
	epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &e2);
	usleep(100000); /* the timer fires a few times unread */
	test_ready();
	test_waitsig_mask(&m); /* SIGUSR1/2 stay blocked */
	raise(SIGUSR2);
	/* epoll: the eventfd is readable, with its data. */
	struct epoll_event out[4];
	int n = epoll_wait(ep, out, 4, 1000);
	int seen_ev = 0, seen_t = 0;
	for (int i = 0; i < n; i++) {
		if (out[i].data.u64 == 0xabcdef)
			seen_ev = 1;
		if (out[i].data.u64 == 77)
			seen_t = 1;
	}
	if (!seen_ev || !seen_t)
		fail("epoll set lost a target (%d events)", n);
	if (read(ev, &v, 8) != 8 || v != 0x123456789ULL)
		fail("eventfd count %llx", (unsigned long long)v);
	if (read(ev, &v, 8) != -1 || errno != EAGAIN)
		fail("eventfd lost O_NONBLOCK");
	for (int i = 0; i < 3; i++)
		if (read(sem, &v, 8) != 8 || v != 1)
			fail("semaphore eventfd");
	struct signalfd_siginfo si;
	if (read(sfd, &si, sizeof(si)) != sizeof(si) || si.ssi_signo != SIGUSR2)
		fail("signalfd");
	uint64_t ticks = 0;
	if (read(tfd, &ticks, 8) != 8 || ticks < 1)
		fail("timerfd expirations %llu", (unsigned long long)ticks);
	struct itimerspec now;
	timerfd_gettime(tfd, &now);
	if (now.it_interval.tv_nsec != 20000000)
		fail("timerfd interval");
	/* And it keeps firing. */
	if (read(tfd, &ticks, 8) != 8 || ticks < 1)
		fail("timerfd stopped after restore");
	pass();
}
