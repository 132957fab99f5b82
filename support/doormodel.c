/*
 * doormodel.c -- an ABI model of illumos doors for Linux (x86-64, glibc).
 *
 * Build:  cc -shared -fPIC -O2 -pthread -o libdoormodel.so support/doormodel.c
 *
 * WHAT THIS IS
 *
 * No illumos machine is reachable from CI, so doordown's native ctypes
 * binding is tested against this library.  It exports the illumos libc door
 * API (door_create, door_call, door_return, door_info, door_revoke,
 * door_ucred + ucred_geteuid/ucred_getegid/ucred_getpid/ucred_free,
 * door_cred, door_server_create, door_bind, door_unbind, door_getparam,
 * door_setparam, fattach, fdetach; plus doormodel_* functions for tests)
 * with the illumos amd64 struct layouts and
 * constants, and -- the point of the exercise -- with the illumos behaviour
 * of server threads:
 *
 *   - door_return() never returns on success.  The thread parks until the
 *     next invocation and then starts the server procedure afresh at a fixed
 *     spot near the top of its own stack, with the request data and the
 *     descriptor array copied onto the stack just above the procedure's
 *     frame, exactly like door_layout()/door_server_dispatch() in
 *     usr/src/uts/common/fs/doorfs/door_sys.c and __door_return in
 *     usr/src/lib/libc/amd64/sys/door.s.  Every frame that was live when
 *     door_return() was called is abandoned and overwritten.  Code that
 *     calls door_return() from an interpreter frame (a naive ctypes
 *     callback) is broken by this, as it would be on illumos.
 *   - If the procedure returns instead of calling door_return(), the thread
 *     exits and the blocked client gets EINTR (door.s calls _thrp_terminate;
 *     door_slam() sets DOOR_EXIT, which door_call() turns into EINTR).
 *   - Server threads come from the door_server_create() creator: once for
 *     the first non-private door of a process (door_create_cmn() in
 *     usr/src/lib/libc/port/threads/door_calls.c, called with NULL), once per
 *     private door (called with a door_info_t *), and on DEPLETION: when the
 *     thread that picks up an invocation leaves its pool empty, it calls
 *     the creator before the procedure (door.s: "nservers" == 0 ->
 *     door_depletion_cb(), which passes NULL for non-private doors and a
 *     door_info_t * for private ones).  The default creator makes a detached
 *     thread with libc's default stack (2,088,960 bytes, no guard page:
 *     find_stack() in thr.c) and cancellation disabled that calls
 *     door_return(NULL, 0, NULL, 0); it inherits its creator's signal mask.  Pools never shrink.  Free threads form
 *     a LIFO stack (door_release_server() pushes on the head,
 *     door_get_server() takes the head).  door_call() blocks while no thread
 *     of the door's pool is free.  Two consequences, as on illumos: a thread
 *     that parks for the first time goes on top and becomes the "hot" thread
 *     that serves the next sequential call; and calls that arrive before
 *     freshly created threads have parked find the pool empty and make the
 *     creator run again, so a burst can overshoot the pool size a little.
 *   - Request data goes on the server thread's stack: a request that does
 *     not fit (stack size minus the libc reserve of 1/32 of the stack, at
 *     most 64 KiB, minus 512 bytes of slop) fails with E2BIG.  With the
 *     default threads that is 2,023,168 bytes, below an invocation base 512
 *     bytes under the top of the stack; whatever the procedure calls runs in
 *     what the request leaves.
 *   - Reply placement as door_results()/door_overflow(): results that fit
 *     in rbuf/rsize go there; otherwise a fresh anonymous mapping is made
 *     (plain mmap, so the client frees it with the real munmap(rbuf, rsize))
 *     of roundup(data_size + 24 * ndesc, PAGESIZE) bytes.  Returned
 *     descriptors follow the data at roundup(data_size, 24); when that puts
 *     them past the mapping the call fails with EFAULT.
 *   - The failure paths: a signal while the caller waits for a free server
 *     thread fails the call with EAGAIN (door_get_server()), once a thread
 *     has it with EINTR, and the caller detaches: the server's door_ucred()
 *     then fails with EINVAL.  door_return() with descriptors the caller
 *     cannot take fails back to the SERVER with EMFILE (door_results():
 *     ufcanalloc()), the descriptors still the server's, the caller still
 *     waiting.  DOORMODEL_MAX_LWPS=N in the environment refuses thread
 *     creation past N default-creator threads, as a zone's zone.max-lwps
 *     does.
 *     DOORMODEL_REPLY_FAULTS_ABOVE=N makes door_return() of more than N
 *     (and more than 16 KiB) bytes fail with EFAULT, as door_results()
 *     does when the copy into the caller's buffer faults.
 *     With zero-length results data_ptr/desc_ptr are left as they were.
 *   - door_call(fd, NULL) means "no results": a door_return() with data or
 *     descriptors then fails with E2BIG in the server (door_results()).
 *
 * TEST HOOKS (no illumos API; see each for the illumos code it stands at)
 *
 *   - doormodel_calls(): door_calls started and waiting for results;
 *     doormodel_hold_next_call() / doormodel_held_call() /
 *     doormodel_release_call(): a gate at door_call()'s entry, before the
 *     descriptor is looked at.  Races made to happen on demand.
 *   - LD_PRELOADed, the library also watches mmap()/mprotect()/munmap():
 *     doormodel_wx_procedures() counts doors whose procedure was ever in
 *     writable and executable memory; DOORMODEL_REFUSE_EXEC=1 refuses to
 *     make memory executable, as a W^X policy does.
 *
 * HOW IT WORKS
 *
 *   - Each door is a listening abstract-namespace Unix socket in the server
 *     process, named "doormodel1/d/<pid>/<nonce>/<seq>/<attrs>".  The fd
 *     that door_create() returns is a socket CONNECTED to that listener (a
 *     "handle"): getpeername() on it yields the door's name in any process
 *     it is passed to (SCM_RIGHTS), and it is close-on-exec like a door fd.
 *   - fattach(door, path) binds a second listener named
 *     "doormodel1/a/<st_dev>/<st_ino>" of the path.  Clients open(path) with
 *     the real open(); door_call() on a non-socket fd fstat()s it and
 *     connects to that name.  No extra files are created; an attachment
 *     vanishes with its process.
 *   - One dispatcher thread per server process epoll()s the listeners and
 *     the accepted connections, reads each request header (with the
 *     SCM_RIGHTS descriptors), answers door_info/door_getparam/fdetach
 *     requests itself, and hands calls to the head of the free-thread stack
 *     (or queues them while the pool is empty).  The server thread reads
 *     the request data straight onto its own stack, runs the procedure,
 *     and sends the reply from door_return().
 *   - Clients keep a process-wide pool of idle connections per door name,
 *     so concurrent callers use separate connections and are served by
 *     separate server threads; nothing is serialised.
 *   - door_return() first switches to a small per-thread "park" stack
 *     (dm_jump, a few lines of asm that load %rsp and call), sends the
 *     reply, waits, receives the next request onto the real stack, and then
 *     dm_jumps to the computed procedure stack pointer.  dm_jump's CFI marks
 *     %rip undefined, so unwinders (pthread_exit's forced unwind) stop there.
 *
 * WHERE THE MODEL DIFFERS FROM ILLUMOS (deliberately, or because Linux
 * cannot do it cheaply)
 *
 *   - glibc keeps the TCB, static TLS and start_thread()'s frame (which
 *     pthread_exit longjmps to) at the top of a thread's stack, so those
 *     must survive: default-creator threads get 128 KiB above the modelled
 *     2,088,960-byte stack for them.  On threads from another creator "top
 *     of stack" is the stack pointer of the thread's FIRST door_return()
 *     minus 512 bytes.
 *   - DOOR_UNREF / DOOR_UNREF_MULTI are accepted and reported but no
 *     unreferenced notification is ever delivered.  DOOR_IS_UNREF is never
 *     reported.  No SIGCANCEL is sent to server threads on client abort.
 *   - Stale attachments are marked with an extended attribute of the file
 *     (STALE_XATTR): after the server died, calls through the path get EBADF
 *     and fattach EBUSY until fdetach, as on illumos; but door_info through
 *     the path says EBADF (illumos: di_target -1, DOOR_REVOKED).  Without
 *     user extended attributes on the file system, a dead server's
 *     attachments simply disappear.
 *   - A client fd obtained by open(path) is tied to the path's (dev, ino),
 *     not to the door that was attached at open() time: after the server is
 *     restarted, the same fd reaches the new door (illumos: EBADF forever);
 *     after fdetach, calls through pre-existing fds fail with EBADF
 *     (illumos: they still reach the door).
 *   - fattach() only attaches doors served by the calling process (EINVAL
 *     otherwise).  fdetach() of another process's attachment is forwarded
 *     to the attaching process.
 *   - door_ucred() reports the euid/egid/pid the caller had when its
 *     connection was made (SO_PEERCRED), and ruid/rgid = euid/egid.
 *   - A signal interrupts door_call() (EINTR, or EAGAIN while no server
 *     thread has the call) only if its handler was installed without
 *     SA_RESTART (CPython's are).  EFAULT is only reported for NULL pointers
 *     with non-zero sizes and for overflowed descriptors; other bad pointers
 *     crash, as plain C would.
 *   - Default-creator threads get a PROT_NONE page below their stack, so
 *     that running off it faults at once; illumos has none there.
 *   - The descriptors' d_id for non-door fds is 0; for doors it is the
 *     door's uniquifier (door_insert()).  DOOR_LOCAL/DOOR_REVOKED are set on
 *     received door descriptors only when the receiver is the server.
 *   - After fork() the child forgets the parent's doors (they stay usable as
 *     a client, like fork1() on illumos); server-side sockets are closed in
 *     the child so that a forked child never keeps a dead server "alive".
 *   - No 32-bit support; Linux x86-64 only.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#if !defined(__x86_64__) || !defined(__linux__)
#error "doormodel models illumos amd64 and needs Linux x86-64"
#endif

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------------ */
/* Public types and constants (usr/src/uts/common/sys/door.h, amd64)        */
/* ------------------------------------------------------------------------ */

typedef unsigned int uint_t;
typedef unsigned long long door_ptr_t;
typedef unsigned long long door_id_t;
typedef unsigned int door_attr_t;

#define DOOR_INVAL		(-1)
#define DOOR_UNREF_DATA		((void *)1)
#define DOOR_QUERY		(-2)

#define DOOR_UNREF		0x01
#define DOOR_PRIVATE		0x02
#define DOOR_LOCAL		0x04
#define DOOR_REVOKED		0x08
#define DOOR_UNREF_MULTI	0x10
#define DOOR_IS_UNREF		0x20
#define DOOR_REFUSE_DESC	0x40
#define DOOR_NO_CANCEL		0x80
#define DOOR_NO_DEPLETION_CB	0x100	/* door_xcreate only: EINVAL here */

#define DOOR_CREATE_MASK	(DOOR_UNREF | DOOR_PRIVATE | DOOR_UNREF_MULTI | \
				    DOOR_REFUSE_DESC | DOOR_NO_CANCEL)

#define DOOR_DESCRIPTOR		0x10000
#define DOOR_RELEASE		0x40000

#define DOOR_PARAM_DESC_MAX	1
#define DOOR_PARAM_DATA_MAX	2
#define DOOR_PARAM_DATA_MIN	3

/* door_sys.c: door_max_desc, the per-call descriptor limit (E2BIG). */
#define DOOR_MAX_DESC		1024

/* On amd64 door.h wraps door_desc_t and door_info_t in #pragma pack(4). */
#pragma pack(4)
typedef struct door_desc {
	door_attr_t	d_attributes;
	union {
		struct {
			int		d_descriptor;
			door_id_t	d_id;
		} d_desc;
		int		d_resv[5];
	} d_data;
} door_desc_t;

typedef struct door_info {
	pid_t		di_target;
	door_ptr_t	di_proc;
	door_ptr_t	di_data;
	door_attr_t	di_attributes;
	door_id_t	di_uniquifier;
	int		di_resv[4];
} door_info_t;
#pragma pack()

typedef struct door_arg {
	char		*data_ptr;
	size_t		data_size;
	door_desc_t	*desc_ptr;
	uint_t		desc_num;
	char		*rbuf;
	size_t		rsize;
} door_arg_t;

typedef struct door_cred {
	uid_t	dc_euid;
	gid_t	dc_egid;
	uid_t	dc_ruid;
	gid_t	dc_rgid;
	pid_t	dc_pid;
	int	dc_resv[4];
} door_cred_t;

typedef void door_server_procedure_t(void *, char *, size_t, door_desc_t *,
    uint_t);
typedef void door_server_func_t(door_info_t *);
typedef struct ucred_s ucred_t;

_Static_assert(sizeof (door_arg_t) == 48, "door_arg_t size");
_Static_assert(offsetof(door_arg_t, data_ptr) == 0, "data_ptr");
_Static_assert(offsetof(door_arg_t, data_size) == 8, "data_size");
_Static_assert(offsetof(door_arg_t, desc_ptr) == 16, "desc_ptr");
_Static_assert(offsetof(door_arg_t, desc_num) == 24, "desc_num");
_Static_assert(offsetof(door_arg_t, rbuf) == 32, "rbuf");
_Static_assert(offsetof(door_arg_t, rsize) == 40, "rsize");
_Static_assert(sizeof (door_desc_t) == 24, "door_desc_t size");
_Static_assert(offsetof(door_desc_t, d_attributes) == 0, "d_attributes");
_Static_assert(offsetof(door_desc_t, d_data) == 4, "d_data");
_Static_assert(offsetof(door_desc_t, d_data.d_desc.d_descriptor) == 4,
    "d_descriptor");
_Static_assert(offsetof(door_desc_t, d_data.d_desc.d_id) == 8, "d_id");
_Static_assert(sizeof (door_info_t) == 48, "door_info_t size");
_Static_assert(offsetof(door_info_t, di_target) == 0, "di_target");
_Static_assert(offsetof(door_info_t, di_proc) == 4, "di_proc");
_Static_assert(offsetof(door_info_t, di_data) == 12, "di_data");
_Static_assert(offsetof(door_info_t, di_attributes) == 20, "di_attributes");
_Static_assert(offsetof(door_info_t, di_uniquifier) == 24, "di_uniquifier");
_Static_assert(offsetof(door_info_t, di_resv) == 32, "di_resv");
_Static_assert(sizeof (door_cred_t) == 36, "door_cred_t size");

/* ------------------------------------------------------------------------ */
/* Wire protocol between the model's clients and dispatchers                 */
/* ------------------------------------------------------------------------ */

#define DM_MAGIC	0x31444d44u	/* "DMD1" */
#define DM_PREFIX	"doormodel1/"

enum {
	M_CALL = 1,	/* door_call: size data bytes + ndesc fds follow */
	M_INFO,		/* door_info: reply carries a door_info_t */
	M_GETPARAM,	/* door_getparam: a = param; reply b = value */
	M_DETACH,	/* fdetach of the attachment this connection came in on */
	M_CANCEL,	/* a = token of a call still waiting for a server thread */
	M_ASKFDS,	/* server -> caller: a = descriptors door_return passes */
	M_FDSOK,	/* caller -> server: a = 1 if it can take them all */
	M_REPLY = 0x80
};
#define MF_NORESULTS	1	/* door_call(d, NULL) */

struct dm_msg {
	uint32_t	magic;
	uint16_t	type;
	uint16_t	flags;
	uint32_t	ndesc;	/* descriptors travelling with this message */
	int32_t		err;	/* replies: errno, 0 on success */
	uint64_t	size;	/* data bytes following the header */
	uint64_t	a, b;
};
_Static_assert(sizeof (struct dm_msg) == 40, "dm_msg size");

/* The most fds one SCM_RIGHTS message may carry (Linux SCM_MAX_FD). */
#define CHUNK_FDS	253

/* ------------------------------------------------------------------------ */
/* Internal state                                                            */
/* ------------------------------------------------------------------------ */

enum { K_DOOR = 1, K_ATTACH, K_CONN };

struct sthread;
struct conn;

struct pool {				/* door_pool_t */
	struct sthread	*free_top;	/* LIFO of parked threads */
	unsigned	nfree;
	struct conn	*pend_head;	/* calls waiting for a free thread */
	struct conn	*pend_tail;
};

struct door {
	int			kind;	/* K_DOOR: first, for epoll dispatch */
	int			lfd;	/* listening socket */
	struct door		*next;
	uint64_t		seq;
	door_id_t		id;	/* di_uniquifier */
	door_server_procedure_t	*proc;
	void			*cookie;
	uint_t			attrs;
	int			revoked;
	size_t			data_max, data_min, desc_max;
	struct pool		priv;	/* DOOR_PRIVATE pool */
	struct sockaddr_un	addr;
	socklen_t		alen;
};

struct attach {
	int		kind;		/* K_ATTACH */
	int		lfd;		/* -1 once detached */
	struct attach	*next;
	struct door	*door;
	dev_t		dev;
	ino_t		ino;
	uid_t		owner;
	char		*path;		/* for the STALE_XATTR mark */
};

/*
 * namefs (usr/src/uts/common/fs/namefs/namevfs.c) keeps an attachment
 * mounted until fdetach, whatever becomes of the server: when it dies its
 * doors are revoked (callers get EBADF) but the path stays covered, and
 * fattach there fails with EBUSY.  The model marks an attached file with
 * this extended attribute and clears it in fdetach, so that the mark of a
 * server that died without fdetach outlives it, with the file.
 */
#define STALE_XATTR	"user.doormodel.attached"

struct conn {				/* one accepted client connection */
	int		kind;		/* K_CONN */
	int		fd;
	struct conn	*next, *prev;	/* rt.conns (all of them, for fork) */
	struct conn	*qnext;		/* pool pending queue */
	struct door	*door;
	struct attach	*via;		/* attachment it was accepted on */
	pid_t		pid;		/* SO_PEERCRED of the caller */
	uid_t		euid;
	gid_t		egid;
	struct dm_msg	req;		/* pending M_CALL header */
	int		*fds;		/* and its descriptors */
	unsigned	nfds;
};

struct sthread {			/* a door server thread */
	struct sthread	*next_free;
	pthread_cond_t	cv;
	struct pool	*pool;		/* where it parks (global or bound) */
	struct door	*bound;		/* door_bind() */
	struct conn	*job;		/* handed over by the dispatcher */
	int		job_deplete;
	/* invocation being served */
	struct conn	*conn;
	struct door	*door;
	int		noresults;
	/* stack geometry */
	uintptr_t	reset_sp;	/* the "top": base of every invocation */
	size_t		ssize;		/* bytes usable below reset_sp; 0: unchecked */
	char		*park_map;
	size_t		park_len;
	uintptr_t	park_top;
	/* door_return() arguments, staged for the park stack */
	char		*r_data;
	size_t		r_size;
	door_desc_t	*r_desc;
	uint_t		r_ndesc;
	/* the next invocation, staged for invoke_main() */
	char		*argp;
	size_t		arg_size;
	door_desc_t	*dp;
	uint_t		ndesc;
	int		deplete;
	door_info_t	*infop;
};

struct cconn {				/* an idle client connection */
	struct cconn		*next;
	int			fd;
	socklen_t		alen;
	struct sockaddr_un	addr;
};

struct dref {				/* what a descriptor refers to */
	int			kind;	/* 'd': door handle, 'a': a file */
	pid_t			pid;	/* 'd' */
	uint32_t		nonce;
	uint64_t		seq;
	uint_t			attrs;
	dev_t			dev;	/* 'a' */
	ino_t			ino;
	struct sockaddr_un	addr;
	socklen_t		alen;
};

static void default_creator(door_info_t *);

static pthread_mutex_t G = PTHREAD_MUTEX_INITIALIZER;

static struct {
	pid_t			pid;	/* process the runtime below belongs to */
	uint32_t		nonce;
	int			epfd;
	pid_t			first_pid;	/* door_create_first_pid */
	uint64_t		seq;
	struct door		*doors;
	struct attach		*attaches;
	struct conn		*conns;
	struct pool		gpool;	/* p_server_threads */
	door_server_func_t	*creator;
	unsigned long		nthreads;	/* live server threads */
	unsigned long		ncreated;	/* by default_creator */
	struct cconn		*idle;
	unsigned		nidle;
} rt = { .epfd = -1, .creator = default_creator };

static __thread struct sthread *tls_self;

static int
seterr(int e)
{
	errno = e;
	return (-1);
}

/* ------------------------------------------------------------------------ */
/* The stack switch                                                          */
/* ------------------------------------------------------------------------ */

/*
 * dm_jump(arg, sp, fn): load %rsp = sp (16-byte aligned) and call fn(arg)
 * there.  fn never returns.  Whatever was on the old stack is abandoned.
 * ".cfi_undefined %rip" makes dm_jump the outermost frame for unwinders.
 */
__attribute__((noreturn, visibility("hidden")))
void dm_jump(void *arg, uintptr_t sp, void (*fn)(void *));
__asm__(
	"	.text\n"
	"	.globl	dm_jump\n"
	"	.hidden	dm_jump\n"
	"	.type	dm_jump, @function\n"
	"	.p2align 4\n"
	"dm_jump:\n"
	"	.cfi_startproc\n"
	"	.cfi_undefined %rip\n"
	"	movq	%rsi, %rsp\n"
	"	xorl	%ebp, %ebp\n"
	"	callq	*%rdx\n"
	"	ud2\n"
	"	.cfi_endproc\n"
	"	.size	dm_jump, .-dm_jump\n");

/* ------------------------------------------------------------------------ */
/* Socket helpers                                                            */
/* ------------------------------------------------------------------------ */

static socklen_t
make_addr(struct sockaddr_un *sa, const char *name)
{
	size_t n = strlen(name);

	memset(sa, 0, sizeof (*sa));
	sa->sun_family = AF_UNIX;
	if (n > sizeof (sa->sun_path) - 1)
		n = sizeof (sa->sun_path) - 1;
	memcpy(sa->sun_path + 1, name, n);	/* abstract: leading NUL */
	return ((socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n));
}

static void
close_fds(const int *fds, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		if (fds[i] >= 0)
			(void) close(fds[i]);
}

/*
 * Send the whole iovec; the first successful sendmsg carries the fds.
 * Returns 0 or -errno.  If intr, EINTR is returned (the caller then drops
 * the connection, whose stream may be half-written); otherwise retried.
 */
static int
xsendmsg(int fd, struct iovec *iov, int iovcnt, const int *fds, unsigned nfds,
    int intr)
{
	union {
		char buf[CMSG_SPACE(sizeof (int) * CHUNK_FDS)];
		struct cmsghdr align;
	} cb;
	struct msghdr mh;

	memset(&mh, 0, sizeof (mh));
	mh.msg_iov = iov;
	mh.msg_iovlen = iovcnt;
	if (nfds > 0) {
		struct cmsghdr *cm;

		mh.msg_control = cb.buf;
		mh.msg_controllen = CMSG_SPACE(sizeof (int) * nfds);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof (int) * nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof (int) * nfds);
	}
	for (;;) {
		ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR && !intr)
				continue;
			return (-errno);
		}
		mh.msg_control = NULL;
		mh.msg_controllen = 0;
		while (n > 0 && mh.msg_iovlen > 0) {
			if ((size_t)n >= mh.msg_iov->iov_len) {
				n -= (ssize_t)mh.msg_iov->iov_len;
				mh.msg_iov++;
				mh.msg_iovlen--;
			} else {
				mh.msg_iov->iov_base =
				    (char *)mh.msg_iov->iov_base + n;
				mh.msg_iov->iov_len -= (size_t)n;
				n = 0;
			}
		}
		while (mh.msg_iovlen > 0 && mh.msg_iov->iov_len == 0) {
			mh.msg_iov++;
			mh.msg_iovlen--;
		}
		if (mh.msg_iovlen == 0)
			return (0);
	}
}

/* header [+ data], fds in chunks of CHUNK_FDS (extra chunks: 1 byte each) */
static int
send_message(int fd, struct dm_msg *h, const void *data, size_t size,
    const int *fds, unsigned nfds, int intr)
{
	struct iovec iov[2];
	unsigned first = nfds > CHUNK_FDS ? CHUNK_FDS : nfds;
	int e;

	h->magic = DM_MAGIC;
	h->ndesc = nfds;
	h->size = size;
	iov[0].iov_base = h;
	iov[0].iov_len = sizeof (*h);
	iov[1].iov_base = (void *)data;
	iov[1].iov_len = size;
	if (nfds <= CHUNK_FDS)
		return (xsendmsg(fd, iov, size ? 2 : 1, fds, nfds, intr));
	if ((e = xsendmsg(fd, iov, 1, fds, first, intr)) != 0)
		return (e);
	for (unsigned off = first; off < nfds; off += CHUNK_FDS) {
		char zero = 0;
		struct iovec one = { &zero, 1 };
		unsigned k = nfds - off > CHUNK_FDS ? CHUNK_FDS : nfds - off;

		if ((e = xsendmsg(fd, &one, 1, fds + off, k, intr)) != 0)
			return (e);
	}
	if (size == 0)
		return (0);
	return (xsendmsg(fd, &iov[1], 1, NULL, 0, intr));
}

#define DM_EOF	(-100000)	/* peer closed the connection */

static int
recv_all(int fd, void *buf, size_t len, int intr)
{
	char *p = buf;

	while (len > 0) {
		ssize_t n = recv(fd, p, len, MSG_WAITALL);

		if (n == 0)
			return (DM_EOF);
		if (n < 0) {
			if (errno == EINTR && !intr)
				continue;
			return (-errno);
		}
		p += n;
		len -= (size_t)n;
	}
	return (0);
}

static int
drain(int fd, uint64_t len)
{
	char buf[8192];

	while (len > 0) {
		size_t k = len > sizeof (buf) ? sizeof (buf) : (size_t)len;
		int e = recv_all(fd, buf, k, 0);

		if (e != 0)
			return (e);
		len -= k;
	}
	return (0);
}

/* One recvmsg of exactly len bytes collecting SCM_RIGHTS into fds[*got..]. */
static int
recv_with_fds(int fd, void *buf, size_t len, int *fds, unsigned maxfds,
    unsigned *got, int intr)
{
	union {
		char buf[CMSG_SPACE(sizeof (int) * CHUNK_FDS)];
		struct cmsghdr align;
	} cb;
	struct msghdr mh;
	struct iovec iov;
	ssize_t n;
	int trunc = 0;

	for (;;) {
		memset(&mh, 0, sizeof (mh));
		iov.iov_base = buf;
		iov.iov_len = len;
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cb.buf;
		mh.msg_controllen = sizeof (cb.buf);
		n = recvmsg(fd, &mh, MSG_WAITALL);
		if (n < 0 && errno == EINTR && !intr)
			continue;
		break;
	}
	if (n == 0)
		return (DM_EOF);
	if (n < 0)
		return (-errno);
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm != NULL;
	    cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		unsigned k = (unsigned)((cm->cmsg_len - CMSG_LEN(0)) /
		    sizeof (int));
		int *in = (int *)CMSG_DATA(cm);

		for (unsigned i = 0; i < k; i++) {
			if (*got < maxfds)
				fds[(*got)++] = in[i];
			else {
				(void) close(in[i]);
				trunc = 1;
			}
		}
	}
	if (mh.msg_flags & MSG_CTRUNC)
		trunc = 1;
	if ((size_t)n < len) {
		int e = recv_all(fd, (char *)buf + n, len - (size_t)n, intr);

		if (e != 0)
			return (e);
	}
	return (trunc ? -EMFILE : 0);
}

/*
 * Receive a header and all the descriptors announced in it.  On error every
 * received fd is closed.  -EMFILE: descriptors were lost (the stream is still
 * in sync; the data, if any, is still to be read).
 */
static int
recv_header(int fd, struct dm_msg *h, int *fds, unsigned maxfds,
    unsigned *nfds, int intr)
{
	unsigned extra;
	int e, lost = 0;

	*nfds = 0;
	e = recv_with_fds(fd, h, sizeof (*h), fds, maxfds, nfds, intr);
	if (e == -EMFILE)
		lost = 1;
	else if (e != 0)
		goto fail;
	if (h->magic != DM_MAGIC || h->ndesc > DOOR_MAX_DESC) {
		e = -EPROTO;
		goto fail;
	}
	/* descriptors beyond the first CHUNK_FDS ride on 1-byte messages */
	extra = h->ndesc > CHUNK_FDS ?
	    (h->ndesc - CHUNK_FDS + CHUNK_FDS - 1) / CHUNK_FDS : 0;
	while (extra-- > 0) {
		char one;

		e = recv_with_fds(fd, &one, 1, fds, maxfds, nfds, intr);
		if (e == -EMFILE)
			lost = 1;
		else if (e != 0)
			goto fail;
	}
	if (lost || *nfds != h->ndesc) {
		/* descriptors were lost; the stream itself is still in sync */
		close_fds(fds, *nfds);
		*nfds = 0;
		return (-EMFILE);
	}
	return (0);
fail:
	close_fds(fds, *nfds);
	*nfds = 0;
	return (e);
}

static int
send_error(int fd, int err)
{
	struct dm_msg h;

	memset(&h, 0, sizeof (h));
	h.type = M_REPLY;
	h.err = err;
	return (send_message(fd, &h, NULL, 0, NULL, 0, 0));
}

/* ------------------------------------------------------------------------ */
/* Naming doors                                                              */
/* ------------------------------------------------------------------------ */

static void
attach_name(char *buf, size_t len, dev_t dev, ino_t ino)
{
	(void) snprintf(buf, len, DM_PREFIX "a/%llx/%llx",
	    (unsigned long long)dev, (unsigned long long)ino);
}

/* Parse a peer address; 0 if it names a door. */
static int
parse_door_addr(const struct sockaddr_un *sa, socklen_t len, struct dref *r)
{
	size_t off = offsetof(struct sockaddr_un, sun_path);
	char name[sizeof (sa->sun_path) + 1];
	size_t n;
	int pid;
	unsigned nonce, attrs;
	unsigned long long seq;
	int used = 0;

	if (len <= off + 1 || sa->sun_path[0] != '\0')
		return (-1);
	n = len - off - 1;
	memcpy(name, sa->sun_path + 1, n);
	name[n] = '\0';
	if (sscanf(name, DM_PREFIX "d/%d/%x/%llu/%x%n", &pid, &nonce, &seq,
	    &attrs, &used) != 4 || name[used] != '\0')
		return (-1);
	r->kind = 'd';
	r->pid = pid;
	r->nonce = nonce;
	r->seq = seq;
	r->attrs = attrs;
	r->addr = *sa;
	r->alen = len;
	return (0);
}

/*
 * What does descriptor fd refer to?  A door handle (a socket connected to a
 * door listener) or a file (which may have a door attached).  EBADF if
 * neither, as door_lookup() in door_sys.c says of a descriptor that is not
 * a door.
 */
static int
door_ref(int fd, struct dref *r)
{
	struct sockaddr_un sa;
	socklen_t len = sizeof (sa);
	struct stat st;
	char name[96];

	memset(r, 0, sizeof (*r));
	if (getpeername(fd, (struct sockaddr *)&sa, &len) == 0) {
		if (parse_door_addr(&sa, len, r) == 0)
			return (0);
		return (seterr(EBADF));
	}
	if (errno != ENOTSOCK)
		return (seterr(EBADF));
	if (fstat(fd, &st) != 0)
		return (seterr(EBADF));
	r->kind = 'a';
	r->dev = st.st_dev;
	r->ino = st.st_ino;
	attach_name(name, sizeof (name), st.st_dev, st.st_ino);
	r->alen = make_addr(&r->addr, name);
	return (0);
}

static uint64_t
door_uniquifier(uint32_t nonce, uint64_t seq)
{
	return (((uint64_t)nonce << 32) | (seq & 0xffffffffu));
}

/* A door served by this process, or NULL.  G held. */
static struct door *
local_door_locked(const struct dref *r)
{
	if (r->kind == 'd') {
		if (r->pid != getpid() || r->nonce != rt.nonce ||
		    rt.pid != getpid())
			return (NULL);
		for (struct door *d = rt.doors; d != NULL; d = d->next)
			if (d->seq == r->seq)
				return (d);
		return (NULL);
	}
	if (rt.pid != getpid())
		return (NULL);
	for (struct attach *a = rt.attaches; a != NULL; a = a->next)
		if (a->lfd >= 0 && a->dev == r->dev && a->ino == r->ino)
			return (a->door);
	return (NULL);
}

static struct pool *
door_pool(struct door *d)
{
	return ((d->attrs & DOOR_PRIVATE) ? &d->priv : &rt.gpool);
}

/* door_info_common(): G held */
static void
fill_info_locked(struct door *d, door_info_t *di, pid_t caller)
{
	memset(di, 0, sizeof (*di));
	di->di_target = getpid();
	di->di_proc = (door_ptr_t)(uintptr_t)d->proc;
	di->di_data = (door_ptr_t)(uintptr_t)d->cookie;
	di->di_attributes = (d->attrs & DOOR_CREATE_MASK) |
	    (d->revoked ? DOOR_REVOKED : 0) |
	    (caller == getpid() ? DOOR_LOCAL : 0);
	di->di_uniquifier = d->id;
}

/* Fill in a door_desc_t for a descriptor just received (door_insert()). */
static void
describe_fd(int fd, door_desc_t *dd)
{
	struct sockaddr_un sa;
	socklen_t len = sizeof (sa);
	struct dref r;

	memset(dd, 0, sizeof (*dd));
	dd->d_attributes = DOOR_DESCRIPTOR;
	dd->d_data.d_desc.d_descriptor = fd;
	if (getpeername(fd, (struct sockaddr *)&sa, &len) != 0 ||
	    parse_door_addr(&sa, len, &r) != 0)
		return;
	dd->d_attributes |= r.attrs & DOOR_CREATE_MASK;
	dd->d_data.d_desc.d_id = door_uniquifier(r.nonce, r.seq);
	pthread_mutex_lock(&G);
	struct door *d = local_door_locked(&r);
	if (d != NULL)
		dd->d_attributes |= DOOR_LOCAL |
		    (d->revoked ? DOOR_REVOKED : 0);
	pthread_mutex_unlock(&G);
}

/* ------------------------------------------------------------------------ */
/* Client connection pool                                                    */
/* ------------------------------------------------------------------------ */

static int
cpool_get(const struct dref *r, int *fresh)
{
	int fd;

	pthread_mutex_lock(&G);
	for (struct cconn **pp = &rt.idle; *pp != NULL; pp = &(*pp)->next) {
		struct cconn *c = *pp;

		if (c->alen == r->alen &&
		    memcmp(&c->addr, &r->addr, r->alen) == 0) {
			*pp = c->next;
			rt.nidle--;
			pthread_mutex_unlock(&G);
			fd = c->fd;
			free(c);
			*fresh = 0;
			return (fd);
		}
	}
	pthread_mutex_unlock(&G);
	*fresh = 1;
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
		return (-1);
	while (connect(fd, (const struct sockaddr *)&r->addr, r->alen) != 0) {
		if (errno == EINTR)
			continue;
		(void) close(fd);
		/* no such door (any more): door_lookup(), DOOR_INVALID() */
		return (seterr(EBADF));
	}
	return (fd);
}

static void
cpool_put(int fd, const struct dref *r)
{
	struct cconn *c = malloc(sizeof (*c));

	if (c == NULL) {
		(void) close(fd);
		return;
	}
	c->fd = fd;
	c->addr = r->addr;
	c->alen = r->alen;
	pthread_mutex_lock(&G);
	if (rt.nidle < 1024) {
		c->next = rt.idle;
		rt.idle = c;
		rt.nidle++;
		c = NULL;
	}
	pthread_mutex_unlock(&G);
	if (c != NULL) {
		(void) close(fd);
		free(c);
	}
}

static void
cpool_forget(const struct dref *r)
{
	pthread_mutex_lock(&G);
	for (struct cconn **pp = &rt.idle; *pp != NULL; ) {
		struct cconn *c = *pp;

		if (c->alen == r->alen &&
		    memcmp(&c->addr, &r->addr, r->alen) == 0) {
			*pp = c->next;
			rt.nidle--;
			(void) close(c->fd);
			free(c);
		} else {
			pp = &c->next;
		}
	}
	pthread_mutex_unlock(&G);
}

/* A request/reply round trip that is not a door_call (no data out). */
static int
rpc(const struct dref *r, int type, uint64_t a, struct dm_msg *rep,
    void *out, size_t outlen)
{
	for (int attempt = 0; ; attempt++) {
		struct dm_msg h;
		int fresh, fd, e;
		unsigned nf;

		if ((fd = cpool_get(r, &fresh)) < 0)
			return (-1);
		memset(&h, 0, sizeof (h));
		h.type = (uint16_t)type;
		h.a = a;
		e = send_message(fd, &h, NULL, 0, NULL, 0, 0);
		if (e == 0)
			e = recv_header(fd, rep, NULL, 0, &nf, 0);
		if (e != 0) {
			(void) close(fd);
			if (!fresh && attempt == 0) {
				cpool_forget(r);	/* stale pooled connections */
				continue;
			}
			return (seterr(EBADF));
		}
		if (rep->err != 0) {
			cpool_put(fd, r);
			return (seterr(rep->err));
		}
		if (rep->size > 0) {
			size_t k = rep->size > outlen ? outlen : rep->size;

			if (recv_all(fd, out, k, 0) != 0 ||
			    drain(fd, rep->size - k) != 0) {
				(void) close(fd);
				return (seterr(EBADF));
			}
		}
		cpool_put(fd, r);
		return (0);
	}
}

/* ------------------------------------------------------------------------ */
/* Server side: the dispatcher                                               */
/* ------------------------------------------------------------------------ */

static void
rearm(struct conn *c)
{
	struct epoll_event ev;

	ev.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT;
	ev.data.ptr = c;
	(void) epoll_ctl(rt.epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void
conn_close_locked(struct conn *c)
{
	(void) epoll_ctl(rt.epfd, EPOLL_CTL_DEL, c->fd, NULL);
	(void) close(c->fd);
	if (c->prev != NULL)
		c->prev->next = c->next;
	else
		rt.conns = c->next;
	if (c->next != NULL)
		c->next->prev = c->prev;
	if (c->fds != NULL) {
		close_fds(c->fds, c->nfds);
		free(c->fds);
	}
	free(c);
}

static void
conn_close(struct conn *c)
{
	pthread_mutex_lock(&G);
	conn_close_locked(c);
	pthread_mutex_unlock(&G);
}

/* Finish with a connection whose reply has been sent (or failed). */
static void
conn_done(struct conn *c, int send_failed)
{
	pthread_mutex_lock(&G);
	if (send_failed)
		conn_close_locked(c);
	else
		rearm(c);
	pthread_mutex_unlock(&G);
}

static void
accept_all(void *item)
{
	int kind = *(int *)item;
	struct door *d;
	struct attach *a = NULL;
	int lfd;

	pthread_mutex_lock(&G);
	if (kind == K_DOOR) {
		d = item;
		lfd = d->lfd;
	} else {
		a = item;
		d = a->door;
		lfd = a->lfd;		/* -1 once fdetach()ed */
	}
	while (lfd >= 0) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		struct ucred uc;
		socklen_t ul = sizeof (uc);
		struct conn *c;
		struct epoll_event ev;

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			break;		/* EAGAIN, or out of fds: retry later */
		}
		if ((c = calloc(1, sizeof (*c))) == NULL) {
			(void) close(fd);
			continue;
		}
		c->kind = K_CONN;
		c->fd = fd;
		c->door = d;
		c->via = a;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &ul) == 0) {
			c->pid = uc.pid;
			c->euid = uc.uid;
			c->egid = uc.gid;
		} else {
			c->pid = -1;
			c->euid = (uid_t)-1;
			c->egid = (gid_t)-1;
		}
		c->next = rt.conns;
		if (rt.conns != NULL)
			rt.conns->prev = c;
		rt.conns = c;
		ev.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT;
		ev.data.ptr = c;
		if (epoll_ctl(rt.epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
			conn_close_locked(c);
	}
	pthread_mutex_unlock(&G);
}

static int detach_locked(struct attach *a);

/*
 * Take the call whose token is `token` (made by process `pid`) off the queue
 * of calls waiting for a server thread.  NULL if no longer queued.  G held.
 */
static struct conn *
unqueue_locked(struct pool *p, uint64_t token, pid_t pid)
{
	struct conn **pp = &p->pend_head, *prev = NULL;

	for (; *pp != NULL; prev = *pp, pp = &(*pp)->qnext) {
		struct conn *c = *pp;

		if (c->req.b == token && c->pid == pid) {
			*pp = c->qnext;
			if (p->pend_tail == c)
				p->pend_tail = prev;
			c->qnext = NULL;
			return (c);
		}
	}
	return (NULL);
}

/* Answer a call that never reached a server thread with `err`. */
static void
fail_queued(struct conn *c, int err)
{
	if (c->fds != NULL) {
		close_fds(c->fds, c->nfds);
		free(c->fds);
		c->fds = NULL;
		c->nfds = 0;
	}
	if (drain(c->fd, c->req.size) != 0 || send_error(c->fd, err) != 0)
		conn_close(c);
	else
		conn_done(c, 0);
}

static void
handle_conn(struct conn *c, uint32_t events)
{
	int fds[DOOR_MAX_DESC];
	unsigned nfds = 0;
	struct dm_msg h, rep;
	int e, err = 0;

	if (events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)) {
		conn_close(c);		/* client went away */
		return;
	}
	e = recv_header(c->fd, &h, fds, DOOR_MAX_DESC, &nfds, 0);
	if (e == -EMFILE && h.type == M_CALL) {
		/* server out of descriptors: door_insert() fails in
		 * door_server_dispatch() (door_sys.c) -> EMFILE */
		err = EMFILE;
	} else if (e != 0) {
		conn_close(c);
		return;
	}
	memset(&rep, 0, sizeof (rep));
	rep.type = M_REPLY;

	switch (h.type) {
	case M_CALL: {
		struct door *d = c->door;

		pthread_mutex_lock(&G);
		/* door_call(): DOOR_INVALID, then door_check_limits() */
		if (err != 0)
			;
		else if (d->revoked || (c->via != NULL && c->via->lfd < 0))
			err = EBADF;
		else if (h.size < d->data_min || h.size > d->data_max)
			err = ENOBUFS;
		else if (h.ndesc > 0 && (d->attrs & DOOR_REFUSE_DESC))
			err = ENOTSUP;
		else if (h.ndesc > d->desc_max)
			err = ENFILE;
		if (err == 0) {
			struct pool *p = door_pool(d);
			struct sthread *t;

			c->req = h;
			c->nfds = nfds;
			c->fds = NULL;
			if (nfds > 0) {
				c->fds = malloc(nfds * sizeof (int));
				if (c->fds == NULL) {
					err = ENOMEM;
					goto refuse;
				}
				memcpy(c->fds, fds, nfds * sizeof (int));
			}
			if ((t = p->free_top) != NULL) {
				/* door_get_server(): take the head */
				p->free_top = t->next_free;
				p->nfree--;
				t->next_free = NULL;
				t->job = c;
				t->job_deplete = (p->free_top == NULL);
				pthread_cond_signal(&t->cv);
			} else {
				c->qnext = NULL;
				if (p->pend_tail != NULL)
					p->pend_tail->qnext = c;
				else
					p->pend_head = c;
				p->pend_tail = c;
			}
			pthread_mutex_unlock(&G);
			return;
		}
refuse:
		pthread_mutex_unlock(&G);
		close_fds(fds, nfds);
		if (drain(c->fd, h.size) != 0 || send_error(c->fd, err) != 0)
			conn_close(c);
		else
			conn_done(c, 0);
		return;
	}
	case M_INFO: {
		/* door_info() in door_sys.c (EBADF: model, see the top) */
		door_info_t di;

		memset(&di, 0, sizeof (di));
		pthread_mutex_lock(&G);
		if (c->via != NULL && c->via->lfd < 0)
			rep.err = EBADF;
		else
			fill_info_locked(c->door, &di, c->pid);
		pthread_mutex_unlock(&G);
		e = send_message(c->fd, &rep, &di, rep.err ? 0 : sizeof (di),
		    NULL, 0, 0);
		conn_done(c, e != 0);
		return;
	}
	case M_GETPARAM: {
		/* door_getparam_common(): EINVAL for an unknown param */
		struct door *d = c->door;

		pthread_mutex_lock(&G);
		switch (h.a) {
		case DOOR_PARAM_DESC_MAX:
			rep.b = d->desc_max;
			break;
		case DOOR_PARAM_DATA_MAX:
			rep.b = d->data_max;
			break;
		case DOOR_PARAM_DATA_MIN:
			rep.b = d->data_min;
			break;
		default:
			rep.err = EINVAL;
		}
		if (c->via != NULL && c->via->lfd < 0)
			rep.err = EBADF;
		pthread_mutex_unlock(&G);
		e = send_message(c->fd, &rep, NULL, 0, NULL, 0, 0);
		conn_done(c, e != 0);
		return;
	}
	case M_CANCEL: {
		/*
		 * A door_call() interrupted by a signal.  door_call() in
		 * door_sys.c: while no server thread is free, the caller
		 * sleeps in door_get_server() (cv_wait_sig_swap_core); a
		 * signal there makes door_get_server() return NULL and the
		 * call fail with EAGAIN: nothing reached the server.  Once a
		 * thread has the call the caller gets EINTR instead.
		 */
		struct conn *victim;

		pthread_mutex_lock(&G);
		victim = unqueue_locked(door_pool(c->door), h.a, c->pid);
		pthread_mutex_unlock(&G);
		if (victim != NULL) {
			fail_queued(victim, EAGAIN);
			rep.b = 1;
		}
		e = send_message(c->fd, &rep, NULL, 0, NULL, 0, 0);
		conn_done(c, e != 0);
		return;
	}
	case M_DETACH:
		/*
		 * fdetach(3C) is umount2() of the namefs node: EINVAL if
		 * nothing is mounted there, and nm_unmount() in namevfs.c
		 * EPERM unless the caller owns it or is privileged
		 * (secpolicy_vnode_owner()).
		 */
		pthread_mutex_lock(&G);
		if (c->via == NULL || c->via->lfd < 0)
			rep.err = EINVAL;
		else if (c->euid != 0 && c->euid != c->via->owner)
			rep.err = EPERM;
		else
			rep.err = detach_locked(c->via);
		pthread_mutex_unlock(&G);
		e = send_message(c->fd, &rep, NULL, 0, NULL, 0, 0);
		conn_done(c, e != 0);
		return;
	default:
		close_fds(fds, nfds);
		conn_close(c);
		return;
	}
}

static void *
dispatcher(void *arg)
{
	int epfd = (int)(intptr_t)arg;
	struct epoll_event evs[64];

	for (;;) {
		int n = epoll_wait(epfd, evs, 64, -1);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EBADF)	/* forked-away runtime */
				return (NULL);
			continue;
		}
		for (int i = 0; i < n; i++) {
			int kind = *(int *)evs[i].data.ptr;

			if (kind == K_DOOR || kind == K_ATTACH)
				accept_all(evs[i].data.ptr);
			else
				handle_conn(evs[i].data.ptr, evs[i].events);
		}
	}
	return (NULL);
}

static int
spawn_thread(void *(*fn)(void *), void *arg, size_t stack, int block_sigs)
{
	pthread_attr_t at;
	pthread_t tid;
	sigset_t all, old;
	int e;

	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	if (stack != 0)
		pthread_attr_setstacksize(&at, stack);
	if (block_sigs) {
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
	}
	e = pthread_create(&tid, &at, fn, arg);
	if (block_sigs)
		pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&at);
	return (e);
}

/* Start this process's epoll + dispatcher if needed.  G held. */
static int
runtime_locked(void)
{
	uint32_t nonce;

	if (rt.pid == getpid() && rt.epfd >= 0)
		return (0);
	if (getrandom(&nonce, sizeof (nonce), GRND_NONBLOCK) !=
	    (ssize_t)sizeof (nonce)) {
		struct timespec ts;

		clock_gettime(CLOCK_MONOTONIC, &ts);
		nonce = (uint32_t)(ts.tv_nsec ^ (ts.tv_sec << 20) ^ getpid());
	}
	rt.nonce = nonce;
	if ((rt.epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
		return (-1);
	if ((errno = spawn_thread(dispatcher, (void *)(intptr_t)rt.epfd,
	    256 * 1024, 1)) != 0) {
		(void) close(rt.epfd);
		rt.epfd = -1;
		return (-1);
	}
	rt.pid = getpid();
	return (0);
}

/* ------------------------------------------------------------------------ */
/* Server threads                                                            */
/* ------------------------------------------------------------------------ */

#define PARK_STACK	(256 * 1024)
#define ILL_MINSTACK	(8 * 1024)		/* illumos amd64 MINSTACK */
#define ILL_DEFSTACK	(2 * 1024 * 1024)	/* illumos amd64 DEFAULTSTACK */
#define ILL_PAGESIZE	4096
/*
 * find_stack() in usr/src/lib/libc/port/threads/thr.c: thr_create(NULL, 0,
 * ...) gets "DEFAULTSTACK - 2 * pagesize" = 2,088,960 bytes and, with no
 * guardsize asked for, no guard page of its own.
 */
#define ILL_STKSIZE	(ILL_DEFSTACK - 2 * ILL_PAGESIZE)
/* Above the modelled stack: glibc's TCB, static TLS and start_thread(). */
#define GLIBC_TOP	(128 * 1024)

/* ul_stktop of a default-creator thread (0 on other threads). */
static __thread uintptr_t tls_stack_top;
/* DOORMODEL_MAX_LWPS: see default_creator(); -1 = no limit. */
static long max_lwps = -1;
/* DOORMODEL_REPLY_FAULTS_ABOVE: see door_return(); -1 = never. */
static long reply_faults_above = -1;
/* Executable memory, seen when the model is preloaded: see mmap() below. */
static int wx_ever(uintptr_t addr);
static unsigned long wx_procedures;

static struct sthread *
self_get(void)
{
	struct sthread *s = tls_self;
	size_t pg = (size_t)sysconf(_SC_PAGESIZE);

	if (s != NULL)
		return (s);
	if ((s = calloc(1, sizeof (*s))) == NULL)
		return (NULL);
	pthread_cond_init(&s->cv, NULL);
	s->pool = &rt.gpool;
	s->park_len = PARK_STACK + pg;
	s->park_map = mmap(NULL, s->park_len, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (s->park_map == MAP_FAILED) {
		free(s);
		return (NULL);
	}
	(void) mprotect(s->park_map, pg, PROT_NONE);	/* guard page */
	s->park_top = ((uintptr_t)s->park_map + s->park_len - 64) &
	    ~(uintptr_t)15;
	pthread_mutex_lock(&G);
	rt.nthreads++;
	pthread_mutex_unlock(&G);
	tls_self = s;
	return (s);
}

/*
 * Fix the invocation base of this thread (its first door_return()) and the
 * space below it, following door_return() in door_calls.c: reserve 1/32 of
 * the stack (1 KiB if tiny, at most 64 KiB) and 512 bytes of slop.
 */
static void
init_stack(struct sthread *s, uintptr_t cfa)
{
	pthread_attr_t at;
	void *lo = NULL;
	size_t size = 0, avail, reserve;

	if (tls_stack_top != 0 && cfa > tls_stack_top + 1024) {
		/*
		 * A default-creator thread, laid out as on illumos:
		 * thr_stksegment() gives ss_sp = ul_stktop and ss_size =
		 * 2,088,960; door_return() in door_calls.c reserves
		 * ss_size / 32 (65,280: the stack is below DEFAULTSTACK)
		 * and 512 bytes of slop below ss_sp, where every invocation
		 * starts.  2,023,168 bytes are left for the request data,
		 * the descriptors and everything the procedure calls.
		 */
		s->reset_sp = tls_stack_top - 512;
		s->ssize = ILL_STKSIZE - ILL_STKSIZE / 32 - 512;
		return;
	}
	s->reset_sp = (cfa & ~(uintptr_t)15) - 512;
	if (pthread_getattr_np(pthread_self(), &at) == 0) {
		(void) pthread_attr_getstack(&at, &lo, &size);
		pthread_attr_destroy(&at);
	}
	if (lo == NULL || (uintptr_t)lo >= s->reset_sp) {
		s->ssize = 0;		/* unknown: no check, like illumos */
		return;
	}
	avail = s->reset_sp - (uintptr_t)lo;
	if (size < ILL_MINSTACK * 4)
		reserve = ILL_MINSTACK / 8;
	else if (size < ILL_DEFSTACK)
		reserve = size / 32;
	else
		reserve = ILL_DEFSTACK / 32;
	avail = avail > reserve ? avail - reserve : 0;
	s->ssize = avail < 1024 ? 0 : avail;
}

static void
release_descs(const door_desc_t *dp, uint_t n)
{
	for (uint_t i = 0; i < n; i++)
		if ((dp[i].d_attributes & DOOR_RELEASE) &&
		    (dp[i].d_attributes & DOOR_DESCRIPTOR))
			(void) close(dp[i].d_data.d_desc.d_descriptor);
}

static void park_main(void *arg) __attribute__((noreturn));
static void invoke_main(void *arg) __attribute__((noreturn));

/*
 * Runs on the thread's real stack at the invocation base: the part of
 * __door_return (door.s) after the kernel returns -- the depletion
 * callback, then the server procedure.  If the procedure returns, the
 * thread exits and the client gets EINTR.
 */
static void
invoke_main(void *arg)
{
	struct sthread *self = arg;
	struct door *d = self->door;
	struct conn *c;

	if (self->deplete) {
		door_server_func_t *f;
		door_info_t *dip = NULL;

		pthread_mutex_lock(&G);
		f = rt.creator;
		if (d->attrs & DOOR_PRIVATE) {
			dip = self->infop;
			fill_info_locked(d, dip, getpid());
		}
		pthread_mutex_unlock(&G);
		if (f != NULL)
			f(dip);
	}
	d->proc(d->cookie, self->argp, self->arg_size, self->dp, self->ndesc);

	/* The procedure returned: door_slam() -> the caller sees EINTR. */
	c = self->conn;
	self->conn = NULL;
	if (c != NULL)
		conn_done(c, send_error(c->fd, EINTR) != 0);
	pthread_mutex_lock(&G);
	rt.nthreads--;
	pthread_mutex_unlock(&G);
	tls_self = NULL;
	(void) munmap(self->park_map, self->park_len);
	pthread_cond_destroy(&self->cv);
	free(self);
	pthread_exit(NULL);
}

/*
 * Lay out the invocation on the real stack (door_layout()), read the request
 * data onto it, and jump to the procedure.  Returns only if the invocation
 * could not be started (the client has then been answered).
 */
static void
start_invocation(struct sthread *self, struct conn *c, int deplete)
{
	struct door *d = c->door;
	uint64_t size = c->req.size;
	uint_t n = c->nfds;
	size_t descsz = (size_t)n * sizeof (door_desc_t);
	int is_private = (d->attrs & DOOR_PRIVATE) != 0;
	uintptr_t base = self->reset_sp, descp, datap, infop, finalsp;
	int err = 0, revoked;

	pthread_mutex_lock(&G);
	revoked = d->revoked;
	pthread_mutex_unlock(&G);
	if (revoked) {
		err = EBADF;		/* door_call(): DOOR_INVALID() */
		goto refuse;
	}
	if (size >= SIZE_MAX - 65535 - descsz) {
		err = E2BIG;		/* door_layout(): overflow */
		goto refuse;
	}
	descp = (base - descsz) & ~(uintptr_t)15;
	datap = (descp - size) & ~(uintptr_t)15;
	infop = (is_private && deplete) ?
	    ((datap - sizeof (door_info_t)) & ~(uintptr_t)15) : datap;
	finalsp = (infop - 64) & ~(uintptr_t)15;  /* struct door_results */
	if (finalsp > base || (self->ssize != 0 && base - finalsp > self->ssize)) {
		err = E2BIG;		/* doesn't fit in stack */
		goto refuse;
	}
	if (size > 0 && recv_all(c->fd, (void *)datap, size, 0) != 0) {
		conn_close(c);		/* caller vanished mid-request */
		return;
	}
	for (uint_t i = 0; i < n; i++)
		describe_fd(c->fds[i], (door_desc_t *)descp + i);
	free(c->fds);
	c->fds = NULL;
	c->nfds = 0;

	self->conn = c;
	self->door = d;
	self->noresults = (c->req.flags & MF_NORESULTS) != 0;
	self->argp = size > 0 ? (char *)datap : NULL;
	self->arg_size = size;
	self->dp = n > 0 ? (door_desc_t *)descp : NULL;
	self->ndesc = n;
	self->deplete = deplete;
	self->infop = (door_info_t *)infop;
	dm_jump(self, finalsp, invoke_main);

refuse:
	if (c->fds != NULL) {
		close_fds(c->fds, c->nfds);
		free(c->fds);
		c->fds = NULL;
		c->nfds = 0;
	}
	if (drain(c->fd, size) != 0 || send_error(c->fd, err) != 0)
		conn_close(c);
	else
		conn_done(c, 0);
}

/*
 * Runs on the park stack: deliver the reply of the finished invocation (if
 * any), put the thread on its pool's free stack, wait for the next call and
 * start it.  Never returns.
 */
static void
park_main(void *arg)
{
	struct sthread *self = arg;
	struct conn *c = self->conn, *again = NULL;

	if (c != NULL) {
		int fds[DOOR_MAX_DESC];
		struct dm_msg h;

		for (uint_t i = 0; i < self->r_ndesc; i++)
			fds[i] = self->r_desc[i].d_data.d_desc.d_descriptor;
		memset(&h, 0, sizeof (h));
		h.type = M_REPLY;
		if (send_message(c->fd, &h, self->r_data, self->r_size, fds,
		    self->r_ndesc, 0) != 0)
			conn_close(c);	/* client gone: results discarded */
		else
			again = c;
		self->conn = NULL;
		self->door = NULL;
	}
	release_descs(self->r_desc, self->r_ndesc);

	pthread_mutex_lock(&G);
	for (;;) {
		struct pool *p = self->pool;
		struct conn *job;
		int deplete;

		if ((job = p->pend_head) != NULL) {
			/* a call was waiting: the pool is empty */
			if ((p->pend_head = job->qnext) == NULL)
				p->pend_tail = NULL;
			deplete = 1;
			if (again != NULL) {
				rearm(again);
				again = NULL;
			}
		} else {
			/*
			 * door_release_server(): push on the head.  Only then
			 * re-arm the connection just answered, so that the
			 * caller's next call finds this (hot) thread on top.
			 */
			self->next_free = p->free_top;
			p->free_top = self;
			p->nfree++;
			if (again != NULL) {
				rearm(again);
				again = NULL;
			}
			while (self->job == NULL)
				pthread_cond_wait(&self->cv, &G);
			job = self->job;
			self->job = NULL;
			deplete = self->job_deplete;
		}
		pthread_mutex_unlock(&G);
		start_invocation(self, job, deplete);	/* returns on refusal */
		pthread_mutex_lock(&G);
	}
}

/* ------------------------------------------------------------------------ */
/* The API                                                                   */
/* ------------------------------------------------------------------------ */

EXPORT int
door_return(char *data_ptr, size_t data_size, door_desc_t *desc_ptr,
    uint_t num_desc)
{
	struct sthread *self = self_get();

	if (self == NULL)
		return (seterr(EAGAIN));	/* model: no memory for it */
	if (self->reset_sp == 0)
		init_stack(self, (uintptr_t)__builtin_dwarf_cfa());
	/* door_results() in door_sys.c: copyin_nowatch() fails -> EFAULT */
	if (data_size != 0 && data_ptr == NULL)
		return (seterr(EFAULT));
	if (num_desc != 0 && desc_ptr == NULL)
		return (seterr(EFAULT));
	if (self->conn != NULL) {
		/*
		 * door_results(): failures leave the client blocked; E2BIG
		 * for results to a caller that takes none (d_noresults) or
		 * for more than door_max_desc descriptors, EINVAL for one
		 * that is not an open DOOR_DESCRIPTOR ("Only understand
		 * file descriptor results").
		 */
		if (self->noresults && (data_size != 0 || num_desc != 0))
			return (seterr(E2BIG));
		if (num_desc > DOOR_MAX_DESC)
			return (seterr(E2BIG));
		/*
		 * door_results() copies a reply of more than door_max_arg
		 * (16 KiB) that fits the caller's rbuf straight into the
		 * caller's address space (door_copy()); a fault there -- a
		 * caller's rbuf that is not writable -- fails door_return()
		 * with EFAULT, back to the server, the caller still waiting.
		 * The model cannot see the caller's memory:
		 * DOORMODEL_REPLY_FAULTS_ABOVE=N makes every such reply over
		 * N bytes fault.
		 */
		if (reply_faults_above >= 0 && !self->noresults &&
		    data_size > 16 * 1024 &&
		    data_size > (size_t)reply_faults_above)
			return (seterr(EFAULT));
		for (uint_t i = 0; i < num_desc; i++) {
			if (!(desc_ptr[i].d_attributes & DOOR_DESCRIPTOR) ||
			    fcntl(desc_ptr[i].d_data.d_desc.d_descriptor,
			    F_GETFD) < 0) {
				release_descs(desc_ptr, num_desc);
				return (seterr(EINVAL));
			}
		}
	}
	if (self->conn != NULL && num_desc > 0) {
		/*
		 * door_results(): "if (!ufcanalloc(ttoproc(caller),
		 * desc_num)) return (EMFILE)" -- before any descriptor is
		 * released.  door_return() hands that error back to the
		 * SERVER, whose DOOR_RELEASE descriptors stay open, and the
		 * caller keeps waiting for a door_return that works.
		 */
		struct dm_msg ask, ans;
		unsigned nf;

		memset(&ask, 0, sizeof (ask));
		ask.type = M_ASKFDS;
		ask.a = num_desc;
		if (send_message(self->conn->fd, &ask, NULL, 0, NULL, 0, 0) != 0 ||
		    recv_header(self->conn->fd, &ans, NULL, 0, &nf, 0) != 0 ||
		    ans.type != M_FDSOK) {
			/* the caller went away: release and park */
			conn_close(self->conn);
			self->conn = NULL;
		} else if (ans.a == 0) {
			return (seterr(EMFILE));
		}
	}
	self->r_data = data_ptr;
	self->r_size = data_size;
	self->r_desc = desc_ptr;
	self->r_ndesc = num_desc;
	dm_jump(self, self->park_top, park_main);
}

static void *
default_server_thread(void *arg)
{
	tls_stack_top = (uintptr_t)arg;
	(void) pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
	(void) door_return(NULL, 0, NULL, 0);
	return (NULL);
}

/*
 * thr_create(NULL, 0, ...) with libc's default stack: a mapping of
 * ILL_STKSIZE whose top is ul_stktop, plus room above it for glibc's own
 * thread data (illumos keeps its ulwp_t elsewhere).  The model puts one
 * PROT_NONE page below, so that running off the stack faults at once; on
 * illumos nothing does, and the overflow silently writes into whatever is
 * mapped below.  The mapping is never unmapped (a door thread exits only
 * when its procedure returns).
 */
static int
spawn_default_thread(void)
{
	size_t len = ILL_PAGESIZE + ILL_STKSIZE + GLIBC_TOP;
	char *map = mmap(NULL, len, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
	pthread_attr_t at;
	pthread_t tid;
	int e;

	if (map == MAP_FAILED)
		return (ENOMEM);
	(void) mprotect(map, ILL_PAGESIZE, PROT_NONE);
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstack(&at, map + ILL_PAGESIZE, ILL_STKSIZE + GLIBC_TOP);
	/* _thrp_create(): the new thread inherits the creator's signal mask */
	e = pthread_create(&tid, &at, default_server_thread,
	    map + ILL_PAGESIZE + ILL_STKSIZE);
	pthread_attr_destroy(&at);
	if (e != 0)
		(void) munmap(map, len);
	return (e);
}

/*
 * door_create_server() in door_calls.c: thr_create() and yield(); a
 * failure is ignored.  DOORMODEL_MAX_LWPS=N makes thr_create() fail (as
 * EAGAIN does under a zone's zone.max-lwps resource control) once N
 * threads have been made: callers then wait for a busy thread to free up.
 */
static void
default_creator(door_info_t *dip)
{
	int refuse;

	(void) dip;
	pthread_mutex_lock(&G);
	refuse = max_lwps >= 0 && rt.ncreated >= (unsigned long)max_lwps;
	pthread_mutex_unlock(&G);
	if (!refuse && spawn_default_thread() == 0) {
		pthread_mutex_lock(&G);
		rt.ncreated++;
		pthread_mutex_unlock(&G);
	}
	(void) sched_yield();
}

EXPORT door_server_func_t *
door_server_create(door_server_func_t *create_proc)
{
	door_server_func_t *prev;

	pthread_mutex_lock(&G);
	prev = rt.creator;
	rt.creator = create_proc;
	pthread_mutex_unlock(&G);
	return (prev);
}

EXPORT int
door_create(door_server_procedure_t *proc, void *cookie, uint_t attributes)
{
	struct door *d;
	char name[96];
	int hfd, first = 0;
	struct epoll_event ev;
	door_server_func_t *f;
	door_info_t di;

	/*
	 * door_create() in usr/src/lib/libc/port/threads/door_calls.c
	 * rejects DOOR_NO_DEPLETION_CB; door_create() in door_sys.c the
	 * rest: unknown attributes, or DOOR_UNREF with DOOR_UNREF_MULTI.
	 */
	if ((attributes & ~DOOR_CREATE_MASK) ||
	    (attributes & (DOOR_UNREF | DOOR_UNREF_MULTI)) ==
	    (DOOR_UNREF | DOOR_UNREF_MULTI))
		return (seterr(EINVAL));
	if ((d = calloc(1, sizeof (*d))) == NULL)
		return (seterr(ENOMEM));
	if (wx_ever((uintptr_t)proc))
		__atomic_add_fetch(&wx_procedures, 1, __ATOMIC_SEQ_CST);
	d->kind = K_DOOR;
	d->proc = proc;
	d->cookie = cookie;
	d->attrs = attributes;
	d->data_max = SIZE_MAX;
	d->data_min = 0;
	d->desc_max = (attributes & DOOR_REFUSE_DESC) ? 0 : INT_MAX;

	pthread_mutex_lock(&G);
	if (runtime_locked() != 0) {
		int e = errno;

		pthread_mutex_unlock(&G);
		free(d);
		return (seterr(e ? e : EAGAIN));
	}
	d->seq = ++rt.seq;
	d->id = door_uniquifier(rt.nonce, d->seq);
	(void) snprintf(name, sizeof (name), DM_PREFIX "d/%d/%x/%llu/%x",
	    (int)getpid(), rt.nonce, (unsigned long long)d->seq, attributes);
	d->alen = make_addr(&d->addr, name);
	d->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (d->lfd < 0 ||
	    bind(d->lfd, (struct sockaddr *)&d->addr, d->alen) != 0 ||
	    listen(d->lfd, SOMAXCONN) != 0)
		goto fail;
	ev.events = EPOLLIN;
	ev.data.ptr = d;
	if (epoll_ctl(rt.epfd, EPOLL_CTL_ADD, d->lfd, &ev) != 0)
		goto fail;
	/* the handle: a connected socket, close-on-exec like a door fd */
	hfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (hfd < 0 || connect(hfd, (struct sockaddr *)&d->addr, d->alen) != 0) {
		int e = errno;

		if (hfd >= 0)
			(void) close(hfd);
		(void) epoll_ctl(rt.epfd, EPOLL_CTL_DEL, d->lfd, NULL);
		errno = e;
		goto fail;
	}
	d->next = rt.doors;
	rt.doors = d;
	if (!(attributes & DOOR_PRIVATE) && rt.first_pid != getpid()) {
		rt.first_pid = getpid();
		first = 1;
	}
	f = rt.creator;
	if (attributes & DOOR_PRIVATE)
		fill_info_locked(d, &di, getpid());
	pthread_mutex_unlock(&G);

	/* door_create_cmn(): the creator makes the first thread(s) */
	if (f != NULL) {
		if (attributes & DOOR_PRIVATE)
			f(&di);
		else if (first)
			f(NULL);
	}
	return (hfd);

fail:
	{
		int e = errno;

		if (d->lfd >= 0)
			(void) close(d->lfd);
		pthread_mutex_unlock(&G);
		free(d);
		return (seterr(e));
	}
}

/*
 * Could this process take n more descriptors?  door_results() asks
 * ufcanalloc() of the caller before it moves any.
 */
static int
can_take_fds(int fd, unsigned n)
{
	int tmp[DOOR_MAX_DESC];
	unsigned k;
	int ok = 1;

	if (n > DOOR_MAX_DESC)
		return (0);
	for (k = 0; k < n; k++) {
		if ((tmp[k] = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) {
			ok = 0;
			break;
		}
	}
	close_fds(tmp, k);
	return (ok);
}

static uint32_t call_seq;
static unsigned long calls_started, calls_waiting;	/* doormodel_calls() */
static int gate_armed;					/* doormodel_hold_next_call() */
static void gate_hold(int d);
static unsigned long noverflow;	/* doormodel_overflows() */

/*
 * Ask the server's dispatcher to take the call `token` off its queue.  1 if
 * it did (the call never reached a server thread), 0 if a thread has it --
 * or if the dispatcher does not answer within a second (a stopped or dying
 * server): the kernel would know, the model then says the call may have run.
 * Signals (a watchdog repeating its interrupt) do not stretch the wait.
 */
static int
cancel_call(const struct dref *r, uint64_t token)
{
	struct timespec deadline, now;
	struct dm_msg h, rep;
	unsigned nf;
	int fd, done = 0;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += 1;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return (0);
	while (connect(fd, (const struct sockaddr *)&r->addr, r->alen) != 0) {
		if (errno != EINTR) {
			(void) close(fd);
			return (0);
		}
	}
	memset(&h, 0, sizeof (h));
	h.type = M_CANCEL;
	h.a = token;
	if (send_message(fd, &h, NULL, 0, NULL, 0, 0) != 0) {
		(void) close(fd);
		return (0);
	}
	for (;;) {
		struct pollfd p = { fd, POLLIN, 0 };
		long ms;

		clock_gettime(CLOCK_MONOTONIC, &now);
		ms = (deadline.tv_sec - now.tv_sec) * 1000 +
		    (deadline.tv_nsec - now.tv_nsec) / 1000000;
		if (ms <= 0)
			break;
		int n = poll(&p, 1, (int)ms);

		if (n > 0) {
			done = recv_header(fd, &rep, NULL, 0, &nf, 0) == 0 &&
			    rep.type == M_REPLY && rep.err == 0 && rep.b == 1;
			break;
		}
		if (n == 0 || errno != EINTR)
			break;
	}
	(void) close(fd);
	return (done);
}

EXPORT int
door_call(int d, door_arg_t *params)
{
	struct dref r;
	door_arg_t a;
	int noresults = 0, fd = -1, fresh, e;
	int sfds[64], *fds = sfds, rfds[DOOR_MAX_DESC];
	unsigned nr = 0;
	struct dm_msg h, rh;
	char *buf = NULL;
	size_t maplen = 0;

	__atomic_add_fetch(&calls_started, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&gate_armed, __ATOMIC_SEQ_CST))
		gate_hold(d);
	if (door_ref(d, &r) != 0)
		return (-1);
	if (params != NULL) {
		a = *params;
	} else {
		memset(&a, 0, sizeof (a));
		noresults = 1;
	}
	/* door_args(): copyin() of the arguments fails -> EFAULT */
	if ((a.data_size != 0 && a.data_ptr == NULL) ||
	    (a.desc_num != 0 && a.desc_ptr == NULL))
		return (seterr(EFAULT));
	if (a.desc_num > DOOR_MAX_DESC)
		return (seterr(E2BIG));		/* door_args() */
	if (a.desc_num > 64 &&
	    (fds = malloc(a.desc_num * sizeof (int))) == NULL)
		return (seterr(ENOMEM));
	/* door_translate_in(): EINVAL for a descriptor it cannot getf() */
	for (uint_t i = 0; i < a.desc_num; i++) {
		fds[i] = a.desc_ptr[i].d_data.d_desc.d_descriptor;
		if (!(a.desc_ptr[i].d_attributes & DOOR_DESCRIPTOR) ||
		    fcntl(fds[i], F_GETFD) < 0) {
			release_descs(a.desc_ptr, a.desc_num);
			e = EINVAL;
			goto out;
		}
	}

	memset(&h, 0, sizeof (h));
	h.type = M_CALL;
	h.flags = noresults ? MF_NORESULTS : 0;
	h.b = ((uint64_t)(uint32_t)getpid() << 32) |
	    __atomic_add_fetch(&call_seq, 1, __ATOMIC_RELAXED);	/* M_CANCEL */
	for (int attempt = 0; ; attempt++) {
		if ((fd = cpool_get(&r, &fresh)) < 0) {
			e = EBADF;	/* revoked door's server gone, or no door */
			goto out;
		}
		e = send_message(fd, &h, a.data_ptr, a.data_size, fds,
		    a.desc_num, 1);
		if (e == 0)
			break;
		(void) close(fd);
		fd = -1;
		if (e == -EINTR) {
			e = EINTR;
			goto out;
		}
		if (!fresh && attempt == 0) {
			/* a stale pooled connection (server gone): reconnect */
			cpool_forget(&r);
			continue;
		}
		e = EBADF;
		goto out;
	}
	release_descs(a.desc_ptr, a.desc_num);	/* passed: DOOR_RELEASE */

	__atomic_add_fetch(&calls_waiting, 1, __ATOMIC_SEQ_CST);
	e = recv_header(fd, &rh, rfds, DOOR_MAX_DESC, &nr, 1);
	while (e == 0 && rh.type == M_ASKFDS) {
		/* door_results(): can we take the descriptors? */
		struct dm_msg ok;

		memset(&ok, 0, sizeof (ok));
		ok.type = M_FDSOK;
		ok.a = (uint64_t)can_take_fds(fd, (unsigned)rh.a);
		if ((e = send_message(fd, &ok, NULL, 0, NULL, 0, 0)) == 0)
			e = recv_header(fd, &rh, rfds, DOOR_MAX_DESC, &nr, 1);
	}
	__atomic_sub_fetch(&calls_waiting, 1, __ATOMIC_SEQ_CST);
	if (e == -EINTR) {
		/*
		 * A signal.  EAGAIN if the call was still waiting for a
		 * server thread (door_get_server() returned NULL), else
		 * EINTR: the caller detaches (the server's door_ucred()
		 * then fails with EINVAL and its results are discarded).
		 */
		(void) close(fd);
		fd = -1;
		e = cancel_call(&r, h.b) ? EAGAIN : EINTR;
		goto out;
	}
	if (e != 0 && e != -EMFILE) {
		/* signal, or the server died during the invocation */
		(void) close(fd);
		fd = -1;
		e = EINTR;
		goto out;
	}
	if (e == -EMFILE) {
		/* door_call(): door_insert() of a returned descriptor fails */
		(void) close(fd);	/* lost descriptors: give up the reply */
		fd = -1;
		e = EMFILE;
		goto out;
	}
	if (rh.type != M_REPLY) {
		(void) close(fd);
		fd = -1;
		e = EINTR;
		goto out;
	}
	if (rh.err != 0) {
		e = rh.err;
		goto out;
	}
	if (noresults) {
		close_fds(rfds, nr);
		if (drain(fd, rh.size) != 0) {
			(void) close(fd);
			fd = -1;
		}
		e = 0;
		goto out;
	}

	/* door_results()/door_overflow(): place the results */
	{
		size_t dsize = (size_t)nr * sizeof (door_desc_t);
		size_t rlen = dsize ? (size_t)((rh.size + 23) / 24 * 24) :
		    (size_t)rh.size;
		size_t result_size = rlen + dsize;

		if (result_size == 0) {
			buf = a.rbuf;
		} else if (result_size <= a.rsize) {
			buf = a.rbuf;
		} else {
			size_t pg = (size_t)sysconf(_SC_PAGESIZE);

			/* door_overflow(): roundup(data_size + ds, PAGESIZE) */
			maplen = (rh.size + dsize + pg - 1) / pg * pg;
			__atomic_add_fetch(&noverflow, 1, __ATOMIC_RELAXED);
			buf = mmap(NULL, maplen, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (buf == MAP_FAILED) {
				buf = NULL;
				maplen = 0;
				close_fds(rfds, nr);
				if (drain(fd, rh.size) != 0) {
					(void) close(fd);
					fd = -1;
				}
				e = EOVERFLOW;
				goto out;
			}
		}
		if (rh.size > 0 && (e = recv_all(fd, buf, rh.size, 1)) != 0) {
			(void) close(fd);
			fd = -1;
			close_fds(rfds, nr);
			if (maplen != 0)
				(void) munmap(buf, maplen);
			e = EINTR;
			goto out;
		}
		if (maplen != 0 && rlen + dsize > maplen) {
			/*
			 * door_call() copies the descriptors out to
			 * rbuf + roundup(data_size, sizeof (door_desc_t)),
			 * which can end up to 23 bytes past the mapping
			 * door_overflow() sized without that padding: the
			 * copyout fails, the descriptors just received are
			 * closed (door_fd_close) and the mapping is unmapped.
			 */
			close_fds(rfds, nr);
			(void) munmap(buf, maplen);
			e = EFAULT;
			goto out;
		}
		if (maplen != 0) {
			a.rbuf = buf;
			a.rsize = maplen;
		}
		a.data_size = rh.size;
		if (rh.size > 0)
			a.data_ptr = buf;
		a.desc_num = nr;
		if (nr > 0) {
			a.desc_ptr = (door_desc_t *)(buf + rlen);
			for (unsigned i = 0; i < nr; i++)
				describe_fd(rfds[i], a.desc_ptr + i);
		}
		*params = a;
		e = 0;
	}
out:
	if (fd >= 0)
		cpool_put(fd, &r);
	if (fds != sfds)
		free(fds);
	if (e != 0)
		return (seterr(e));
	return (0);
}

/* door_info of a door served by another process (EBADF if none). */
static int
remote_info(const struct dref *r, door_info_t *info)
{
	struct dm_msg rep;

	memset(info, 0, sizeof (*info));
	return (rpc(r, M_INFO, 0, &rep, info, sizeof (*info)));
}

EXPORT int
door_info(int d, door_info_t *info)
{
	struct dref r;
	struct door *door;

	/*
	 * door_info() in door_sys.c: EBADF for a thread not bound to a door
	 * (DOOR_QUERY) or a descriptor that is not a door, EFAULT when the
	 * copyout fails; door_info_common() fills it in.
	 */
	if (info == NULL)
		return (seterr(EFAULT));
	if (d == DOOR_QUERY) {
		struct sthread *self = tls_self;

		pthread_mutex_lock(&G);
		if (self == NULL || self->bound == NULL) {
			pthread_mutex_unlock(&G);
			return (seterr(EBADF));
		}
		fill_info_locked(self->bound, info, getpid());
		pthread_mutex_unlock(&G);
		return (0);
	}
	if (door_ref(d, &r) != 0)
		return (-1);
	pthread_mutex_lock(&G);
	if ((door = local_door_locked(&r)) != NULL) {
		fill_info_locked(door, info, getpid());
		pthread_mutex_unlock(&G);
		return (0);
	}
	pthread_mutex_unlock(&G);
	return (remote_info(&r, info));
}

EXPORT int
door_revoke(int d)
{
	struct dref r;
	struct door *door;
	struct conn *victims = NULL;

	if (door_ref(d, &r) != 0)
		return (-1);
	pthread_mutex_lock(&G);
	if ((door = local_door_locked(&r)) == NULL) {
		door_info_t di;

		pthread_mutex_unlock(&G);
		/*
		 * door_revoke() in door_sys.c: EBADF from door_lookup(),
		 * EPERM for a door of another process (door_target)
		 */
		if (remote_info(&r, &di) != 0)
			return (seterr(EBADF));
		return (seterr(EPERM));
	}
	door->revoked = 1;
	/* calls still waiting for a server thread fail with EBADF */
	{
		struct pool *p = door_pool(door);
		struct conn **pp = &p->pend_head, *prev = NULL;

		while (*pp != NULL) {
			struct conn *c = *pp;

			if (c->door == door) {
				*pp = c->qnext;
				c->qnext = victims;
				victims = c;
			} else {
				prev = c;
				pp = &c->qnext;
			}
		}
		p->pend_tail = prev;
	}
	pthread_mutex_unlock(&G);
	while (victims != NULL) {
		struct conn *c = victims;

		victims = c->qnext;
		fail_queued(c, EBADF);
	}
	(void) close(d);	/* door_revoke() invalidates the descriptor */
	return (0);
}

/*
 * Has the caller of this invocation detached?  door_call() clears the
 * server's d_caller when a signal interrupts a caller whose call a server
 * thread already has (with DOOR_NO_CANCEL no SIGCANCEL is sent either); in
 * the model the caller then closes its connection.
 */
static int
caller_detached(const struct conn *c)
{
	struct pollfd p;

	p.fd = c->fd;
	p.events = POLLRDHUP;
	p.revents = 0;
	return (poll(&p, 1, 0) > 0 &&
	    (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0);
}

struct ucred_s {
	uint32_t	magic;
	uid_t		euid;
	gid_t		egid;
	pid_t		pid;
};
#define UC_MAGIC 0x55435244u

EXPORT int
door_ucred(ucred_t **uc)
{
	struct sthread *self = tls_self;
	struct ucred_s *u;

	if (uc == NULL)
		return (seterr(EFAULT));
	/* door_ucred() in door_sys.c: EINVAL when st->d_caller == NULL */
	if (self == NULL || self->conn == NULL || caller_detached(self->conn))
		return (seterr(EINVAL));	/* no caller for this thread */
	if ((u = *uc) == NULL && (u = malloc(sizeof (*u))) == NULL)
		return (seterr(ENOMEM));
	u->magic = UC_MAGIC;
	u->euid = self->conn->euid;
	u->egid = self->conn->egid;
	u->pid = self->conn->pid;
	*uc = u;
	return (0);
}

/* door_cred() in door_calls.c: __door_ucred(), so door_ucred()'s errors */
EXPORT int
door_cred(door_cred_t *dc)
{
	struct sthread *self = tls_self;

	if (dc == NULL)
		return (seterr(EFAULT));
	if (self == NULL || self->conn == NULL || caller_detached(self->conn))
		return (seterr(EINVAL));
	memset(dc, 0, sizeof (*dc));
	dc->dc_euid = dc->dc_ruid = self->conn->euid;
	dc->dc_egid = dc->dc_rgid = self->conn->egid;
	dc->dc_pid = self->conn->pid;
	return (0);
}

EXPORT uid_t
ucred_geteuid(const ucred_t *uc)
{
	if (uc == NULL || uc->magic != UC_MAGIC) {
		errno = EINVAL;
		return ((uid_t)-1);
	}
	return (uc->euid);
}

EXPORT gid_t
ucred_getegid(const ucred_t *uc)
{
	if (uc == NULL || uc->magic != UC_MAGIC) {
		errno = EINVAL;
		return ((gid_t)-1);
	}
	return (uc->egid);
}

EXPORT pid_t
ucred_getpid(const ucred_t *uc)
{
	if (uc == NULL || uc->magic != UC_MAGIC) {
		errno = EINVAL;
		return ((pid_t)-1);
	}
	return (uc->pid);
}

EXPORT void
ucred_free(ucred_t *uc)
{
	if (uc != NULL) {
		uc->magic = 0;
		free(uc);
	}
}

EXPORT int
door_bind(int d)
{
	struct dref r;
	struct door *door;
	struct sthread *self;

	if (door_ref(d, &r) != 0)
		return (-1);
	if ((self = self_get()) == NULL)
		return (seterr(EAGAIN));	/* model: no memory for it */
	/*
	 * door_bind() in door_sys.c: EBADF from door_lookup(), EINVAL for a
	 * door that is not DOOR_PRIVATE or not this process's
	 */
	pthread_mutex_lock(&G);
	door = local_door_locked(&r);
	if (door == NULL || !(door->attrs & DOOR_PRIVATE)) {
		pthread_mutex_unlock(&G);
		return (seterr(EINVAL));	/* not private, or not ours */
	}
	self->bound = door;
	self->pool = &door->priv;
	pthread_mutex_unlock(&G);
	return (0);
}

EXPORT int
door_unbind(void)
{
	struct sthread *self = tls_self;

	/* door_unbind() in door_sys.c: EBADF for a thread not bound */
	pthread_mutex_lock(&G);
	if (self == NULL || self->bound == NULL) {
		pthread_mutex_unlock(&G);
		return (seterr(EBADF));
	}
	self->bound = NULL;
	self->pool = &rt.gpool;
	pthread_mutex_unlock(&G);
	return (0);
}

EXPORT int
door_getparam(int d, int type, size_t *out)
{
	struct dref r;
	struct door *door;
	struct dm_msg rep;

	/*
	 * door_getparam() in door_sys.c: EBADF from door_lookup(), EINVAL
	 * from door_getparam_common() for an unknown parameter, EFAULT when
	 * the copyout fails
	 */
	if (out == NULL)
		return (seterr(EFAULT));
	if (door_ref(d, &r) != 0)
		return (-1);
	pthread_mutex_lock(&G);
	if ((door = local_door_locked(&r)) != NULL) {
		int err = 0;

		switch (type) {
		case DOOR_PARAM_DESC_MAX:
			*out = door->desc_max;
			break;
		case DOOR_PARAM_DATA_MAX:
			*out = door->data_max;
			break;
		case DOOR_PARAM_DATA_MIN:
			*out = door->data_min;
			break;
		default:
			err = EINVAL;
		}
		pthread_mutex_unlock(&G);
		return (err ? seterr(err) : 0);
	}
	pthread_mutex_unlock(&G);
	if (rpc(&r, M_GETPARAM, (uint64_t)(unsigned)type, &rep, NULL, 0) != 0)
		return (-1);
	*out = (size_t)rep.b;
	return (0);
}

/*
 * door_setparam_common() in door_sys.c: EBADF (DOOR_INVALID), EPERM (a door
 * of another process), ERANGE, ENOTSUP (DOOR_REFUSE_DESC), EINVAL
 */
EXPORT int
door_setparam(int d, int type, size_t val)
{
	struct dref r;
	struct door *door;
	int err = 0;

	if (door_ref(d, &r) != 0)
		return (-1);
	pthread_mutex_lock(&G);
	if ((door = local_door_locked(&r)) == NULL) {
		door_info_t di;

		pthread_mutex_unlock(&G);
		/* DOOR_INVALID() first, then "not served by this process" */
		if (remote_info(&r, &di) != 0 || (di.di_attributes & DOOR_REVOKED))
			return (seterr(EBADF));
		return (seterr(EPERM));
	}
	if (door->revoked) {
		err = EBADF;
	} else {
		switch (type) {
		case DOOR_PARAM_DESC_MAX:
			if (val > INT_MAX)
				err = ERANGE;
			else if ((door->attrs & DOOR_REFUSE_DESC) && val != 0)
				err = ENOTSUP;
			else
				door->desc_max = val;
			break;
		case DOOR_PARAM_DATA_MIN:
			if (val > door->data_max)
				err = EINVAL;
			else
				door->data_min = val;
			break;
		case DOOR_PARAM_DATA_MAX:
			if (val < door->data_min)
				err = EINVAL;
			else
				door->data_max = val;
			break;
		default:
			err = EINVAL;
		}
	}
	pthread_mutex_unlock(&G);
	return (err ? seterr(err) : 0);
}

EXPORT int
fattach(int fildes, const char *path)
{
	struct dref r;
	struct door *door;
	struct attach *a;
	struct stat st;
	struct epoll_event ev;
	char name[96];
	struct sockaddr_un sa;
	socklen_t alen;
	int lfd;

	/*
	 * fattach(3C) mounts namefs on path; nm_mount() in namevfs.c: EBADF
	 * (getf() of the descriptor fails), EINVAL for a descriptor that is
	 * neither a door nor a stream, EPERM unless the caller owns the path
	 * (secpolicy_vnode_owner()), EACCES without write permission on it
	 * (secpolicy_vnode_access2(..., VWRITE)), EBUSY below.
	 */
	if (fcntl(fildes, F_GETFD) < 0)
		return (seterr(EBADF));
	if (path == NULL)
		return (seterr(EFAULT));
	if (door_ref(fildes, &r) != 0)
		return (seterr(EINVAL));	/* not a door */
	if (stat(path, &st) != 0)
		return (-1);			/* ENOENT, ENOTDIR, ... */
	if (geteuid() != 0) {
		if (geteuid() != st.st_uid)
			return (seterr(EPERM));
		if (faccessat(AT_FDCWD, path, W_OK, AT_EACCESS) != 0)
			return (seterr(EACCES));
	}
	/*
	 * nm_mount() in namevfs.c: EBUSY if the node is already namefs-mounted
	 * ((mvp->v_flag & VROOT) || vfs_matchops(mvp->v_vfsp, namefs_vfsops)),
	 * stale or not: only fifo_close() unmounts by itself (nm_unmountall()).
	 */
	if (getxattr(path, STALE_XATTR, NULL, 0) >= 0)
		return (seterr(EBUSY));
	if ((a = calloc(1, sizeof (*a))) == NULL)
		return (seterr(ENOMEM));
	attach_name(name, sizeof (name), st.st_dev, st.st_ino);
	alen = make_addr(&sa, name);

	pthread_mutex_lock(&G);
	if ((door = local_door_locked(&r)) == NULL) {
		pthread_mutex_unlock(&G);
		free(a);
		return (seterr(EINVAL));	/* model: only our own doors */
	}
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (lfd < 0) {
		int e = errno;

		pthread_mutex_unlock(&G);
		free(a);
		return (seterr(e));
	}
	if (bind(lfd, (struct sockaddr *)&sa, alen) != 0 ||
	    listen(lfd, SOMAXCONN) != 0) {
		int e = errno == EADDRINUSE ? EBUSY : errno;

		(void) close(lfd);
		pthread_mutex_unlock(&G);
		free(a);
		return (seterr(e));
	}
	a->kind = K_ATTACH;
	a->lfd = lfd;
	a->door = door;
	a->dev = st.st_dev;
	a->ino = st.st_ino;
	a->owner = st.st_uid;
	ev.events = EPOLLIN;
	ev.data.ptr = a;
	if (epoll_ctl(rt.epfd, EPOLL_CTL_ADD, lfd, &ev) != 0) {
		int e = errno;

		(void) close(lfd);
		pthread_mutex_unlock(&G);
		free(a);
		return (seterr(e));
	}
	a->next = rt.attaches;
	rt.attaches = a;
	a->path = strdup(path);
	pthread_mutex_unlock(&G);
	{
		char pid[16];
		int n = snprintf(pid, sizeof (pid), "%d", (int)getpid());

		(void) setxattr(path, STALE_XATTR, pid, (size_t)n, 0);
	}
	return (0);
}

/* G held.  The attach struct stays (connections may point at it). */
static int
detach_locked(struct attach *a)
{
	if (a->lfd < 0)
		return (EINVAL);
	(void) epoll_ctl(rt.epfd, EPOLL_CTL_DEL, a->lfd, NULL);
	(void) close(a->lfd);
	a->lfd = -1;
	if (a->path != NULL)
		(void) removexattr(a->path, STALE_XATTR);
	return (0);
}

EXPORT int
fdetach(const char *path)
{
	struct stat st;
	struct dref r;
	struct dm_msg rep;
	char name[96];

	/* umount2() of the namefs node: nm_unmount() in namevfs.c, EPERM */
	if (path == NULL)
		return (seterr(EFAULT));
	if (stat(path, &st) != 0)
		return (-1);
	if (geteuid() != 0 && geteuid() != st.st_uid)
		return (seterr(EPERM));
	memset(&r, 0, sizeof (r));
	r.kind = 'a';
	r.dev = st.st_dev;
	r.ino = st.st_ino;
	attach_name(name, sizeof (name), st.st_dev, st.st_ino);
	r.alen = make_addr(&r.addr, name);

	pthread_mutex_lock(&G);
	if (rt.pid == getpid()) {
		for (struct attach *a = rt.attaches; a != NULL; a = a->next) {
			if (a->lfd >= 0 && a->dev == st.st_dev &&
			    a->ino == st.st_ino) {
				int err = detach_locked(a);

				pthread_mutex_unlock(&G);
				cpool_forget(&r);
				return (err ? seterr(err) : 0);
			}
		}
	}
	pthread_mutex_unlock(&G);
	/* attached by another process (or not at all: connect fails) */
	if (rpc(&r, M_DETACH, 0, &rep, NULL, 0) != 0) {
		if (errno != EBADF)
			return (-1);
		/* no live server: a stale attachment is unmounted, else EINVAL */
		if (removexattr(path, STALE_XATTR) == 0)
			return (0);
		return (seterr(EINVAL));
	}
	cpool_forget(&r);
	return (0);
}

/*
 * Test support (not illumos API): counts of server threads alive, threads
 * parked free in the process pool, threads made by the default creator,
 * and calls waiting for a thread in the process pool.
 */
EXPORT void
doormodel_stats(unsigned long out[4])
{
	unsigned long pend = 0;

	pthread_mutex_lock(&G);
	for (struct conn *c = rt.gpool.pend_head; c != NULL; c = c->qnext)
		pend++;
	out[0] = rt.nthreads;
	out[1] = rt.gpool.nfree;
	out[2] = rt.ncreated;
	out[3] = pend;
	pthread_mutex_unlock(&G);
}

/*
 * Test support: bytes of stack between the caller's frame and the low end
 * of a door server thread's stack (-1 elsewhere): what an application has
 * left to run in.
 */
EXPORT long
doormodel_stack_left(void)
{
	uintptr_t sp = (uintptr_t)__builtin_frame_address(0);

	if (tls_stack_top == 0 || sp > tls_stack_top ||
	    sp < tls_stack_top - ILL_STKSIZE)
		return (-1);
	return ((long)(sp - (tls_stack_top - ILL_STKSIZE)));
}

/* Test support: replies this process received in a mapping of their own. */
EXPORT unsigned long
doormodel_overflows(void)
{
	return (__atomic_load_n(&noverflow, __ATOMIC_RELAXED));
}

/*
 * Test support: door_call()s this process started, and how many of them are
 * blocked right now waiting for their results -- the wait a signal
 * interrupts (door_call() in usr/src/uts/common/fs/doorfs/door_sys.c sleeps
 * in cv_wait_sig_swap_core() until door_return() resumes it).  A test that
 * must deliver a signal into "the next call" waits for both to move.
 */
EXPORT void
doormodel_calls(unsigned long out[2])
{
	out[0] = __atomic_load_n(&calls_started, __ATOMIC_SEQ_CST);
	out[1] = __atomic_load_n(&calls_waiting, __ATOMIC_SEQ_CST);
}

/*
 * Test support: hold the next door_call() of this process at its entry,
 * before it looks at its descriptor.  On illumos the descriptor is resolved
 * only in the kernel (door_lookup() at the start of door_call() in
 * door_sys.c); until then it is a number the calling thread holds, and a
 * thread that closes that number meanwhile (and an open() that reuses it)
 * decides what the call reaches.  doormodel_hold_next_call() arms the gate,
 * doormodel_held_call() gives the descriptor of the call held there (-1
 * while none is), doormodel_release_call() lets it go on.  A held call goes
 * on by itself after 10 seconds, so that a failing test cannot hang.
 */
static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_fd = -1, gate_open;

static void
gate_hold(int d)
{
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += 10;
	pthread_mutex_lock(&gate_lock);
	if (gate_armed) {
		__atomic_store_n(&gate_armed, 0, __ATOMIC_SEQ_CST);
		gate_fd = d;
		pthread_cond_broadcast(&gate_cv);
		while (!gate_open && pthread_cond_timedwait(&gate_cv,
		    &gate_lock, &until) != ETIMEDOUT)
			continue;
		gate_fd = -1;
	}
	pthread_mutex_unlock(&gate_lock);
}

EXPORT void
doormodel_hold_next_call(void)
{
	pthread_mutex_lock(&gate_lock);
	gate_open = 0;
	__atomic_store_n(&gate_armed, 1, __ATOMIC_SEQ_CST);
	pthread_mutex_unlock(&gate_lock);
}

EXPORT int
doormodel_held_call(void)
{
	int fd;

	pthread_mutex_lock(&gate_lock);
	fd = gate_fd;
	pthread_mutex_unlock(&gate_lock);
	return (fd);
}

EXPORT void
doormodel_release_call(void)
{
	pthread_mutex_lock(&gate_lock);
	__atomic_store_n(&gate_armed, 0, __ATOMIC_SEQ_CST);
	gate_open = 1;
	pthread_cond_broadcast(&gate_cv);
	pthread_mutex_unlock(&gate_lock);
}

/* ------------------------------------------------------------------------ */
/* Executable memory: only when this library is LD_PRELOADed                */
/* ------------------------------------------------------------------------ */

/*
 * Preloaded, the model interposes mmap(), mprotect() and munmap() to see how
 * the process makes code executable.  Loaded with dlopen(), as doordown
 * loads it, these definitions are reached by nobody: libc's come first in
 * the global scope, for the model's own calls too.
 *
 *   - Every range ever mapped or mprotect()ed writable and executable at
 *     once is remembered until it is unmapped, and door_create() counts the
 *     doors whose server procedure lies in such a range
 *     (doormodel_wx_procedures()).  illumos itself allows it -- an anonymous
 *     segment's maxprot is PROT_ALL and segvn_setprot() in
 *     usr/src/uts/common/vm/seg_vn.c checks a protection only against
 *     maxprot -- so this is no door rule: it checks what doordown promises,
 *     that its trampoline page is never writable and executable together.
 *   - DOORMODEL_REFUSE_EXEC=1 makes a system whose policy refuses to make
 *     memory executable after the fact (SELinux's execmem, PaX MPROTECT):
 *     an anonymous mapping with PROT_EXEC, and any mprotect() that adds
 *     PROT_EXEC, fail with EACCES -- what mprotect(2) and mmap(2) return on
 *     illumos for a protection the segment may not have (segvn_setprot():
 *     "(svd->maxprot & prot) != prot" -> EACCES; smmap_common() in
 *     usr/src/uts/common/os/grow.c for mmap).
 */
#define WX_MAX	256
static struct { uintptr_t lo, hi; } wx_ranges[WX_MAX];
static unsigned wx_count;
static int refuse_exec;
static pthread_mutex_t wx_lock = PTHREAD_MUTEX_INITIALIZER;

#define WRITE_EXEC	(PROT_WRITE | PROT_EXEC)

static void
wx_forget(uintptr_t lo, size_t len)
{
	uintptr_t hi = lo + len;

	pthread_mutex_lock(&wx_lock);
	for (unsigned i = 0; i < wx_count; )
		if (wx_ranges[i].lo < hi && lo < wx_ranges[i].hi)
			wx_ranges[i] = wx_ranges[--wx_count];
		else
			i++;
	pthread_mutex_unlock(&wx_lock);
}

static void
wx_remember(uintptr_t lo, size_t len)
{
	pthread_mutex_lock(&wx_lock);
	if (wx_count < WX_MAX) {
		wx_ranges[wx_count].lo = lo;
		wx_ranges[wx_count].hi = lo + len;
		wx_count++;
	} else {
		/* table full: treat the whole address space as once W+X */
		wx_ranges[0].lo = 0;
		wx_ranges[0].hi = UINTPTR_MAX;
	}
	pthread_mutex_unlock(&wx_lock);
}

static int
wx_ever(uintptr_t addr)
{
	int found = 0;

	pthread_mutex_lock(&wx_lock);
	for (unsigned i = 0; i < wx_count && !found; i++)
		found = wx_ranges[i].lo <= addr && addr < wx_ranges[i].hi;
	pthread_mutex_unlock(&wx_lock);
	return (found);
}

EXPORT void *
mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	void *p;

	if (refuse_exec && (prot & PROT_EXEC) && (flags & MAP_ANONYMOUS)) {
		errno = EACCES;
		return (MAP_FAILED);
	}
	p = (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
	if (p != MAP_FAILED) {
		wx_forget((uintptr_t)p, len);	/* MAP_FIXED replaces */
		if ((prot & WRITE_EXEC) == WRITE_EXEC)
			wx_remember((uintptr_t)p, len);
	}
	return (p);
}

EXPORT void *
mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return (mmap(addr, len, prot, flags, fd, off));
}

EXPORT int
mprotect(void *addr, size_t len, int prot)
{
	if (refuse_exec && (prot & PROT_EXEC)) {
		errno = EACCES;
		return (-1);
	}
	if (syscall(SYS_mprotect, addr, len, prot) != 0)
		return (-1);
	if ((prot & WRITE_EXEC) == WRITE_EXEC)
		wx_remember((uintptr_t)addr, len);
	return (0);
}

EXPORT int
munmap(void *addr, size_t len)
{
	if (syscall(SYS_munmap, addr, len) != 0)
		return (-1);
	wx_forget((uintptr_t)addr, len);
	return (0);
}

/* Test support: doors created with a procedure in memory once W+X. */
EXPORT unsigned long
doormodel_wx_procedures(void)
{
	return (__atomic_load_n(&wx_procedures, __ATOMIC_SEQ_CST));
}

/* ------------------------------------------------------------------------ */
/* fork()                                                                    */
/* ------------------------------------------------------------------------ */

static void
atfork_prepare(void)
{
	pthread_mutex_lock(&G);
}

static void
atfork_parent(void)
{
	pthread_mutex_unlock(&G);
}

/*
 * The child has one thread and none of the parent's dispatcher or server
 * threads.  Close every server-side socket, so the child never keeps a door
 * of the parent alive after the parent dies, and every pooled client
 * connection, which it would otherwise share with the parent.
 */
static void
atfork_child(void)
{
	struct sthread *self = tls_self;

	if (rt.epfd >= 0)
		(void) close(rt.epfd);
	rt.epfd = -1;
	for (struct door *d = rt.doors; d != NULL; d = d->next)
		if (d->lfd >= 0)
			(void) close(d->lfd);
	for (struct attach *a = rt.attaches; a != NULL; a = a->next)
		if (a->lfd >= 0)
			(void) close(a->lfd);
	for (struct conn *c = rt.conns; c != NULL; c = c->next)
		(void) close(c->fd);
	for (struct cconn *c = rt.idle; c != NULL; c = c->next)
		(void) close(c->fd);
	rt.doors = NULL;	/* (memory deliberately leaked) */
	rt.attaches = NULL;
	rt.conns = NULL;
	rt.idle = NULL;
	rt.nidle = 0;
	memset(&rt.gpool, 0, sizeof (rt.gpool));
	rt.pid = 0;
	rt.first_pid = 0;
	rt.nthreads = 0;
	if (self != NULL) {
		self->conn = NULL;
		self->door = NULL;
		self->job = NULL;
		self->bound = NULL;
		self->pool = &rt.gpool;
		rt.nthreads = 1;
	}
	pthread_mutex_init(&G, NULL);
}

__attribute__((constructor))
static void
doormodel_init(void)
{
	const char *v = getenv("DOORMODEL_MAX_LWPS");

	if (v != NULL && *v != '\0')
		max_lwps = atol(v);
	v = getenv("DOORMODEL_REFUSE_EXEC");
	refuse_exec = v != NULL && strcmp(v, "1") == 0;
	v = getenv("DOORMODEL_REPLY_FAULTS_ABOVE");
	if (v != NULL && *v != '\0')
		reply_faults_above = atol(v);
	(void) pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
