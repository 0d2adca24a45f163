/*
 * _uring.c -- a small io_uring binding for llmtier.engine.
 *
 * The module talks to the kernel through the raw io_uring_setup(2) and
 * io_uring_enter(2) system calls and the shared rings mmap'ed from the ring
 * fd; it needs nothing beyond libc and the kernel UAPI headers.
 *
 * Ring.run() takes a batch of (op, fd, buf, offset) requests, splits each into
 * chunk-sized pieces and keeps up to `depth` of them in flight, refilling the
 * submission queue as completions arrive (see fill_sq for how a large refill
 * is split so the device never waits for the whole batch).  The loop runs
 * with the GIL released and with the ring's mutex held, so run() and close()
 * calls from different threads serialize on the ring.
 *
 * Memory ordering with the kernel (no SQPOLL, so the kernel only touches the
 * rings inside io_uring_enter or when posting completions):
 *   - SQ: we fill SQEs, then store the SQ tail with RELEASE so the kernel,
 *     which loads the tail with ACQUIRE, sees complete SQEs.  We load the SQ
 *     head with ACQUIRE: once the kernel has moved past a slot it has finished
 *     reading it and we may reuse it.
 *   - CQ: we load the CQ tail with ACQUIRE, pairing with the kernel's RELEASE
 *     store after it wrote the CQE, so the CQE contents are visible; after
 *     reading the CQEs we store the CQ head with RELEASE so the kernel cannot
 *     overwrite a slot before we have finished reading it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif

#define MAX_ENTRIES 32768u
#define MAX_PIECE (1u << 30)  /* per-SQE cap; the kernel caps one rw near 2 GiB */
#define OP_READ 0
#define OP_WRITE 1

/* ------------------------------------------------------------------------ */
/* Ring object                                                              */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int fd;                      /* ring fd, -1 when closed */
    int closed;                  /* written with both the mutex and the GIL */
    unsigned entries;            /* actual SQ size chosen by the kernel */
    pthread_mutex_t lock;        /* serializes run() and close() */
    void *sq_map, *cq_map;       /* cq_map == sq_map with FEAT_SINGLE_MMAP */
    size_t sq_map_len, cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    unsigned *sq_khead, *sq_ktail, sq_mask;
    unsigned sq_tail;            /* our copy of the SQ tail; only we write it */
    unsigned *cq_khead, *cq_ktail, cq_mask;
    struct io_uring_cqe *cqes;
} RingObject;

/* Raise OSError(err, "<what> failed: <strerror>"); always returns NULL. */
static PyObject *
raise_errno(int err, const char *what)
{
    PyObject *args = Py_BuildValue("(iN)", err,
        PyUnicode_FromFormat("%s failed: %s", what, strerror(err)));
    if (args != NULL) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *
raise_closed(void)
{
    PyErr_SetString(PyExc_ValueError, "ring is closed");
    return NULL;
}

/* io_uring_setup with COOP_TASKRUN (completions are run as task work when we
 * enter the kernel, without IPIs), falling back to no flags on kernels that
 * reject it with EINVAL.  Returns the fd, or -1 with errno set. */
static int
uring_setup(unsigned entries, struct io_uring_params *p)
{
    static const unsigned flag_sets[] = {
#ifdef IORING_SETUP_COOP_TASKRUN
        IORING_SETUP_COOP_TASKRUN,
#endif
        0,
    };
    for (size_t i = 0; i < sizeof flag_sets / sizeof flag_sets[0]; i++) {
        memset(p, 0, sizeof *p);
        p->flags = flag_sets[i];
        long fd = syscall(__NR_io_uring_setup, entries, p);
        if (fd >= 0)
            return (int)fd;
        if (errno != EINVAL)
            break;
    }
    return -1;
}

static void *
map_ring(int fd, size_t len, off_t what)
{
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   fd, what);
    return m == MAP_FAILED ? NULL : m;
}

/* Map the SQ ring, CQ ring and SQE array and resolve the ring fields.
 * Returns 0, or -1 with errno set (partial mappings are undone by teardown). */
static int
ring_map(RingObject *r, const struct io_uring_params *p)
{
    size_t sq_len = p->sq_off.array + p->sq_entries * sizeof(unsigned);
    size_t cq_len = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
    int single = (p->features & IORING_FEAT_SINGLE_MMAP) != 0;

    /* With SINGLE_MMAP both rings live in one mapping at IORING_OFF_SQ_RING. */
    if (single && cq_len > sq_len)
        sq_len = cq_len;
    if ((r->sq_map = map_ring(r->fd, sq_len, IORING_OFF_SQ_RING)) == NULL)
        return -1;
    r->sq_map_len = sq_len;
    if (single) {
        r->cq_map = r->sq_map;
    } else {
        if ((r->cq_map = map_ring(r->fd, cq_len, IORING_OFF_CQ_RING)) == NULL)
            return -1;
        r->cq_map_len = cq_len;
    }
    r->sqes_len = p->sq_entries * sizeof(struct io_uring_sqe);
    if ((r->sqes = map_ring(r->fd, r->sqes_len, IORING_OFF_SQES)) == NULL)
        return -1;

    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_khead = (unsigned *)(sq + p->sq_off.head);
    r->sq_ktail = (unsigned *)(sq + p->sq_off.tail);
    r->sq_mask = *(unsigned *)(sq + p->sq_off.ring_mask);
    r->sq_tail = *r->sq_ktail;
    r->cq_khead = (unsigned *)(cq + p->cq_off.head);
    r->cq_ktail = (unsigned *)(cq + p->cq_off.tail);
    r->cq_mask = *(unsigned *)(cq + p->cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p->cq_off.cqes);

    /* The SQ index array is an indirection we never need: map slot i to SQE
     * i once, so that filling sqes[tail & mask] is all a submission takes. */
    unsigned *array = (unsigned *)(sq + p->sq_off.array);
    for (unsigned i = 0; i < p->sq_entries; i++)
        array[i] = i;
    r->entries = p->sq_entries;
    return 0;
}

/* Unmap and close everything; idempotent.  Caller holds the mutex, or is
 * dealloc (no run() can be active then: run() holds a reference). */
static void
ring_teardown(RingObject *r)
{
    if (r->sqes != NULL)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map != NULL && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map != NULL)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0)
        close(r->fd);
    r->sqes = NULL;
    r->sq_map = r->cq_map = NULL;
    r->fd = -1;
    r->closed = 1;
}

/* ------------------------------------------------------------------------ */
/* The submit/complete loop (runs without the GIL)                          */
/* ------------------------------------------------------------------------ */

/* One piece: at most chunk_size consecutive bytes of one request.  A piece
 * has at most one SQE in flight, and user_data is the piece index. */
typedef struct {
    char *buf;            /* next byte of the caller's buffer to transfer */
    uint64_t off;         /* file offset of that byte */
    uint32_t left;        /* bytes still to transfer */
    uint32_t done;        /* bytes transferred so far */
    Py_ssize_t req;       /* owning request */
    int fd;
    int err;              /* 0, or -errno once the piece failed */
    uint8_t opcode;       /* IORING_OP_READ or IORING_OP_WRITE */
    uint8_t eof;          /* read finished short (EOF) */
} piece_t;

typedef struct {          /* record=True: the piece's current SQE */
    int64_t submit_ns;
    unsigned inflight;
} stamp_t;

typedef struct {          /* record=True: one completed SQE */
    Py_ssize_t req;
    uint64_t off;
    uint32_t len;
    int32_t res;
    unsigned inflight;
    int64_t submit_ns, complete_ns;
} event_t;

typedef struct {
    RingObject *ring;
    piece_t *pieces;
    size_t npieces, next;     /* next: first piece never submitted */
    unsigned depth;
    unsigned inflight;        /* SQEs queued and not yet completed */
    unsigned unsubmitted;     /* SQEs queued but not yet consumed by kernel */
    int stopping;             /* hard io_uring_enter error: drain only */
    int enter_err;            /* its errno */
    stamp_t *stamps;          /* record only; NULL otherwise */
    event_t *events;
    size_t nevents, cap;
    int events_oom;
} run_t;

static inline int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Put piece i into the next SQ slot (published later by enter()).  There
 * is always room: slots in use are the unsubmitted SQEs, a subset of the
 * in-flight ones, and inflight < depth <= entries whenever we get here. */
static void
queue_piece(run_t *c, size_t i)
{
    RingObject *r = c->ring;
    const piece_t *p = &c->pieces[i];
    struct io_uring_sqe *sqe = &r->sqes[r->sq_tail & r->sq_mask];

    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = p->opcode;
    sqe->fd = p->fd;
    sqe->off = p->off;
    sqe->addr = (uint64_t)(uintptr_t)p->buf;
    sqe->len = p->left;
    sqe->user_data = i;
    r->sq_tail++;
    c->inflight++;
    c->unsubmitted++;
    if (c->stamps != NULL) {
        c->stamps[i].submit_ns = now_ns();
        c->stamps[i].inflight = c->inflight;
    }
}

/* Publish the queued SQEs (RELEASE: their contents are visible before the
 * new tail is) and call io_uring_enter.  The kernel may consume fewer SQEs
 * than offered (it stops at one that fails early); the rest stay queued and
 * are offered again next time.  Returns 0 or an errno value. */
static int
enter(run_t *c, unsigned min_complete, unsigned flags)
{
    RingObject *r = c->ring;
    __atomic_store_n(r->sq_ktail, r->sq_tail, __ATOMIC_RELEASE);
    long ret = syscall(__NR_io_uring_enter, r->fd, c->unsubmitted,
                       min_complete, flags, NULL, 0);
    if (ret < 0)
        return errno;
    c->unsubmitted -= (unsigned)ret;
    return 0;
}

/* Queue fresh pieces until `depth` SQEs are in flight.
 *
 * A big refill is not handed over in one piece: the block layer holds a
 * multi-SQE submission back until all of it is prepared, so a device with
 * nothing left to do would sit idle meanwhile.  Whenever the queued backlog
 * reaches what the kernel already holds (at least 1), it is submitted at once
 * without waiting; sub-batches thus grow 1, 1, 2, 4, ... while the device
 * works on the earlier ones.  In steady state (a few completions per wakeup
 * against a deep queue) the refill still goes out in one call.  Errors of
 * these early calls are left to the next enter() in run_loop, which offers
 * the same SQEs again. */
static void
fill_sq(run_t *c)
{
    if (c->stopping)
        return;
    while (c->inflight < c->depth && c->next < c->npieces) {
        size_t i = c->next++;
        queue_piece(c, i);
        unsigned held = c->inflight - c->unsubmitted;
        int more = c->inflight < c->depth && c->next < c->npieces;
        if (more && c->unsubmitted >= (held > 0 ? held : 1))
            (void)enter(c, 0, 0);
    }
}

/* Record one completion (record=True only); the array grows by doubling. */
static void
log_event(run_t *c, size_t i, int res, int64_t now)
{
    if (c->nevents == c->cap) {
        size_t cap = c->cap * 2;
        event_t *ev = realloc(c->events, cap * sizeof *ev);
        if (ev == NULL) {
            c->events_oom = 1;
            return;
        }
        c->events = ev;
        c->cap = cap;
    }
    const piece_t *p = &c->pieces[i];
    event_t *e = &c->events[c->nevents++];
    e->req = p->req;
    e->off = p->off;
    e->len = p->left;
    e->res = res;
    e->inflight = c->stamps[i].inflight;
    e->submit_ns = c->stamps[i].submit_ns;
    e->complete_ns = now;
}

/* Resubmit the rest of piece i, unless we are draining after an error. */
static void
resubmit(run_t *c, size_t i)
{
    if (c->stopping)
        c->pieces[i].err = -ECANCELED;
    else
        queue_piece(c, i);
}

/* Apply one CQE to its piece (see run()'s docstring for the rules). */
static void
complete_cqe(run_t *c, uint64_t user_data, int res, int64_t now)
{
    if (user_data >= c->npieces)
        return;                     /* not ours; cannot happen */
    size_t i = (size_t)user_data;
    piece_t *p = &c->pieces[i];

    c->inflight--;
    if (c->stamps != NULL)
        log_event(c, i, res, now);
    if (res > 0) {
        uint32_t n = (uint32_t)res < p->left ? (uint32_t)res : p->left;
        p->buf += n;
        p->off += n;
        p->left -= n;
        p->done += n;
        if (p->left > 0)
            resubmit(c, i);         /* short transfer: do the rest */
    } else if (res == 0) {
        if (p->opcode == IORING_OP_READ)
            p->eof = 1;
        else
            p->err = -EIO;          /* a zero-byte write would loop forever */
    } else if (res == -EINTR || res == -EAGAIN) {
        resubmit(c, i);
    } else {
        p->err = res;
    }
}

/* Consume every CQE currently posted; returns how many there were. */
static unsigned
reap(run_t *c)
{
    RingObject *r = c->ring;
    unsigned head = __atomic_load_n(r->cq_khead, __ATOMIC_ACQUIRE);
    unsigned tail = __atomic_load_n(r->cq_ktail, __ATOMIC_ACQUIRE);
    unsigned n = tail - head;
    int64_t now = (c->stamps != NULL && n > 0) ? now_ns() : 0;

    for (; head != tail; head++) {
        const struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
        complete_cqe(c, cqe->user_data, cqe->res, now);
    }
    __atomic_store_n(r->cq_khead, tail, __ATOMIC_RELEASE);
    return n;
}

/* After a hard enter error, take back SQEs the kernel never consumed (safe:
 * without SQPOLL the kernel reads the SQ tail only inside io_uring_enter,
 * and we hold the mutex), so nothing stale is left for a later run(). */
static void
retract_unsubmitted(run_t *c)
{
    RingObject *r = c->ring;
    unsigned khead = __atomic_load_n(r->sq_khead, __ATOMIC_ACQUIRE);
    c->inflight -= r->sq_tail - khead;
    c->unsubmitted = 0;
    r->sq_tail = khead;
    __atomic_store_n(r->sq_ktail, khead, __ATOMIC_RELEASE);
}

/* Drive all pieces to completion.  Never returns while an SQE the kernel
 * has consumed is still in flight: it may still write into our buffers. */
static void
run_loop(run_t *c)
{
    static const struct timespec backoff = {0, 1000000};

    while (c->inflight > 0 || (!c->stopping && c->next < c->npieces)) {
        fill_sq(c);
        int err = enter(c, 1, IORING_ENTER_GETEVENTS);
        if (err == 0 || err == EINTR) {
            reap(c);
        } else if (err == EAGAIN || err == EBUSY) {
            if (reap(c) == 0)       /* kernel short of resources: back off */
                sched_yield();
        } else if (!c->stopping) {
            c->stopping = 1;        /* hard error: no new work, drain */
            c->enter_err = err;
            retract_unsubmitted(c);
            reap(c);
        } else {
            nanosleep(&backoff, NULL);  /* still failing while draining */
            reap(c);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* run(): argument handling and result building (with the GIL)              */
/* ------------------------------------------------------------------------ */

/* Read an int attribute of a request, checking type and range. */
static int
get_int(PyObject *o, const char *name, long long lo, long long hi,
        long long *out)
{
    int overflow;
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "request %s must be an int, not %.100s",
                     name, Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    if (overflow || *out < lo || *out > hi) {
        PyErr_Format(PyExc_ValueError, "request %s out of range", name);
        return -1;
    }
    return 0;
}

typedef struct {
    int fd;
    int op;
    uint64_t off;
} req_t;

/* Validate one (op, fd, buf, offset) tuple and acquire its buffer. */
static int
parse_request(PyObject *item, req_t *rq, Py_buffer *view)
{
    long long op, fd, off;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "each request must be a tuple (op, fd, buf, offset)");
        return -1;
    }
    if (get_int(PyTuple_GET_ITEM(item, 0), "op", 0, 1, &op) < 0 ||
        get_int(PyTuple_GET_ITEM(item, 1), "fd", 0, INT_MAX, &fd) < 0 ||
        get_int(PyTuple_GET_ITEM(item, 3), "offset", 0, INT64_MAX, &off) < 0)
        return -1;
    int flags = PyBUF_C_CONTIGUOUS | (op == OP_READ ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 2), view, flags) < 0)
        return -1;
    if ((unsigned long long)view->len > (unsigned long long)(INT64_MAX - off)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "request offset + length overflows");
        return -1;
    }
    rq->op = (int)op;
    rq->fd = (int)fd;
    rq->off = (uint64_t)off;
    return 0;
}

/* Fill the pieces of one request of `len` bytes (buffer `buf`, file offset
 * `off`), each at most `chunk` bytes; returns the slot after the last. */
static piece_t *
add_pieces(piece_t *p, char *buf, uint64_t off, size_t len, size_t chunk,
           Py_ssize_t req, int fd, int op)
{
    for (size_t pos = 0; pos < len; pos += chunk, p++) {
        p->buf = buf + pos;
        p->off = off + pos;
        p->left = (uint32_t)(len - pos < chunk ? len - pos : chunk);
        p->done = 0;
        p->req = req;
        p->fd = fd;
        p->err = 0;
        p->opcode = op == OP_READ ? IORING_OP_READ : IORING_OP_WRITE;
        p->eof = 0;
    }
    return p;
}

/* Split every request into pieces of at most `chunk` bytes. */
static piece_t *
split_pieces(const req_t *rq, const Py_buffer *views, const char *bad,
             Py_ssize_t nreq, size_t chunk, size_t *npieces)
{
    size_t n = 0;
    for (Py_ssize_t r = 0; r < nreq; r++)
        if (!bad[r])
            n += ((size_t)views[r].len + chunk - 1) / chunk;
    if (n > SIZE_MAX / sizeof(piece_t))
        return NULL;
    piece_t *pc = malloc(n ? n * sizeof *pc : 1);
    if (pc == NULL)
        return NULL;
    piece_t *p = pc;
    for (Py_ssize_t r = 0; r < nreq; r++)
        if (!bad[r])                                    /* bad: no pieces */
            p = add_pieces(p, (char *)views[r].buf, rq[r].off,
                           (size_t)views[r].len, chunk, r, rq[r].fd, rq[r].op);
    *npieces = n;
    return pc;
}

/* The result of request `r`, whose pieces start at pc[*i] (advanced past
 * them): -errno of its first failed piece, else the byte count of the prefix
 * up to and including the first piece that ended short. */
static long long
req_result(const piece_t *pc, size_t np, size_t *i, Py_ssize_t r)
{
    long long total = 0;
    int err = 0, stopped = 0;
    for (; *i < np && pc[*i].req == r; (*i)++) {
        const piece_t *p = &pc[*i];
        if (err == 0 && p->err != 0)
            err = p->err;
        else if (err == 0 && !stopped) {
            total += p->done;
            stopped = p->eof;
        }
    }
    return err ? err : total;
}

/* Per request: -EINVAL if its buffer was misaligned (never submitted),
 * else req_result(). */
static PyObject *
build_results(const piece_t *pc, size_t np, const char *bad, Py_ssize_t nreq)
{
    PyObject *list = PyList_New(nreq);
    size_t i = 0;
    for (Py_ssize_t r = 0; list != NULL && r < nreq; r++) {
        long long res = req_result(pc, np, &i, r);
        PyObject *v = PyLong_FromLongLong(bad[r] ? -EINVAL : res);
        if (v == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, r, v);
    }
    return list;
}

static PyObject *
build_events(const run_t *c)
{
    PyObject *list = PyList_New((Py_ssize_t)c->nevents);
    for (size_t i = 0; list != NULL && i < c->nevents; i++) {
        const event_t *e = &c->events[i];
        PyObject *t = Py_BuildValue("(nKILLiI)", e->req,
            (unsigned long long)e->off, (unsigned)e->len,
            (long long)e->submit_ns, (long long)e->complete_ns,
            (int)e->res, e->inflight);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

/* Allocate the record=True arrays (stamps per piece, events growable). */
static int
alloc_record(run_t *c)
{
    c->cap = c->npieces + 16;
    if (c->cap > SIZE_MAX / sizeof *c->events)
        return -1;
    c->stamps = malloc((c->npieces ? c->npieces : 1) * sizeof *c->stamps);
    c->events = malloc(c->cap * sizeof *c->events);
    return (c->stamps == NULL || c->events == NULL) ? -1 : 0;
}

/* Run the loop without the GIL and with the ring mutex; 0, or -1 if closed. */
static int
run_locked(RingObject *self, run_t *c)
{
    int closed;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    closed = self->closed;
    if (!closed)
        run_loop(c);
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    return closed ? -1 : 0;
}

/* Checks shared by run() and gather(); 0, or -1 with an exception set. */
static int
check_loop_args(RingObject *self, Py_ssize_t chunk, Py_ssize_t depth,
                Py_ssize_t align)
{
    if (align < 0) {
        PyErr_SetString(PyExc_ValueError, "align must be >= 0");
        return -1;
    }
    if (self->closed) {
        raise_closed();
        return -1;
    }
    if (chunk <= 0) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be > 0");
        return -1;
    }
    if (depth < 1 || (size_t)depth > self->entries) {
        PyErr_Format(PyExc_ValueError, "depth must be in 1..%u", self->entries);
        return -1;
    }
    return 0;
}

/* Run the loop, then turn what went wrong into a Python exception:
 * 0 on success, -1 with an exception set. */
static int
run_checked(RingObject *self, run_t *c)
{
    if (run_locked(self, c) < 0) {
        raise_closed();
        return -1;
    }
    if (c->enter_err) {
        raise_errno(c->enter_err, "io_uring_enter");
        return -1;
    }
    if (c->events_oom) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(Ring_run_doc,
"run($self, /, requests, chunk_size, depth, record=False, align=0)\n--\n\n"
"Perform a batch of I/O requests and return (results, events).  Each\n"
"request is a tuple (op, fd, buf, offset): op 0 = read into buf, 1 = write\n"
"from buf; the length is the buffer's size in bytes.\n"
"Requests are split into pieces of at most chunk_size bytes and at most\n"
"depth SQEs are kept in flight.  Short transfers, EINTR and EAGAIN are\n"
"resubmitted; a read returning 0 ends the request at EOF.\n\n"
"results[i] is -errno if any piece of request i failed, else the number of\n"
"bytes transferred, counted up to the first piece that ended short (EOF).\n"
"events is None unless\n"
"record is true; then it is a list of (req_index, file_offset, nbytes,\n"
"submit_ns, complete_ns, res, inflight_at_submit), one per completed SQE,\n"
"with CLOCK_MONOTONIC times.  With align > 1, a request whose buffer\n"
"address is not a multiple of align is not submitted; its result is\n"
"-EINVAL.  Raises OSError if io_uring_enter fails.");

static PyObject *
Ring_run(RingObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"requests", "chunk_size", "depth", "record",
                             "align", NULL};
    PyObject *reqs_obj, *seq = NULL, *results = NULL, *events = NULL;
    PyObject *ret = NULL;
    Py_ssize_t chunk, depth, nreq = 0, nviews = 0, align = 0;
    int record = 0;
    req_t *rq = NULL;
    char *bad = NULL;
    Py_buffer *views = NULL;
    run_t c;

    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Onn|pn:run", kwlist,
                                     &reqs_obj, &chunk, &depth, &record,
                                     &align))
        return NULL;
    if (check_loop_args(self, chunk, depth, align) < 0)
        return NULL;
    if ((seq = PySequence_Fast(reqs_obj, "requests must be a sequence")) == NULL)
        return NULL;
    nreq = PySequence_Fast_GET_SIZE(seq);
    rq = malloc((size_t)(nreq ? nreq : 1) * sizeof *rq);
    views = malloc((size_t)(nreq ? nreq : 1) * sizeof *views);
    bad = calloc((size_t)(nreq ? nreq : 1), 1);
    if (rq == NULL || views == NULL || bad == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Validate everything and pin all buffers before any I/O starts. */
    for (; nviews < nreq; nviews++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, nviews);
        if (parse_request(item, &rq[nviews], &views[nviews]) < 0)
            goto done;
    }
    /* With `align`, a buffer whose address is not a multiple of it is not
     * submitted (O_DIRECT would fail it anyway): its result is -EINVAL and
     * the caller takes a slower, bounce-buffer path for it. */
    if (align > 1)
        for (Py_ssize_t r = 0; r < nreq; r++)
            bad[r] = ((uintptr_t)views[r].buf % (uintptr_t)align) != 0;
    c.ring = self;
    c.depth = (unsigned)depth;
    c.pieces = split_pieces(rq, views, bad, nreq,
                            (size_t)chunk < MAX_PIECE ? (size_t)chunk : MAX_PIECE,
                            &c.npieces);
    if (c.pieces == NULL || (record && alloc_record(&c) < 0)) {
        PyErr_NoMemory();
        goto done;
    }
    if (run_checked(self, &c) < 0)
        goto done;
    if ((results = build_results(c.pieces, c.npieces, bad, nreq)) == NULL)
        goto done;
    if (record)
        events = build_events(&c);
    else
        events = Py_NewRef(Py_None);
    if (events != NULL)
        ret = PyTuple_Pack(2, results, events);
done:
    /* Every SQE has completed by now, so the buffers can be let go. */
    for (Py_ssize_t i = 0; i < nviews; i++)
        PyBuffer_Release(&views[i]);
    free(views);
    free(bad);
    free(rq);
    free(c.pieces);
    free(c.stamps);
    free(c.events);
    Py_XDECREF(results);
    Py_XDECREF(events);
    Py_XDECREF(seq);
    return ret;
}

/* ------------------------------------------------------------------------ */
/* gather(): fixed-size pages at arbitrary offsets, one contiguous buffer   */
/* ------------------------------------------------------------------------ */

/* True if a buffer format string describes a native int64 ('q' or 'l',
 * optionally with a native byte-order prefix); the item size is checked
 * separately (a C long is 8 bytes only on LP64). */
static int
is_int64_format(const char *f)
{
    if (f == NULL)
        return 0;                   /* NULL means unsigned bytes */
    if (*f == '@' || *f == '=')
        f++;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    else if (*f == '<')
        f++;
#else
    else if (*f == '>' || *f == '!')
        f++;
#endif
    return (f[0] == 'q' || f[0] == 'l') && f[1] == '\0';
}

/* Check every page offset (>= 0, the page's end fits in int64, a multiple of
 * align when align > 1); 0, or -1 with ValueError set. */
static int
check_offsets(const int64_t *o, Py_ssize_t n, Py_ssize_t page,
              Py_ssize_t align)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        if (o[k] < 0 || o[k] > INT64_MAX - (int64_t)page) {
            PyErr_Format(PyExc_ValueError,
                         "offsets[%zd] = %lld is out of range", k,
                         (long long)o[k]);
            return -1;
        }
        if (align > 1 && o[k] % align != 0) {
            PyErr_Format(PyExc_ValueError,
                         "offsets[%zd] = %lld is not a multiple of align %zd",
                         k, (long long)o[k], align);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(Ring_gather_doc,
"gather($self, /, op, fd, buf, offsets, page_size, chunk_size, depth,\n"
"       record=False, align=0)\n--\n\n"
"Move len(offsets) pages of page_size bytes between one contiguous buffer\n"
"and the file fd: page k is buf[k*page_size:(k+1)*page_size] and the file\n"
"bytes [offsets[k], offsets[k] + page_size).  op 0 = read into buf (which\n"
"must be writable), 1 = write from buf.  buf must be C-contiguous and\n"
"exactly len(offsets) * page_size bytes; offsets is a buffer of int64\n"
"(a numpy int64 array, array('q'), ...), each >= 0.  Offsets may repeat and\n"
"need not be sorted.\n"
"Pages are split into pieces of at most chunk_size bytes and handled like\n"
"the requests of run() (depth SQEs in flight, short transfers, EINTR and\n"
"EAGAIN resubmitted), without a Python object per page.\n\n"
"Returns (total_bytes, first_bad_page, first_bad_result, events).\n"
"total_bytes sums what every page moved (its prefix, as run() counts a\n"
"request).  first_bad_page is -1 if every page moved in full, else the\n"
"lowest page index that did not; first_bad_result is then that page's\n"
"-errno, or the bytes it moved before end of file (0 otherwise).  events\n"
"is None unless record is true; then it is a list in run()'s format with\n"
"the page index as req_index.  With align > 1, the buffer address,\n"
"page_size and every offset must be multiples of align (ValueError\n"
"otherwise; nothing is submitted).  Raises TypeError for offsets of\n"
"another type and OSError if io_uring_enter fails.");

static PyObject *
Ring_gather(RingObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"op", "fd", "buf", "offsets", "page_size",
                             "chunk_size", "depth", "record", "align", NULL};
    PyObject *buf_obj, *offs_obj, *events = NULL, *ret = NULL;
    Py_ssize_t page, chunk, depth, align = 0, n = 0, bad = -1;
    int op, fd, record = 0, have_buf = 0, have_offs = 0;
    long long total = 0, bad_res = 0;
    const int64_t *o;
    size_t piece, per_page, i = 0;
    piece_t *p;
    Py_buffer buf, offs;
    run_t c;

    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiOOnnn|pn:gather", kwlist,
                                     &op, &fd, &buf_obj, &offs_obj, &page,
                                     &chunk, &depth, &record, &align))
        return NULL;
    if (op != OP_READ && op != OP_WRITE) {
        PyErr_SetString(PyExc_ValueError, "op must be 0 (read) or 1 (write)");
        return NULL;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be >= 0");
        return NULL;
    }
    if (page <= 0) {
        PyErr_SetString(PyExc_ValueError, "page_size must be > 0");
        return NULL;
    }
    if (check_loop_args(self, chunk, depth, align) < 0)
        return NULL;

    /* Validate everything and pin both buffers before any I/O starts. */
    if (PyObject_GetBuffer(offs_obj, &offs,
                           PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    have_offs = 1;
    if (offs.itemsize != 8 || !is_int64_format(offs.format)) {
        PyErr_Format(PyExc_TypeError,
                     "offsets must be a buffer of int64 (format 'q' or 'l'),"
                     " got format '%s' with item size %zd",
                     offs.format ? offs.format : "B", offs.itemsize);
        goto done;
    }
    n = offs.len / 8;
    if (PyObject_GetBuffer(buf_obj, &buf, PyBUF_C_CONTIGUOUS |
                           (op == OP_READ ? PyBUF_WRITABLE : 0)) < 0)
        goto done;
    have_buf = 1;
    if (n > PY_SSIZE_T_MAX / page || buf.len != n * page) {
        PyErr_Format(PyExc_ValueError,
                     "buf is %zd bytes; %zd pages of %zd bytes need %zd",
                     buf.len, n, page,
                     n > PY_SSIZE_T_MAX / page ? PY_SSIZE_T_MAX : n * page);
        goto done;
    }
    if (align > 1 && ((uintptr_t)buf.buf % (uintptr_t)align != 0 ||
                      page % align != 0)) {
        PyErr_Format(PyExc_ValueError,
                     "buf address and page_size must be multiples of align %zd",
                     align);
        goto done;
    }
    o = offs.buf;
    if (check_offsets(o, n, page, align) < 0)
        goto done;

    piece = (size_t)chunk < MAX_PIECE ? (size_t)chunk : MAX_PIECE;
    per_page = ((size_t)page + piece - 1) / piece;
    if ((size_t)n > SIZE_MAX / sizeof(piece_t) / per_page) {
        PyErr_NoMemory();
        goto done;
    }
    c.npieces = (size_t)n * per_page;
    c.pieces = malloc(c.npieces ? c.npieces * sizeof *c.pieces : 1);
    if (c.pieces == NULL || (record && alloc_record(&c) < 0)) {
        PyErr_NoMemory();
        goto done;
    }
    p = c.pieces;
    for (Py_ssize_t k = 0; k < n; k++)
        p = add_pieces(p, (char *)buf.buf + k * page, (uint64_t)o[k],
                       (size_t)page, piece, k, fd, op);
    c.ring = self;
    c.depth = (unsigned)depth;
    if (run_checked(self, &c) < 0)
        goto done;

    /* Total of every page's prefix; the first page that is not complete. */
    for (Py_ssize_t k = 0; k < n; k++) {
        long long res = req_result(c.pieces, c.npieces, &i, k);
        if (res > 0)
            total += res;
        if (bad < 0 && res < page) {
            bad = k;
            bad_res = res;
        }
    }
    events = record ? build_events(&c) : Py_NewRef(Py_None);
    if (events != NULL)
        ret = Py_BuildValue("(LnLO)", total, bad, bad_res, events);
done:
    /* Every SQE has completed by now, so the buffers can be let go. */
    if (have_buf)
        PyBuffer_Release(&buf);
    if (have_offs)
        PyBuffer_Release(&offs);
    free(c.pieces);
    free(c.stamps);
    free(c.events);
    Py_XDECREF(events);
    return ret;
}

/* ------------------------------------------------------------------------ */
/* Ring type boilerplate                                                    */
/* ------------------------------------------------------------------------ */

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"entries", NULL};
    Py_ssize_t entries = 256;
    struct io_uring_params p;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n:Ring", kwlist, &entries))
        return NULL;
    if (entries < 1 || (size_t)entries > MAX_ENTRIES) {
        PyErr_Format(PyExc_ValueError, "entries must be in 1..%u", MAX_ENTRIES);
        return NULL;
    }
    RingObject *self = (RingObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->fd = -1;
    self->closed = 1;
    pthread_mutex_init(&self->lock, NULL);
    if ((self->fd = uring_setup((unsigned)entries, &p)) < 0) {
        int err = errno;
        Py_DECREF(self);
        return raise_errno(err, "io_uring_setup");
    }
    self->closed = 0;
    if (ring_map(self, &p) < 0) {
        int err = errno;
        Py_DECREF(self);            /* dealloc undoes the partial mapping */
        return raise_errno(err, "io_uring mmap");
    }
    return (PyObject *)self;
}

static void
Ring_dealloc(RingObject *self)
{
    ring_teardown(self);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(Ring_close_doc,
"close($self, /)\n--\n\nClose the ring; waits for a run() in another thread to\n"
"finish first.  Idempotent.");

static PyObject *
Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    /* Take the mutex without holding the GIL if it is busy (a run() is
     * active), so the running thread can re-acquire the GIL and finish. */
    if (pthread_mutex_trylock(&self->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->lock);
        Py_END_ALLOW_THREADS
    }
    ring_teardown(self);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *
Ring_enter(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed)
        return raise_closed();
    return Py_NewRef(self);
}

static PyObject *
Ring_exit(RingObject *self, PyObject *Py_UNUSED(args))
{
    return Ring_close(self, NULL);
}

static PyObject *
Ring_get_entries(RingObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->entries);
}

static PyObject *
Ring_get_closed(RingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->closed);
}

static PyMethodDef Ring_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Ring_run,
     METH_VARARGS | METH_KEYWORDS, Ring_run_doc},
    {"gather", (PyCFunction)(void (*)(void))Ring_gather,
     METH_VARARGS | METH_KEYWORDS, Ring_gather_doc},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, Ring_close_doc},
    {"__enter__", (PyCFunction)Ring_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Ring_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"entries", (getter)Ring_get_entries, NULL,
     "Actual number of SQ entries.", NULL},
    {"closed", (getter)Ring_get_closed, NULL, "True once closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Ring_doc,
"Ring(entries=256)\n--\n\nAn io_uring instance with `entries` submission slots\n"
"(1..32768, rounded up to a power of two by the kernel).  Usable as a\n"
"context manager; close() releases it.");

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "llmtier.engine._uring.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Ring_doc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_new = Ring_new,
};

/* ------------------------------------------------------------------------ */
/* Module                                                                   */
/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(probe_doc,
"probe($module, /)\n--\n\nCreate and destroy a tiny ring; raises OSError if\n"
"io_uring_setup fails (ENOSYS: no kernel support; EPERM: disabled by\n"
"seccomp or the kernel.io_uring_disabled sysctl).");

static PyObject *
uring_probe(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    struct io_uring_params p;
    int fd = uring_setup(2, &p);
    if (fd < 0)
        return raise_errno(errno, "io_uring_setup");
    close(fd);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"probe", uring_probe, METH_NOARGS, probe_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc,
"Minimal io_uring binding (raw syscalls, no liburing) used by\n"
"llmtier.engine for batched, GIL-free file reads and writes.");

static struct PyModuleDef uring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "llmtier.engine._uring",
    .m_doc = module_doc,
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__uring(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&uring_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
