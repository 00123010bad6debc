/*
 * rtpgen: bounded RTP-shaped UDP generator and echo for relay benchmarks (lrkp-tsl's
 * `make bench`; adapted from the reference measurement in research/bench-reference).
 * Refuses any address outside 10.0.0.0/8: it is for lab namespaces only.
 *
 * send: N flows, one UDP socket per flow bound to SRC:SPORT+i*SSTEP and connected to
 *       DST:dport(i); packets are SIZE bytes of UDP payload starting with a valid RTP header
 *       (V=2, PT 0, per-flow seq/ts/SSRC) followed by the send time (CLOCK_MONOTONIC ns).
 *       Paced to an aggregate RATE (pps, 0 = flat out) with sendmmsg batches of up to BATCH
 *       packets per flow, for DURATION seconds and/or at most COUNT packets. Flows are split
 *       over THREADS threads, thread k pinned to the k-th CPU of CPULIST.
 *       With -i IFACE -M NEXTHOP_MAC frames are built in user space and sent with an
 *       AF_PACKET socket (qdisc bypass), consecutive packets cycling over the flows: the cheap
 *       mode for throughput; the UDP socket mode is for RTT.
 *       With -R a receiver thread reads echoed packets on the same sockets and reports RTT
 *       percentiles (send time is carried in the packet).
 * echo: N sockets bound to SRC:SPORT+i*SSTEP; every datagram is sent back to its source.
 * soak: SCHED_IDLE busy loop on CPULIST[0] for DURATION (CPU-cost measurement, see do_soak).
 *
 * Every loop is bounded by DURATION (echo, send) and COUNT (send). Output: one JSON line.
 *
 *   rtpgen send -s 10.98.1.2 -p 40000 -d 10.98.2.2 -q 30000 -n 100 -r 50000 -t 5
 *   rtpgen send ... -f ports.txt      (destination port per flow, one per line)
 *   rtpgen echo -s 10.98.2.2 -p 30000 -n 100 -t 10
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXBATCH 256
#define SPIN_PPS 100000.0 /* per thread: busy-wait pacing at and above this rate */
#define MAXCPUS 64

static struct {
	int echo;
	const char *src, *dst, *portfile, *ifname, *dmac;
	int sport, sstep, dport, dstep, nflows, size, batch, threads, rtt, rtt_cpu;
	double rate, duration;
	unsigned long long count;
	int cpus[MAXCPUS], ncpus;
} opt = {.sport = 40000, .sstep = 2, .dport = 30000, .dstep = 2, .nflows = 1, .size = 172,
	 .batch = 32, .threads = 1, .rtt_cpu = -1, .duration = 1.0};

struct flow { int fd; uint16_t seq; uint32_t ts, ssrc; unsigned char hdr[42]; };
#define HDRLEN 42 /* ethernet 14 + IPv4 20 + UDP 8 */
static int pkt_ifindex;
static struct flow *flows;
static int *dports;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}
static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}
static void die(const char *what)
{
	perror(what);
	exit(1);
}
static void pin(int cpu)
{
	if (cpu < 0)
		return;
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	if (pthread_setaffinity_np(pthread_self(), sizeof(s), &s))
		fprintf(stderr, "rtpgen: cannot pin to cpu %d\n", cpu);
}

static int udp_socket(const char *ip, int port)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0), one = 1;
	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "rtpgen: bad address %s\n", ip);
		exit(2);
	}
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)))
		die("bind");
	return fd;
}

/* ---------------- send ---------------- */
struct sendarg {
	int id, first, nf;           /* flows [first, first+nf) */
	int pfd;                     /* AF_PACKET socket in packet mode, else -1 */
	double rate;                 /* this thread's share, pps; 0 = flat out */
	unsigned long long limit;    /* this thread's share of COUNT, 0 = none */
	unsigned long long sent, errors, calls;
	double t_start, t_end;
	int last_errno;
};
static double g_t0;

/* A sendmmsg/recvmmsg batch of n: msgs[i] over iov[i], the i-th SIZE bytes of buf, and (when
 * names is not NULL) room for the i-th peer address. Everything else zero. */
static void mmsg_setup(struct mmsghdr *msgs, struct iovec *iov, int n, unsigned char *buf,
		       size_t size, struct sockaddr_in *names)
{
	memset(msgs, 0, (size_t)n * sizeof(*msgs));
	for (int i = 0; i < n; i++) {
		iov[i].iov_base = buf + (size_t)i * size;
		iov[i].iov_len = size;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		if (names) {
			msgs[i].msg_hdr.msg_name = &names[i];
			msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
		}
	}
}

/* The RTP header (v2, PT 0 (PCMU), no marker) and the send time the echo's RTT is taken from:
 * the first 20 bytes of every payload, in packet mode and socket mode alike. */
static void rtp_header(unsigned char *b, uint16_t seq, uint32_t ts, uint32_t ssrc, uint64_t ns)
{
	uint16_t nseq = htons(seq);
	uint32_t nts = htonl(ts), nssrc = htonl(ssrc);
	b[0] = 0x80;
	b[1] = 0;
	memcpy(b + 2, &nseq, 2);
	memcpy(b + 4, &nts, 4);
	memcpy(b + 8, &nssrc, 4);
	memcpy(b + 12, &ns, 8);
}

static void *sender(void *p)
{
	struct sendarg *a = p;
	if (opt.ncpus)
		pin(opt.cpus[a->id % opt.ncpus]);
	struct mmsghdr msgs[MAXBATCH];
	struct iovec iov[MAXBATCH];
	size_t fl = opt.size + (a->pfd >= 0 ? HDRLEN : 0);
	unsigned char *buf = calloc(MAXBATCH, fl);
	mmsg_setup(msgs, iov, MAXBATCH, buf, fl, NULL);
	int cur = 0;
	double t0 = g_t0, end = t0 + opt.duration;
	/* paced mode: smallest batch worth a syscall (30 us of packets), 1 at low rates */
	unsigned long long minb = a->rate >= SPIN_PPS ? (unsigned long long)(a->rate * 30e-6) : 1;
	if (minb < 1)
		minb = 1;
	if (minb > (unsigned long long)opt.batch)
		minb = opt.batch;
	while (now() < t0)
		; /* common start line for all threads */
	a->t_start = now();
	while (1) {
		double t = now();
		if (t >= end || (a->limit && a->sent >= a->limit))
			break;
		unsigned long long due;
		if (a->rate > 0) {
			due = (unsigned long long)(a->rate * (t - t0)) + 1;
			if (a->sent + minb > due && !(a->limit && due >= a->limit)) {
				/* ahead of schedule. Below SPIN_PPS per thread: sleep (timer slack makes
				 * this >= ~50 us; the packets due meanwhile go out as one sendmmsg batch).
				 * Above: busy-wait until a batch of minb packets is due, so that sleep and
				 * wake-up overhead does not cap the generator below its flat-out rate. */
				if (a->rate < SPIN_PPS) {
					double next = t0 + (double)a->sent / a->rate, w = next - t;
					struct timespec ts = {0, w > 0 ? (long)(w * 1e9) : 1000};
					nanosleep(&ts, NULL);
				}
				continue;
			}
		} else {
			due = a->sent + opt.batch;
		}
		if (a->limit && due > a->limit)
			due = a->limit;
		unsigned k = due - a->sent > (unsigned)opt.batch ? (unsigned)opt.batch : (unsigned)(due - a->sent);
		uint64_t ns = now_ns();
		if (a->pfd >= 0) {
			/* packet mode: one batch carries consecutive flows, one packet each */
			for (unsigned i = 0; i < k; i++) {
				struct flow *f = &flows[a->first + cur];
				if (++cur == a->nf)
					cur = 0;
				unsigned char *b = iov[i].iov_base;
				memcpy(b, f->hdr, HDRLEN);
				rtp_header(b + HDRLEN, f->seq++, f->ts, f->ssrc, ns);
				f->ts += 160;
			}
			int rc = sendmmsg(a->pfd, msgs, k, 0);
			a->calls++;
			if (rc < 0) {
				a->errors += k;
				a->last_errno = errno;
			} else if ((unsigned)rc < k) {
				a->errors += k - rc;
			}
			a->sent += k;
			continue;
		}
		struct flow *f = &flows[a->first + cur];
		if (++cur == a->nf)
			cur = 0;
		for (unsigned i = 0; i < k; i++)
			rtp_header(iov[i].iov_base, f->seq + i, f->ts + 160u * i, f->ssrc, ns);
		int r = sendmmsg(f->fd, msgs, k, 0);
		a->calls++;
		if (r < 0) {
			/* count the attempt against the pacing budget so an erroring flow cannot spin */
			a->errors += k;
			a->sent += k;
			a->last_errno = errno;
			continue;
		}
		if ((unsigned)r < k)
			a->errors += k - r;
		f->seq += r;
		f->ts += 160u * r;
		a->sent += k;
	}
	a->t_end = now();
	free(buf);
	return NULL;
}

/* RTT receiver: epoll over all flow sockets until deadline */
static volatile int rtt_stop;
static uint32_t *rtt_us;
static size_t rtt_n, rtt_cap = 20000000;
static unsigned long long rtt_bad;

static void *rtt_thread(void *p)
{
	(void)p;
	pin(opt.rtt_cpu);
	int ep = epoll_create1(0);
	for (int i = 0; i < opt.nflows; i++) {
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, flows[i].fd, &ev))
			die("epoll_ctl");
	}
	struct mmsghdr msgs[64];
	struct iovec iov[64];
	static unsigned char buf[64][2048];
	mmsg_setup(msgs, iov, 64, buf[0], sizeof(buf[0]), NULL);
	struct epoll_event evs[256];
	while (!rtt_stop) {
		int n = epoll_wait(ep, evs, 256, 50);
		for (int e = 0; e < n; e++) {
			int fd = flows[evs[e].data.u32].fd;
			int r = recvmmsg(fd, msgs, 64, MSG_DONTWAIT, NULL);
			uint64_t t = now_ns();
			for (int i = 0; i < r; i++) {
				uint64_t sent;
				if (msgs[i].msg_len < 20) {
					rtt_bad++;
					continue;
				}
				memcpy(&sent, buf[i] + 12, 8);
				if (sent > t) {
					rtt_bad++;
					continue;
				}
				uint64_t d = (t - sent) / 1000;
				if (rtt_n < rtt_cap)
					rtt_us[rtt_n++] = d > 0xffffffffu ? 0xffffffffu : (uint32_t)d;
			}
		}
	}
	close(ep);
	return NULL;
}

static int cmpu32(const void *x, const void *y)
{
	uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
	return a < b ? -1 : a > b;
}
static uint32_t pct(double p)
{
	if (!rtt_n)
		return 0;
	size_t i = (size_t)(p * (rtt_n - 1) + 0.5);
	return rtt_us[i];
}

static uint16_t csum16(const void *p, int len)
{
	const uint16_t *w = p;
	uint32_t sum = 0;
	for (; len > 1; len -= 2)
		sum += *w++;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* packet mode: prebuild ethernet/IPv4/UDP headers per flow (UDP checksum 0 = none, DF set,
 * IP id 0, so the IP checksum is fixed per flow) */
static void packet_setup(void)
{
	unsigned char smac[6], dmac[6];
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", opt.ifname);
	if (ioctl(fd, SIOCGIFHWADDR, &ifr))
		die("SIOCGIFHWADDR");
	memcpy(smac, ifr.ifr_hwaddr.sa_data, 6);
	close(fd);
	if (sscanf(opt.dmac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &dmac[0], &dmac[1], &dmac[2], &dmac[3],
		   &dmac[4], &dmac[5]) != 6) {
		fprintf(stderr, "rtpgen: bad MAC %s\n", opt.dmac);
		exit(2);
	}
	pkt_ifindex = if_nametoindex(opt.ifname);
	if (!pkt_ifindex)
		die(opt.ifname);
	struct in_addr sa, da;
	inet_pton(AF_INET, opt.src, &sa);
	inet_pton(AF_INET, opt.dst, &da);
	for (int i = 0; i < opt.nflows; i++) {
		unsigned char *h = flows[i].hdr;
		memcpy(h, dmac, 6);
		memcpy(h + 6, smac, 6);
		h[12] = 0x08;
		h[13] = 0x00;
		struct iphdr ip = {.ihl = 5, .version = 4, .tot_len = htons(20 + 8 + opt.size),
				   .frag_off = htons(0x4000), .ttl = 64, .protocol = IPPROTO_UDP,
				   .saddr = sa.s_addr, .daddr = da.s_addr};
		ip.check = csum16(&ip, 20);
		memcpy(h + 14, &ip, 20);
		struct udphdr u = {.source = htons(opt.sport + i * opt.sstep),
				   .dest = htons(dports ? dports[i] : opt.dport + i * opt.dstep),
				   .len = htons(8 + opt.size), .check = 0};
		memcpy(h + 34, &u, 8);
	}
}

static int packet_socket(void)
{
	int fd = socket(AF_PACKET, SOCK_RAW, 0), one = 1; /* protocol 0: never receives */
	if (fd < 0)
		die("socket(AF_PACKET)");
	setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
	struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_ifindex = pkt_ifindex, .sll_protocol = 0};
	if (bind(fd, (struct sockaddr *)&ll, sizeof(ll)))
		die("bind(AF_PACKET)");
	return fd;
}

static int do_send(void)
{
	flows = calloc(opt.nflows, sizeof(*flows));
	for (int i = 0; opt.ifname && i < opt.nflows; i++)
		flows[i] = (struct flow){.fd = -1, .seq = (uint16_t)(i * 7919), .ts = i * 104729u,
					 .ssrc = 0x10000000u + i};
	if (opt.ifname)
		packet_setup();
	for (int i = 0; !opt.ifname && i < opt.nflows; i++) {
		int fd = udp_socket(opt.src, opt.sport + i * opt.sstep);
		struct sockaddr_in d = {.sin_family = AF_INET,
					.sin_port = htons(dports ? dports[i] : opt.dport + i * opt.dstep)};
		inet_pton(AF_INET, opt.dst, &d.sin_addr);
		if (connect(fd, (struct sockaddr *)&d, sizeof(d)))
			die("connect");
		flows[i] = (struct flow){.fd = fd, .seq = (uint16_t)(i * 7919), .ts = i * 104729u,
					 .ssrc = 0x10000000u + i};
	}
	pthread_t rt;
	if (opt.rtt) {
		rtt_us = malloc(rtt_cap * sizeof(*rtt_us));
		pthread_create(&rt, NULL, rtt_thread, NULL);
	}
	int T = opt.threads > opt.nflows ? opt.nflows : opt.threads;
	struct sendarg *args = calloc(T, sizeof(*args));
	pthread_t *th = calloc(T, sizeof(*th));
	g_t0 = now() + 0.01;
	for (int k = 0, first = 0; k < T; k++) {
		int nf = opt.nflows / T + (k < opt.nflows % T);
		args[k] = (struct sendarg){.id = k, .first = first, .nf = nf, .rate = opt.rate / T,
					   .pfd = opt.ifname ? packet_socket() : -1,
					   .limit = opt.count ? opt.count / T + (k < (int)(opt.count % T)) : 0};
		first += nf;
		pthread_create(&th[k], NULL, sender, &args[k]);
	}
	unsigned long long sent = 0, errors = 0, calls = 0;
	double ts = 1e18, te = 0;
	int lerr = 0;
	for (int k = 0; k < T; k++) {
		pthread_join(th[k], NULL);
		sent += args[k].sent;
		errors += args[k].errors;
		calls += args[k].calls;
		if (args[k].t_start < ts)
			ts = args[k].t_start;
		if (args[k].t_end > te)
			te = args[k].t_end;
		if (args[k].last_errno)
			lerr = args[k].last_errno;
	}
	double dur = te - ts;
	if (opt.rtt) {
		struct timespec w = {0, 300 * 1000000L};
		nanosleep(&w, NULL); /* let the last echoes arrive */
		rtt_stop = 1;
		pthread_join(rt, NULL);
		qsort(rtt_us, rtt_n, sizeof(*rtt_us), cmpu32);
	}
	printf("{\"role\":\"send\",\"mode\":\"%s\",\"flows\":%d,\"threads\":%d,\"target_pps\":%.0f,\"sent\":%llu,"
	       "\"ok\":%llu,\"errors\":%llu,\"last_errno\":\"%s\",\"syscalls\":%llu,\"dur_s\":%.4f,"
	       "\"pps\":%.0f",
	       opt.ifname ? "packet" : "udp", opt.nflows, T, opt.rate, sent, sent - errors, errors, lerr ? strerror(lerr) : "",
	       calls, dur, dur > 0 ? (sent - errors) / dur : 0.0);
	if (opt.rtt)
		printf(",\"rtt_n\":%zu,\"rtt_bad\":%llu,\"rtt_us\":{\"min\":%u,\"p50\":%u,\"p90\":%u,"
		       "\"p99\":%u,\"p999\":%u,\"max\":%u}",
		       rtt_n, rtt_bad, pct(0), pct(0.5), pct(0.9), pct(0.99), pct(0.999), pct(1));
	printf("}\n");
	return 0;
}

/* ---------------- soak ---------------- */
/* SCHED_IDLE busy loop pinned to one CPU: it only gets the cycles nobody else wants.
 * Relay cost on that CPU = 1 - (the soaker's loop rate in the window / its rate on the idle
 * CPU). Its rate, not its utime: on this kernel (no IRQ time accounting) a busy CPU's ticks
 * land in softirq whenever NET_RX is pending, so at 50 kpps the soaker's utime read ~1 % of
 * the CPU while it did ~98 % of its idle-CPU work. SIGUSR1 prints a mark (start of the
 * window), SIGTERM the last one and ends: {"t": seconds, "iters": count} per line. The first
 * line, {"ready":1}, says the handlers are in place. */
static volatile sig_atomic_t soak_mark, soak_stop;
static void soak_signal(int sig)
{
	if (sig == SIGUSR1)
		soak_mark = 1;
	else
		soak_stop = 1;
}

static int do_soak(void)
{
	struct sched_param sp = {0};
	if (sched_setscheduler(0, SCHED_IDLE, &sp))
		die("sched_setscheduler(SCHED_IDLE)");
	if (opt.ncpus)
		pin(opt.cpus[0]);
	signal(SIGUSR1, soak_signal);
	signal(SIGTERM, soak_signal);
	/* Only now may the driver signal us: SIGUSR1's default action would end the process. */
	printf("{\"ready\":1}\n");
	fflush(stdout);
	volatile unsigned long long it = 0;
	double t0 = now(), end = t0 + opt.duration;
	while (!soak_stop) {
		for (int i = 0; i < 100000; i++)
			it++;
		if (soak_mark) {
			soak_mark = 0;
			printf("{\"t\":%.6f,\"iters\":%llu}\n", now() - t0, it);
			fflush(stdout);
		}
		if (now() >= end)
			break;
	}
	printf("{\"t\":%.6f,\"iters\":%llu}\n", now() - t0, it);
	return 0;
}

/* ---------------- echo ---------------- */
static int do_echo(void)
{
	if (opt.ncpus)
		pin(opt.cpus[0]);
	int ep = epoll_create1(0);
	int *fds = calloc(opt.nflows, sizeof(int));
	for (int i = 0; i < opt.nflows; i++) {
		fds[i] = udp_socket(opt.src, opt.sport + i * opt.sstep);
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
		epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
	}
	struct mmsghdr msgs[64];
	struct iovec iov[64];
	static unsigned char buf[64][2048];
	struct sockaddr_in names[64];
	struct epoll_event evs[256];
	unsigned long long got = 0, echoed = 0;
	double end = now() + opt.duration;
	while (now() < end) {
		int n = epoll_wait(ep, evs, 256, 50);
		for (int e = 0; e < n; e++) {
			int fd = fds[evs[e].data.u32];
			mmsg_setup(msgs, iov, 64, buf[0], sizeof(buf[0]), names);
			int r = recvmmsg(fd, msgs, 64, MSG_DONTWAIT, NULL);
			if (r <= 0)
				continue;
			got += r;
			for (int i = 0; i < r; i++)
				iov[i].iov_len = msgs[i].msg_len;
			int s = sendmmsg(fd, msgs, r, 0);
			if (s > 0)
				echoed += s;
		}
	}
	printf("{\"role\":\"echo\",\"flows\":%d,\"received\":%llu,\"echoed\":%llu}\n", opt.nflows, got,
	       echoed);
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: rtpgen soak -C CPU -t SECONDS\n"
		"       rtpgen send|echo -s SRC [-p SPORT] [-P SSTEP] [-d DST] [-q DPORT] [-Q DSTEP]\n"
		"       [-f PORTFILE] [-n FLOWS] [-r RATE_PPS] [-t SECONDS] [-c COUNT] [-l SIZE]\n"
		"       [-b BATCH] [-T THREADS] [-C CPU,CPU..] [-R] [-x RTT_CPU] [-i IFACE -M DSTMAC]\n"
		"  -i/-M: packet mode (AF_PACKET, prebuilt headers, flows interleaved per packet;\n"
		"         no sockets, so no -R)\n");
	exit(2);
}

/* Traffic only between lab addresses: 10.0.0.0/8, inside the benchmark's own namespaces. */
static int lab_address(const char *text)
{
	struct in_addr a;
	return inet_pton(AF_INET, text, &a) == 1 && (ntohl(a.s_addr) >> 24) == 10;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	int soak = 0;
	if (!strcmp(argv[1], "echo"))
		opt.echo = 1;
	else if (!strcmp(argv[1], "soak"))
		soak = 1;
	else if (strcmp(argv[1], "send"))
		usage();
	int c;
	optind = 2;
	while ((c = getopt(argc, argv, "s:p:P:d:q:Q:f:n:r:t:c:l:b:T:C:Rx:i:M:")) != -1) {
		switch (c) {
		case 's': opt.src = optarg; break;
		case 'p': opt.sport = atoi(optarg); break;
		case 'P': opt.sstep = atoi(optarg); break;
		case 'd': opt.dst = optarg; break;
		case 'q': opt.dport = atoi(optarg); break;
		case 'Q': opt.dstep = atoi(optarg); break;
		case 'f': opt.portfile = optarg; break;
		case 'n': opt.nflows = atoi(optarg); break;
		case 'r': opt.rate = atof(optarg); break;
		case 't': opt.duration = atof(optarg); break;
		case 'c': opt.count = strtoull(optarg, NULL, 10); break;
		case 'l': opt.size = atoi(optarg); break;
		case 'b': opt.batch = atoi(optarg); break;
		case 'T': opt.threads = atoi(optarg); break;
		case 'R': opt.rtt = 1; break;
		case 'i': opt.ifname = optarg; break;
		case 'M': opt.dmac = optarg; break;
		case 'x': opt.rtt_cpu = atoi(optarg); break;
		case 'C': {
			char *s = strdup(optarg), *tok, *sv;
			for (tok = strtok_r(s, ",", &sv); tok && opt.ncpus < MAXCPUS; tok = strtok_r(NULL, ",", &sv))
				opt.cpus[opt.ncpus++] = atoi(tok);
			break;
		}
		default: usage();
		}
	}
	if (soak)
		return opt.duration > 0 && opt.duration <= 600 ? do_soak() : 2;
	if (!opt.src || opt.nflows < 1 || opt.size < 20 || opt.size > 1472 || opt.batch < 1 ||
	    opt.batch > MAXBATCH || opt.threads < 1 || opt.duration <= 0 || opt.duration > 600)
		usage();
	if (!lab_address(opt.src) || (opt.dst && !lab_address(opt.dst))) {
		fprintf(stderr, "rtpgen: lab addresses only (10.0.0.0/8)\n");
		return 2;
	}
	if (opt.nflows > 65536) /* bounded: one port per flow */
		usage();
	if (opt.echo)
		return do_echo();
	if (!opt.dst || (!opt.ifname != !opt.dmac) || (opt.ifname && opt.rtt))
		usage();
	if (opt.portfile) {
		FILE *f = fopen(opt.portfile, "r");
		if (!f)
			die(opt.portfile);
		dports = calloc(opt.nflows, sizeof(int));
		for (int i = 0; i < opt.nflows; i++)
			if (fscanf(f, "%d", &dports[i]) != 1) {
				fprintf(stderr, "rtpgen: %s has fewer than %d ports\n", opt.portfile, opt.nflows);
				return 2;
			}
		fclose(f);
	}
	return do_send();
}
