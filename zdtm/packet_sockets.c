/* Packet sockets, checked after restore:
 *  - a raw socket bound to lo for a private ethertype, TPACKET_V2 with
 *    PACKET_RESERVE and PACKET_LOSS, an RX and a TX ring mapped shared: a
 *    frame sent on lo after the restore lands in the ring at the address
 *    the task mapped it at;
 *  - a datagram socket bound to lo for IPv4 with AUXDATA, ORIGDEV,
 *    PACKET_TIMESTAMP, PACKET_COPY_THRESH and PACKET_QDISC_BYPASS, a
 *    multicast membership added twice (/proc/net/dev_mcast lists the
 *    address until it is dropped twice) and a promiscuous one (lo stays
 *    promiscuous), in a fanout group (load balance, rollover) with a second
 *    socket: the group still exists (joining it in another mode fails);
 *  - an unbound raw socket with PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING,
 *    PACKET_TX_HAS_OFF, O_NONBLOCK, SO_RCVBUF and SO_PRIORITY, owned by
 *    uid 4242 (fchown);
 *  - SOCK_PACKET sockets, one bound to lo and one not (getsockname).
 *
 * With "bind IFNAME": only a raw socket bound to IFNAME (the runner removes
 * the interface before the restore, which must refuse). */
#include "zdtmlib.h"
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>

#define ETH_P_CRUST 0x88b5 /* IEEE local experimental */
#define RING_BLOCK 4096
#define RING_FRAME 2048

static int getint(int sk, int level, int opt, const char *what)
{
	int v = -1;
	socklen_t len = sizeof(v);
	if (getsockopt(sk, level, opt, &v, &len))
		fail("getsockopt %s", what);
	return v;
}

static void setint(int sk, int level, int opt, int v, const char *what)
{
	if (setsockopt(sk, level, opt, &v, sizeof(v)))
		fail("setsockopt %s", what);
}

static void expect(int sk, int opt, int want, const char *what)
{
	int v = getint(sk, SOL_PACKET, opt, what);
	if (v != want)
		fail("%s is %d, wanted %d", what, v, want);
}

static void bind_ll(int sk, int ifindex, int proto)
{
	struct sockaddr_ll a = { .sll_family = AF_PACKET, .sll_protocol = htons(proto), .sll_ifindex = ifindex };
	if (bind(sk, (void *)&a, sizeof(a)))
		fail("bind to ifindex %d", ifindex);
}

static void check_name(int sk, int ifindex, int proto, const char *what)
{
	struct sockaddr_ll a;
	socklen_t len = sizeof(a);
	if (getsockname(sk, (void *)&a, &len))
		fail("getsockname %s", what);
	if (a.sll_family != AF_PACKET || a.sll_ifindex != ifindex || a.sll_protocol != htons(proto))
		fail("%s is bound to ifindex %d protocol %#x, wanted %d %#x", what, a.sll_ifindex,
		     ntohs(a.sll_protocol), ifindex, proto);
}

static void membership(int sk, int op, int ifindex, int type, const unsigned char *addr)
{
	struct packet_mreq m = { .mr_ifindex = ifindex, .mr_type = type };
	if (addr) {
		m.mr_alen = 6;
		memcpy(m.mr_address, addr, 6);
	}
	if (setsockopt(sk, SOL_PACKET, op, &m, sizeof(m)))
		fail("membership %d type %d", op, type);
}

/* Whether /proc/net/dev_mcast lists `addr` on lo. */
static int lo_lists(const unsigned char *addr)
{
	char want[13], line[256];
	snprintf(want, sizeof(want), "%02x%02x%02x%02x%02x%02x", addr[0], addr[1], addr[2], addr[3], addr[4],
		 addr[5]);
	FILE *f = fopen("/proc/net/dev_mcast", "r");
	if (!f)
		fail("/proc/net/dev_mcast");
	int found = 0;
	while (fgets(line, sizeof(line), f)) {
		char dev[32], hex[64];
		int idx, users, global;
		if (sscanf(line, "%d %31s %d %d %63s", &idx, dev, &users, &global, hex) == 5 &&
		    !strcmp(dev, "lo") && !strcmp(hex, want))
			found = 1;
	}
	fclose(f);
	return found;
}

static int lo_promisc(void)
{
	FILE *f = fopen("/sys/class/net/lo/flags", "r");
	unsigned flags = 0;
	if (!f || fscanf(f, "%x", &flags) != 1)
		fail("/sys/class/net/lo/flags");
	fclose(f);
	return (flags & IFF_PROMISC) != 0;
}

static int ring_socket(int lo)
{
	int sk = socket(AF_PACKET, SOCK_RAW, 0);
	if (sk < 0)
		fail("raw socket");
	setint(sk, SOL_PACKET, PACKET_VERSION, TPACKET_V2, "PACKET_VERSION");
	setint(sk, SOL_PACKET, PACKET_RESERVE, 16, "PACKET_RESERVE");
	setint(sk, SOL_PACKET, PACKET_LOSS, 1, "PACKET_LOSS");
	struct tpacket_req req = { RING_BLOCK, 1, RING_FRAME, RING_BLOCK / RING_FRAME };
	if (setsockopt(sk, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) ||
	    setsockopt(sk, SOL_PACKET, PACKET_TX_RING, &req, sizeof(req)))
		fail("rings");
	bind_ll(sk, lo, ETH_P_CRUST);
	return sk;
}

/* Sends one frame of the private ethertype on lo, and waits until the
 * ring shows a frame holding it. */
static void check_ring(int sk, unsigned char *ring, int lo)
{
	char payload[64];
	snprintf(payload, sizeof(payload), "crust ring frame %d", getpid());
	int tx = socket(AF_PACKET, SOCK_DGRAM, 0);
	struct sockaddr_ll to = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_CRUST),
				  .sll_ifindex = lo, .sll_halen = 6 };
	if (tx < 0 || sendto(tx, payload, strlen(payload), 0, (void *)&to, sizeof(to)) != (ssize_t)strlen(payload))
		fail("sending a frame on lo");
	close(tx);
	for (int tries = 0; tries < 50; tries++) {
		for (int i = 0; i < RING_BLOCK / RING_FRAME; i++) {
			struct tpacket2_hdr *h = (void *)(ring + i * RING_FRAME);
			if (!(__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
				continue;
			if (memmem((char *)h + h->tp_mac, h->tp_snaplen, payload, strlen(payload)))
				return;
		}
		struct pollfd p = { sk, POLLIN, 0 };
		poll(&p, 1, 100);
	}
	fail("the frame sent on lo never showed in the mapped RX ring");
}

static int bind_only(const char *ifname)
{
	int idx = if_nametoindex(ifname);
	int sk = socket(AF_PACKET, SOCK_RAW, 0);
	if (!idx || sk < 0)
		fail("a raw socket on %s", ifname);
	bind_ll(sk, idx, ETH_P_ALL);
	test_ready();
	test_waitsig();
	check_name(sk, idx, ETH_P_ALL, "the socket");
	pass();
	return 0;
}

int main(int argc, char **argv)
{
	test_init();
	if (argc == 3 && !strcmp(argv[1], "bind"))
		return bind_only(argv[2]);
	int lo = if_nametoindex("lo");
	if (!lo)
		fail("no lo");

	int rsk = ring_socket(lo);
	size_t ring_len = 2 * RING_BLOCK;
	unsigned char *ring = mmap(NULL, ring_len, PROT_READ | PROT_WRITE, MAP_SHARED, rsk, 0);
	if (ring == MAP_FAILED)
		fail("mmap of the rings");

	int dsk = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_IP));
	int dsk2 = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_IP));
	if (dsk < 0 || dsk2 < 0)
		fail("dgram sockets");
	bind_ll(dsk, lo, ETH_P_IP);
	bind_ll(dsk2, lo, ETH_P_IP);
	setint(dsk, SOL_PACKET, PACKET_AUXDATA, 1, "PACKET_AUXDATA");
	setint(dsk, SOL_PACKET, PACKET_ORIGDEV, 1, "PACKET_ORIGDEV");
	setint(dsk, SOL_PACKET, PACKET_TIMESTAMP, 16, "PACKET_TIMESTAMP");
	setint(dsk, SOL_PACKET, PACKET_COPY_THRESH, 128, "PACKET_COPY_THRESH");
	setint(dsk, SOL_PACKET, PACKET_QDISC_BYPASS, 1, "PACKET_QDISC_BYPASS");
	unsigned char mc[6] = { 0x01, 0x00, 0x5e, (getpid() >> 16) & 0x7f, (getpid() >> 8) & 0xff, getpid() & 0xff };
	membership(dsk, PACKET_ADD_MEMBERSHIP, lo, PACKET_MR_MULTICAST, mc);
	membership(dsk, PACKET_ADD_MEMBERSHIP, lo, PACKET_MR_MULTICAST, mc);
	membership(dsk, PACKET_ADD_MEMBERSHIP, lo, PACKET_MR_PROMISC, NULL);
	if (!lo_lists(mc))
		fail("dev_mcast does not list the membership before the dump");
	int group = 0x4000 | (getpid() & 0x3fff);
	int fanout = group | ((PACKET_FANOUT_LB | PACKET_FANOUT_FLAG_ROLLOVER) << 16);
	setint(dsk, SOL_PACKET, PACKET_FANOUT, fanout, "PACKET_FANOUT");
	setint(dsk2, SOL_PACKET, PACKET_FANOUT, fanout, "PACKET_FANOUT of the second member");
	int fanout_read = getint(dsk, SOL_PACKET, PACKET_FANOUT, "PACKET_FANOUT");

	int vsk = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, 0);
	if (vsk < 0)
		fail("raw socket 2");
	setint(vsk, SOL_PACKET, PACKET_VNET_HDR, 1, "PACKET_VNET_HDR");
	setint(vsk, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1, "PACKET_IGNORE_OUTGOING");
	setint(vsk, SOL_PACKET, PACKET_TX_HAS_OFF, 1, "PACKET_TX_HAS_OFF");
	setint(vsk, SOL_SOCKET, SO_RCVBUF, 77777, "SO_RCVBUF");
	setint(vsk, SOL_SOCKET, SO_PRIORITY, 5, "SO_PRIORITY");
	int rcvbuf = getint(vsk, SOL_SOCKET, SO_RCVBUF, "SO_RCVBUF");
	if (fchown(vsk, 4242, 4343))
		fail("fchown");

	int spkt = socket(AF_PACKET, SOCK_PACKET, htons(ETH_P_ALL));
	int spkt_free = socket(AF_PACKET, SOCK_PACKET, htons(ETH_P_ALL));
	struct sockaddr sa = { .sa_family = AF_PACKET };
	strcpy(sa.sa_data, "lo");
	if (spkt < 0 || spkt_free < 0 || bind(spkt, &sa, sizeof(sa)))
		fail("SOCK_PACKET sockets");

	test_ready();
	test_waitsig();

	/* The ring socket. */
	check_name(rsk, lo, ETH_P_CRUST, "the ring socket");
	expect(rsk, PACKET_VERSION, TPACKET_V2, "PACKET_VERSION");
	expect(rsk, PACKET_RESERVE, 16, "PACKET_RESERVE");
	expect(rsk, PACKET_LOSS, 1, "PACKET_LOSS");
	check_ring(rsk, ring, lo);

	/* The datagram sockets. */
	check_name(dsk, lo, ETH_P_IP, "the dgram socket");
	expect(dsk, PACKET_AUXDATA, 1, "PACKET_AUXDATA");
	expect(dsk, PACKET_ORIGDEV, 1, "PACKET_ORIGDEV");
	expect(dsk, PACKET_TIMESTAMP, 16, "PACKET_TIMESTAMP");
	expect(dsk, PACKET_QDISC_BYPASS, 1, "PACKET_QDISC_BYPASS");
	expect(dsk, PACKET_VERSION, TPACKET_V1, "PACKET_VERSION of the dgram socket");
	expect(dsk, PACKET_FANOUT, fanout_read, "PACKET_FANOUT");
	expect(dsk2, PACKET_FANOUT, fanout_read, "PACKET_FANOUT of the second member");
	int other = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_IP));
	bind_ll(other, lo, ETH_P_IP);
	int hash = group | (PACKET_FANOUT_HASH << 16);
	if (setsockopt(other, SOL_PACKET, PACKET_FANOUT, &hash, sizeof(hash)) == 0)
		fail("fanout group %#x was not there any more: a new one was made in another mode", group);
	close(other);
	if (!lo_promisc())
		fail("lo is not promiscuous any more");
	if (!lo_lists(mc))
		fail("dev_mcast does not list the membership after the restore");
	membership(dsk, PACKET_DROP_MEMBERSHIP, lo, PACKET_MR_MULTICAST, mc);
	if (!lo_lists(mc))
		fail("the membership was added once only: one drop removed it");
	membership(dsk, PACKET_DROP_MEMBERSHIP, lo, PACKET_MR_MULTICAST, mc);
	if (lo_lists(mc))
		fail("the membership was added more than twice");

	/* The unbound raw socket. */
	check_name(vsk, 0, 0, "the unbound raw socket");
	expect(vsk, PACKET_VNET_HDR, 1, "PACKET_VNET_HDR");
	expect(vsk, PACKET_IGNORE_OUTGOING, 1, "PACKET_IGNORE_OUTGOING");
	expect(vsk, PACKET_TX_HAS_OFF, 1, "PACKET_TX_HAS_OFF");
	if (getint(vsk, SOL_SOCKET, SO_RCVBUF, "SO_RCVBUF") != rcvbuf)
		fail("SO_RCVBUF changed");
	if (getint(vsk, SOL_SOCKET, SO_PRIORITY, "SO_PRIORITY") != 5)
		fail("SO_PRIORITY changed");
	if (!(fcntl(vsk, F_GETFL) & O_NONBLOCK))
		fail("O_NONBLOCK lost");
	struct stat st;
	if (fstat(vsk, &st) || st.st_uid != 4242 || st.st_gid != 4343)
		fail("the raw socket is owned by %d:%d", (int)st.st_uid, (int)st.st_gid);

	/* SOCK_PACKET: bound by name. */
	struct sockaddr got;
	socklen_t len = sizeof(got);
	if (getsockname(spkt, &got, &len) || got.sa_family != AF_PACKET || strcmp(got.sa_data, "lo"))
		fail("the bound SOCK_PACKET socket names \"%.14s\"", got.sa_data);
	len = sizeof(got);
	if (getsockname(spkt_free, &got, &len) || got.sa_data[0])
		fail("the unbound SOCK_PACKET socket names \"%.14s\"", got.sa_data);
	pass();
	return 0;
}
