/* A small pool of worker threads for one runner step, safe across fork.
 *
 * llm_parallel(fn, ctx, n) runs fn(ctx, t, n) for t = 0..n-1, t = 0 on the caller, the rest
 * on workers, and returns when all have finished. Which thread runs which t never changes
 * what is computed: callers give each t a fixed share of the outputs.
 *
 * Why not OpenMP: libgomp's threads do not survive fork, and a forked child that enters a
 * parallel region hangs for ever. libllm programs and the benchmarks fork after computing;
 * a fork handler marks this pool empty in the child, which starts its own workers afresh.
 * (On Python 3.12+ a later os.fork() in a process whose pool has workers warns that the
 * process is multi-threaded: it is, and the child is still safe.)
 *
 * Workers spin briefly on the generation counter before sleeping on a condition variable,
 * so the ~100 hand-offs of a step cost microseconds, and an idle runner uses no CPU.
 */
#ifndef LLM_POOL_H
#define LLM_POOL_H

#include <pthread.h>
#include <stdint.h>

#define LLM_MAX_THREADS 64
#define LLM_SPIN 20000
#if defined(__x86_64__) || defined(__i386__)
#define LLM_PAUSE() __builtin_ia32_pause()
#else
#define LLM_PAUSE() ((void)0)
#endif

typedef void (*llm_task)(void *ctx, int t, int n);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    int started;              /* mutex and condvars made, fork handler registered */
    int workers;              /* started, each waits for the next generation */
    long generation;          /* bumped once per llm_parallel call */
    long born;                /* the generation a worker being started has already seen */
    int pending;              /* workers still running the current generation */
    llm_task fn;
    void *ctx;
    int n;
} llm_pool;

static void *llm_worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    /* Not the current generation: the master may bump it before this thread runs. */
    pthread_mutex_lock(&llm_pool.mu);
    long seen = llm_pool.born;
    pthread_mutex_unlock(&llm_pool.mu);
    for (;;) {
        for (int i = 0; i < LLM_SPIN && __atomic_load_n(&llm_pool.generation, __ATOMIC_ACQUIRE) == seen; i++)
            LLM_PAUSE();
        pthread_mutex_lock(&llm_pool.mu);
        while (llm_pool.generation == seen) pthread_cond_wait(&llm_pool.go, &llm_pool.mu);
        seen = llm_pool.generation;
        llm_task fn = llm_pool.fn;
        void *ctx = llm_pool.ctx;
        const int n = llm_pool.n;
        pthread_mutex_unlock(&llm_pool.mu);
        if (id < n) fn(ctx, id, n);
        pthread_mutex_lock(&llm_pool.mu);
        if (__atomic_sub_fetch(&llm_pool.pending, 1, __ATOMIC_ACQ_REL) == 0)
            pthread_cond_signal(&llm_pool.done);
        pthread_mutex_unlock(&llm_pool.mu);
    }
    return NULL;
}

static void llm_pool_init(void) {
    pthread_mutex_init(&llm_pool.mu, NULL);
    pthread_cond_init(&llm_pool.go, NULL);
    pthread_cond_init(&llm_pool.done, NULL);
    llm_pool.workers = 0;
    llm_pool.pending = 0;
}

/* In a forked child only the forking thread exists: no workers, fresh locks. */
static void llm_pool_after_fork_child(void) { llm_pool_init(); }

/* Workers 1..n-1 exist in this process. Returns how many threads may take part (fewer if a
   thread could not be started: the caller's shares then run on fewer threads, same bits). */
static int llm_pool_ready(int n) {
    if (!llm_pool.started) {
        llm_pool_init();
        pthread_atfork(NULL, NULL, llm_pool_after_fork_child);
        llm_pool.started = 1;
    }
    llm_pool.born = llm_pool.generation;
    while (llm_pool.workers < n - 1) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&tid, &attr, llm_worker, (void *)(intptr_t)(llm_pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        llm_pool.workers++;
    }
    return llm_pool.workers + 1 < n ? llm_pool.workers + 1 : n;
}

/* One llm_parallel at a time per process (a runner computes one step at a time). */
static void llm_parallel(llm_task fn, void *ctx, int n) {
    if (n > 1) n = llm_pool_ready(n);
    if (n <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&llm_pool.mu);
    llm_pool.fn = fn;
    llm_pool.ctx = ctx;
    llm_pool.n = n;
    llm_pool.pending = llm_pool.workers;
    __atomic_add_fetch(&llm_pool.generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&llm_pool.go);
    pthread_mutex_unlock(&llm_pool.mu);
    fn(ctx, 0, n);
    for (int i = 0; i < LLM_SPIN && __atomic_load_n(&llm_pool.pending, __ATOMIC_ACQUIRE) > 0; i++)
        LLM_PAUSE();
    pthread_mutex_lock(&llm_pool.mu);
    while (llm_pool.pending > 0) pthread_cond_wait(&llm_pool.done, &llm_pool.mu);
    pthread_mutex_unlock(&llm_pool.mu);
}

#endif
