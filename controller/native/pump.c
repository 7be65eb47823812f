/* A link's copy pump: what keeps a copy engine busy without queueing much on it.
 * Why it exists and how it decides: Note [The native pump] in controller/pump.py.
 *
 * Built at first use with the system C compiler (controller/pump.py); loaded with ctypes,
 * whose calls release the GIL. The CUDA driver is reached through dlopen, so this builds
 * without CUDA headers and loads on machines without a GPU (engine "host" then).
 *
 * Engines: CUDA (cuMemcpyAsync on one stream, an event after each piece) and host (a thread
 * that memcpy's the pieces in order, optionally at a set rate: a copy engine in host memory,
 * what the CPU tests drive). Both complete pieces in submission order. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CU_NOT_READY 600
#define CU_EVENT_DISABLE_TIMING 2
#define HW_SLOTS 3          /* pieces on the engine at once: the running one, the next, express ones */
#define TOKENS 256
#define EXPRESS_CAP 64
#define PUMP_BUSY -1        /* no free token or queue slot */
#define PUMP_BAD -2         /* a bad argument */
#define PUMP_CLOSED -3      /* the pump was closed */

typedef int CUresult;
typedef void *CUctx;
typedef void *CUstr;
typedef void *CUev;

static struct {
    CUresult (*push)(CUctx);
    CUresult (*pop)(CUctx *);
    CUresult (*memcpy_async)(uint64_t, uint64_t, size_t, CUstr);
    CUresult (*event_create)(CUev *, unsigned);
    CUresult (*event_record)(CUev, CUstr);
    CUresult (*event_query)(CUev);
    CUresult (*event_destroy)(CUev);
} cu;

int pump_load_cuda(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) return -1;
    cu.push = dlsym(lib, "cuCtxPushCurrent_v2");
    cu.pop = dlsym(lib, "cuCtxPopCurrent_v2");
    cu.memcpy_async = dlsym(lib, "cuMemcpyAsync");
    cu.event_create = dlsym(lib, "cuEventCreate");
    cu.event_record = dlsym(lib, "cuEventRecord");
    cu.event_query = dlsym(lib, "cuEventQuery");
    cu.event_destroy = dlsym(lib, "cuEventDestroy_v2");
    return (cu.push && cu.pop && cu.memcpy_async && cu.event_create && cu.event_record &&
            cu.event_query && cu.event_destroy) ? 0 : -2;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

typedef struct { uint64_t dst, src, n; int token; int64_t queued; } piece_t;

typedef struct {
    piece_t piece;
    int express;
    int64_t submitted, start;   /* start: when the engine began it (as well as we can tell) */
    uint64_t seq;               /* host engine: its place in the engine's queue */
    int slot;                   /* CUDA engine: its event */
} flight_t;

/* remaining is written with the lock held and read without it by spinning waiters. */
typedef struct { int used; uint64_t remaining; int error; } token_t;

typedef struct pump {
    int cuda;
    CUctx ctx;
    CUstr stream;
    CUev events[HW_SLOTS];
    int event_free[HW_SLOTS];

    pthread_mutex_t mu;
    pthread_cond_t work, done;
    pthread_t thread;
    int stopping, sleepers;

    piece_t express[EXPRESS_CAP];
    int express_head, express_count;
    piece_t *normal;             /* a ring; the head piece may be partly submitted */
    int normal_cap, normal_head, normal_count;
    uint64_t head_offset;

    flight_t flight[HW_SLOTS];
    int flights;
    token_t tokens[TOKENS];
    int next_token;

    /* Policy (Note [The native pump]) */
    double bytes_per_ns;         /* the engine's rate, learnt from what it did */
    int64_t lead_ns, overhead_ns, recent_ns;
    int64_t min_lead_ns, max_lead_ns;
    int on_time;                 /* pieces that went on in time since the lead last changed */
    uint64_t piece_bytes;        /* a normal piece's largest submission (the link's chunk) */
    uint64_t split_bytes;        /* the same while express ones are about */
    int64_t last_express;

    /* Counters */
    uint64_t submitted_pieces, split_pieces, express_pieces, bytes_done, idles;
    int64_t express_queue_ns, express_copy_ns;      /* summed: queued → on the engine → seen */

    /* Host engine */
    pthread_t host_thread;
    pthread_cond_t host_work;
    piece_t host_queue[HW_SLOTS];
    uint64_t host_seq_submitted, host_seq_done;
    int host_errors[HW_SLOTS];
    double host_bytes_per_ns;    /* 0: as fast as memcpy */
} pump_t;

/* -- the host engine: a queue of HW_SLOTS pieces copied in order by one thread ------------ */

/* The pump's threads take no signals: the interpreter handles them on its own threads. */
static void block_signals(void) {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
}

static void *host_engine(void *arg) {
    pump_t *p = arg;
    block_signals();
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stopping && p->host_seq_done == p->host_seq_submitted)
            pthread_cond_wait(&p->host_work, &p->mu);
        if (p->host_seq_done == p->host_seq_submitted) break;
        piece_t piece = p->host_queue[p->host_seq_done % HW_SLOTS];
        pthread_mutex_unlock(&p->mu);
        int64_t began = now_ns();
        memcpy((void *)(uintptr_t)piece.dst, (const void *)(uintptr_t)piece.src, piece.n);
        if (p->host_bytes_per_ns > 0) {      /* a slower link than this machine's memory bus */
            int64_t until = began + (int64_t)(piece.n / p->host_bytes_per_ns);
            struct timespec t = {until / 1000000000, until % 1000000000};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL)) {}
        }
        pthread_mutex_lock(&p->mu);
        p->host_seq_done++;
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* -- the pump ------------------------------------------------------------------------- */

static int normal_push(pump_t *p, piece_t piece) {
    if (p->normal_count == p->normal_cap) {
        int cap = p->normal_cap * 2;
        piece_t *ring = malloc(sizeof(piece_t) * cap);
        if (!ring) return PUMP_BUSY;
        for (int i = 0; i < p->normal_count; i++)
            ring[i] = p->normal[(p->normal_head + i) % p->normal_cap];
        free(p->normal);
        p->normal = ring;
        p->normal_cap = cap;
        p->normal_head = 0;
    }
    p->normal[(p->normal_head + p->normal_count) % p->normal_cap] = piece;
    p->normal_count++;
    return 0;
}

static int token_new(pump_t *p, uint64_t bytes) {
    for (int i = 0; i < TOKENS; i++) {
        int t = (p->next_token + i) % TOKENS;
        if (!p->tokens[t].used) {
            p->tokens[t] = (token_t){1, bytes, 0};
            p->next_token = (t + 1) % TOKENS;
            return t;
        }
    }
    return PUMP_BUSY;
}

static void piece_finished(pump_t *p, piece_t piece, int error) {
    token_t *t = &p->tokens[piece.token];
    if (error && !t->error) t->error = error;
    uint64_t left = __atomic_sub_fetch(&t->remaining, piece.n, __ATOMIC_RELEASE);
    if (!error) p->bytes_done += piece.n;
    if (left == 0 && p->sleepers) pthread_cond_broadcast(&p->done);
}

static int64_t predicted_end(pump_t *p, const flight_t *f) {
    return f->start + p->overhead_ns + (int64_t)(f->piece.n / p->bytes_per_ns);
}

/* Put one piece on the engine (lock held). Errors finish the piece at once. */
static void submit(pump_t *p, piece_t piece, int express, int64_t now) {
    flight_t *f = &p->flight[p->flights];
    int error = 0;
    if (p->cuda) {
        int slot = 0;
        while (!p->event_free[slot]) slot++;
        CUctx popped;
        error = cu.push(p->ctx);
        if (!error) {
            error = cu.memcpy_async(piece.dst, piece.src, piece.n, p->stream);
            if (!error) error = cu.event_record(p->events[slot], p->stream);
            cu.pop(&popped);
        }
        if (!error) { p->event_free[slot] = 0; f->slot = slot; }
    } else {
        p->host_queue[p->host_seq_submitted % HW_SLOTS] = piece;
        f->seq = ++p->host_seq_submitted;
        pthread_cond_signal(&p->host_work);
    }
    p->submitted_pieces++;
    if (error) { piece_finished(p, piece, error); return; }
    f->piece = piece;
    f->express = express;
    f->submitted = now;
    /* Behind another piece it starts when that one ends: predicted now, seen then (advance). */
    f->start = p->flights ? predicted_end(p, &p->flight[p->flights - 1]) : now;
    p->flights++;
}

/* The engine's state moves on (lock held; any thread may call it): finished pieces are
 * retired, and the next piece goes on once the running one is about to end. */
static void advance(pump_t *p) {
    int64_t now = now_ns();
    while (p->flights) {
        flight_t *f = &p->flight[0];
        int status;
        if (p->cuda) {
            status = cu.event_query(p->events[f->slot]);
            if (status == CU_NOT_READY) break;
            p->event_free[f->slot] = 1;
        } else {
            if (p->host_seq_done < f->seq) break;
            status = 0;
        }
        now = now_ns();
        if (!status && !f->express && f->piece.n >= (1u << 20)) {   /* learn the rate from large pieces */
            int64_t took = now - f->start - p->overhead_ns;
            if (took > 0) p->bytes_per_ns += (f->piece.n / (double)took - p->bytes_per_ns) / 8;
        }
        if (f->express) {
            p->express_queue_ns += f->submitted - f->piece.queued;
            p->express_copy_ns += now - f->submitted;
        }
        int was_express = f->express;
        piece_finished(p, f->piece, status);
        memmove(&p->flight[0], &p->flight[1], sizeof(flight_t) * (HW_SLOTS - 1));
        p->flights--;
        if (p->flights)
            p->flight[0].start = now > p->flight[0].submitted ? now : p->flight[0].submitted;
        if (was_express || now - p->last_express < p->recent_ns) {
            /* Express moves break the rhythm the lead is learnt from. */
        } else if (p->flights) {
            /* In time: the next piece was on before this one ended. After 64 such, try a
             * shorter lead: the less queued on the engine, the less an express move waits. */
            if (++p->on_time >= 64 && p->lead_ns > p->min_lead_ns) {
                p->lead_ns -= 500;
                p->on_time = 0;
            }
        } else if (p->express_count || p->normal_count) {
            /* The engine ran dry with work waiting: the next piece went on too late. */
            p->idles++;
            p->on_time = 0;
            if (p->lead_ns < p->max_lead_ns) p->lead_ns += 1000;
        }
    }
    /* An express piece goes on at once, behind what the engine holds; a normal one when the
     * engine is idle, or holds one piece only and that is about to end. */
    for (;;) {
        int express = p->express_count > 0 && p->flights < HW_SLOTS;
        if (!express && !(p->normal_count && (p->flights == 0 || (p->flights == 1 &&
                now >= predicted_end(p, &p->flight[0]) - p->lead_ns))))
            break;
        piece_t piece;
        if (express) {
            piece = p->express[p->express_head];
            p->express_head = (p->express_head + 1) % EXPRESS_CAP;
            p->express_count--;
            p->express_pieces++;
        } else {
            piece_t *head = &p->normal[p->normal_head];
            uint64_t left = head->n - p->head_offset;
            uint64_t take = p->piece_bytes && left > p->piece_bytes ? p->piece_bytes : left;
            if (p->split_bytes && now - p->last_express < p->recent_ns && take > p->split_bytes) {
                take = p->split_bytes;
                p->split_pieces++;
            }
            piece = (piece_t){head->dst + p->head_offset, head->src + p->head_offset, take, head->token,
                              head->queued};
            p->head_offset += take;
            if (p->head_offset == head->n) {
                p->head_offset = 0;
                p->normal_head = (p->normal_head + 1) % p->normal_cap;
                p->normal_count--;
            }
        }
        submit(p, piece, express, now);
    }
}

/* Spin about ``ns`` without the lock, then let another thread run. */
static void relax(int64_t ns) {
    int64_t until = now_ns() + ns;
    while (now_ns() < until) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
    }
    sched_yield();
}

static int busy(pump_t *p) { return p->flights || p->express_count || p->normal_count; }

static void *pump_thread(void *arg) {
    pump_t *p = arg;
    block_signals();
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stopping && !busy(p)) pthread_cond_wait(&p->work, &p->mu);
        if (p->stopping && !busy(p)) break;
        advance(p);
        /* Spin while there is work, outside the lock so callers get it at once: a piece's
         * end is seen within a µs or two and the next piece goes on in time; yielding lets
         * the other threads of a small machine run. */
        pthread_mutex_unlock(&p->mu);
        relax(1000);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* -- the API (controller/pump.py) --------------------------------------------------------- */

pump_t *pump_create(int cuda, void *ctx, void *stream, double bytes_per_s, double host_bytes_per_s,
                    int64_t lead_ns, int64_t overhead_ns, uint64_t piece_bytes, uint64_t split_bytes,
                    int64_t recent_ns) {
    pump_t *p = calloc(1, sizeof(pump_t));
    if (!p) return NULL;
    p->cuda = cuda;
    p->ctx = ctx;
    p->stream = stream;
    p->bytes_per_ns = bytes_per_s > 0 ? bytes_per_s / 1e9 : 1.0;
    p->host_bytes_per_ns = host_bytes_per_s > 0 ? host_bytes_per_s / 1e9 : 0;
    p->lead_ns = p->min_lead_ns = lead_ns;
    p->max_lead_ns = lead_ns + 50000;
    p->piece_bytes = piece_bytes;
    p->overhead_ns = overhead_ns;
    p->split_bytes = split_bytes;
    p->recent_ns = recent_ns;
    p->last_express = INT64_MIN / 2;
    p->normal_cap = 64;
    p->normal = malloc(sizeof(piece_t) * p->normal_cap);
    if (!p->normal) { free(p); return NULL; }
    if (cuda) {
        CUctx popped;
        if (cu.push(ctx)) { free(p->normal); free(p); return NULL; }
        int ok = 1;
        for (int i = 0; i < HW_SLOTS; i++) {
            ok = ok && !cu.event_create(&p->events[i], CU_EVENT_DISABLE_TIMING);
            p->event_free[i] = 1;
        }
        cu.pop(&popped);
        if (!ok) { free(p->normal); free(p); return NULL; }
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    pthread_cond_init(&p->host_work, NULL);
    if (!cuda) pthread_create(&p->host_thread, NULL, host_engine, p);
    pthread_create(&p->thread, NULL, pump_thread, p);
    return p;
}

/* Queue pieces (dst, src, n triples) as one token; returns it, or PUMP_BUSY / PUMP_BAD. */
int pump_issue(pump_t *p, const uint64_t *triples, int count, int express) {
    uint64_t total = 0;
    if (count < 1 || (express && count > EXPRESS_CAP)) return PUMP_BAD;
    for (int i = 0; i < count; i++) total += triples[3 * i + 2];
    pthread_mutex_lock(&p->mu);
    if (p->stopping) { pthread_mutex_unlock(&p->mu); return PUMP_CLOSED; }
    int token = token_new(p, total);
    if (token < 0 || (express && p->express_count + count > EXPRESS_CAP)) {
        if (token >= 0) p->tokens[token].used = 0;
        pthread_mutex_unlock(&p->mu);
        return PUMP_BUSY;
    }
    int64_t now = now_ns();
    for (int i = 0; i < count; i++) {
        piece_t piece = {triples[3 * i], triples[3 * i + 1], triples[3 * i + 2], token, now};
        if (!piece.n) continue;
        if (express) {
            p->express[(p->express_head + p->express_count) % EXPRESS_CAP] = piece;
            p->express_count++;
        } else if (normal_push(p, piece)) {
            p->tokens[token].error = PUMP_BUSY;      /* what was queued still runs; then fails */
            p->tokens[token].remaining -= piece.n;
        }
    }
    if (express) p->last_express = now;
    advance(p);                   /* an idle engine takes the first piece from this thread */
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->mu);
    return token;
}

/* Wait for a token: spin (advancing the pump) for up to spin_ns, then sleep. Returns its
 * error (0, a CUresult, or PUMP_BAD for an unknown token) and frees it. */
int pump_wait(pump_t *p, int token, int64_t spin_ns) {
    if (token < 0 || token >= TOKENS) return PUMP_BAD;
    int64_t until = now_ns() + spin_ns;
    pthread_mutex_lock(&p->mu);
    if (!p->tokens[token].used) { pthread_mutex_unlock(&p->mu); return PUMP_BAD; }
    pthread_mutex_unlock(&p->mu);
    /* Spin without the lock; now and then help the pump (it may be waking up). */
    while (__atomic_load_n(&p->tokens[token].remaining, __ATOMIC_ACQUIRE) && now_ns() < until) {
        relax(1000);
        if (!pthread_mutex_trylock(&p->mu)) {
            advance(p);
            pthread_mutex_unlock(&p->mu);
        }
    }
    pthread_mutex_lock(&p->mu);
    while (p->tokens[token].remaining) {
        p->sleepers++;
        pthread_cond_wait(&p->done, &p->mu);
        p->sleepers--;
    }
    int error = p->tokens[token].error;
    p->tokens[token].used = 0;
    pthread_mutex_unlock(&p->mu);
    return error;
}

/* Counters: submitted pieces, split pieces, express pieces, bytes done, learnt rate (B/s),
 * express pieces' summed queue and copy seconds, times the engine ran dry with work
 * waiting, the lead now (s). */
void pump_stats(pump_t *p, double *out) {
    pthread_mutex_lock(&p->mu);
    out[0] = p->submitted_pieces;
    out[1] = p->split_pieces;
    out[2] = p->express_pieces;
    out[3] = p->bytes_done;
    out[4] = p->bytes_per_ns * 1e9;
    out[5] = p->express_queue_ns / 1e9;
    out[6] = p->express_copy_ns / 1e9;
    out[7] = p->idles;
    out[8] = p->lead_ns / 1e9;
    pthread_mutex_unlock(&p->mu);
}

/* Stop once everything queued has finished. The pump's memory is kept (a few KB, once per
 * link): a thread still returning from pump_wait, or a late pump_issue (PUMP_CLOSED), may
 * touch it. */
void pump_close(pump_t *p) {
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->thread, NULL);
    if (!p->cuda) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_signal(&p->host_work);
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->host_thread, NULL);
    } else {
        for (int i = 0; i < HW_SLOTS; i++) cu.event_destroy(p->events[i]);
    }
}
