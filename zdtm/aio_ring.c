/* An AIO context (io_setup): its ring at the same address (the context
 * id is that address), with the same size, head and tail, and completed
 * events not yet reaped, each with its own data; after the restore the
 * context takes new requests, whose completions land after the old ones.
 * A second, larger context wraps its ring around. */
#include "zdtmlib.h"
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>

/* The ring the kernel maps at the context's address (fs/aio.c). */
struct ring {
	unsigned id, nr, head, tail, magic, compat, incompat, header_length;
	struct io_event events[];
};

static int devnull;
static char byte;

static void submit(aio_context_t ctx, uint64_t data)
{
	struct iocb cb, *p = &cb;
	memset(&cb, 0, sizeof(cb));
	cb.aio_data = data;
	cb.aio_fildes = devnull;
	cb.aio_lio_opcode = IOCB_CMD_PWRITE;
	cb.aio_buf = (uintptr_t)&byte;
	cb.aio_nbytes = 1;
	if (syscall(__NR_io_submit, ctx, 1, &p) != 1)
		fail("io_submit: %m");
}

static uint64_t reap(aio_context_t ctx)
{
	struct io_event ev;
	struct timespec ts = { 5, 0 };
	if (syscall(__NR_io_getevents, ctx, 1, 1, &ev, &ts) != 1)
		fail("io_getevents: no event");
	if (ev.res != 1)
		fail("event of %llx: res %lld", (unsigned long long)ev.data, (long long)ev.res);
	return ev.data;
}

struct state {
	aio_context_t ctx;
	unsigned nr, head, tail;
};

/* Submits `total` requests, reaping all but the last `left`. */
static struct state setup(unsigned nr_events, unsigned total, unsigned left, uint64_t tag)
{
	struct state s = { 0 };
	if (syscall(__NR_io_setup, nr_events, &s.ctx) < 0)
		fail("io_setup: %m");
	for (unsigned i = 0; i < total; i++) {
		submit(s.ctx, tag + i);
		if (i < total - left && reap(s.ctx) != tag + i)
			fail("reaped out of order");
	}
	volatile struct ring *r = (void *)s.ctx;
	s.nr = r->nr;
	s.head = r->head;
	s.tail = r->tail;
	return s;
}

static void check(struct state s, unsigned total, unsigned left, uint64_t tag)
{
	volatile struct ring *r = (void *)s.ctx;
	if (r->nr != s.nr || r->head != s.head || r->tail != s.tail)
		fail("ring nr/head/tail %u/%u/%u, dumped with %u/%u/%u", r->nr, r->head,
		     r->tail, s.nr, s.head, s.tail);
	/* The events completed before the dump and not reaped yet. */
	for (unsigned i = total - left; i < total; i++) {
		uint64_t d = reap(s.ctx);
		if (d != tag + i)
			fail("unreaped event %u has data %llx, wanted %llx", i,
			     (unsigned long long)d, (unsigned long long)(tag + i));
	}
	/* New requests complete after them. */
	submit(s.ctx, tag + 1000);
	if (r->tail != (s.tail + 1) % s.nr)
		fail("tail %u after a new request, wanted %u", r->tail, (s.tail + 1) % s.nr);
	if (reap(s.ctx) != tag + 1000)
		fail("the new request's event");
	if (syscall(__NR_io_destroy, s.ctx) != 0)
		fail("io_destroy: %m");
}

int main(void)
{
	test_init();
	devnull = open("/dev/null", O_WRONLY);
	if (devnull < 0)
		fail("open /dev/null: %m");
	/* 40 requests, the last 3 left in the ring. */
	struct state a = setup(16, 40, 3, 0x1000);
	/* More requests than the ring holds: its tail wraps around. */
	struct state b = setup(300, 0, 0, 0);
	for (unsigned i = 0; i < b.nr + 20; i++) {
		submit(b.ctx, 0x5000 + i);
		if (i + 2 < b.nr + 20 && reap(b.ctx) != 0x5000 + i)
			fail("reaped out of order");
	}
	volatile struct ring *rb = (void *)b.ctx;
	b.head = rb->head;
	b.tail = rb->tail;
	if (b.tail != 20 % b.nr)
		fail("ring b did not wrap (tail %u of %u)", b.tail, b.nr);
	test_ready();
	test_waitsig();
	check(a, 40, 3, 0x1000);
	check(b, b.nr + 20, 2, 0x5000);
	pass();
}
