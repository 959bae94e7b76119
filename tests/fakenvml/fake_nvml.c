/*
 * A fake libnvidia-ml.so.1 for tests: the NVML entry points that agent/gpu/nvml.py reaches through
 * nvidia-ml-py (pynvml), over GPUs that exist only in a state file.
 *
 * Where it sits: tests load it instead of the driver's library (LD_LIBRARY_PATH=<dir> for a subprocess
 * agent, or a preloaded ctypes.CDLL(..., RTLD_GLOBAL) in-process), so the real NvmlBackend and pynvml's
 * own error classes run unchanged. Built by tests/fakenvml/__init__.py:build_fake_nvml with
 * `gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1`.
 *
 * State lives in a text FILE (path in env FAKE_NVML_STATE), `key=value` per line, read and rewritten
 * under flock(LOCK_EX) by every call. Why a file: a test process can see what a subprocess agent set,
 * and the state (locked clocks, power limit, energy counter) survives a kill -9 of the agent and its
 * restart, like a real driver's. A missing file or missing keys take the defaults below (so a test may
 * write a partial file before the first call, e.g. `gpus=8`); FAKE_NVML_GPUS gives the GPU count of a
 * file created from nothing. Unknown keys are dropped on the next rewrite (the Python helper validates
 * keys before writing).
 *
 * Global keys: gpus, sm_clock_min_mhz / sm_clock_max_mhz / sm_clock_step_mhz (H100 SXM: 345..1980 in
 * 15 MHz steps), mem_clocks_mhz (comma list, default "2619,1593"), min/max/default_power_limit_mw
 * (200/700/700 W), idle_power_w, peak_power_w, updated_ns (CLOCK_MONOTONIC of the last energy update),
 * and injection: deny_set_clocks=1 / deny_set_power=1 (setters return NVML_ERROR_NO_PERMISSION),
 * fail_next=<entry>[,<entry>...] (each entry fails one matching call, then is removed) and
 * fail_always=<entry>[,...] (never removed); entry = <nvml function name>:<return code>[:<gpu index>].
 * Per-GPU keys, prefix gpu<i>.: locked_min_mhz / locked_max_mhz (0 = unlocked), power_limit_mw,
 * energy_mj, load_pct (how busy the GPU pretends to be), mem_used_bytes.
 *
 * Physics (deterministic): with load L = load_pct/100 and SM clock f, power = idle + L * (peak - idle)
 * * (f / f_max)^2. f is the top of the locked range (f_max when unlocked); when that power exceeds the
 * power limit, f drops to the highest step that fits and reason 0x4 (SW power cap) is reported; an idle
 * GPU (L = 0) runs at the bottom of its range with reason 0x1. The energy counter integrates that power
 * exactly, piecewise constant between calls, over CLOCK_MONOTONIC.
 *
 * Environment knobs (read on every call, see env_gpu_value): FAKE_NVML_SM_CLOCK_CAP_MHZ caps the SM
 * clock (a GPU that cannot hold its lock, reason 0x20), FAKE_NVML_COMPUTE_PIDS lists compute processes
 * per GPU (nvmlDeviceGetComputeRunningProcesses_v3; none by default). FAKE_NVML_BLOCK_ON and
 * FAKE_NVML_BLOCK_PATH park a chosen call so a test can kill -9 the agent there (see "test hold").
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st {
    char unused; /* a handle is the address of one element of g_devices; its offset is the index */
} *nvmlDevice_t;
typedef struct {
    unsigned gpu;
    unsigned memory;
} nvmlUtilization_t;
typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_UNKNOWN = 999,
};
enum { NVML_CLOCK_GRAPHICS = 0, NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2, NVML_CLOCK_VIDEO = 3 };
enum { NVML_TEMPERATURE_GPU = 0 };
enum { REASON_GPU_IDLE = 0x1, REASON_SW_POWER_CAP = 0x4 };

#define MAX_GPUS 64
#define MAX_MEM_CLOCKS 8
#define MAX_FAIL_CHARS 512
/* Last line of a state file written by the library: it rewrites in place and trims afterwards, so a
 * kill between the two leaves the old file's tail after this line, where nobody reads. */
#define END_LINE "# end"
#define MEM_TOTAL_BYTES (81559ULL * 1024 * 1024) /* what an H100 80GB HBM3 reports */

struct gpu_state {
    unsigned locked_min_mhz;
    unsigned locked_max_mhz;
    unsigned power_limit_mw;
    double energy_mj;
    unsigned load_pct;
    unsigned long long mem_used_bytes;
};

struct state {
    unsigned gpus;
    unsigned sm_clock_min_mhz, sm_clock_max_mhz, sm_clock_step_mhz;
    unsigned mem_clocks_mhz[MAX_MEM_CLOCKS];
    unsigned n_mem_clocks;
    unsigned min_power_limit_mw, max_power_limit_mw, default_power_limit_mw;
    double idle_power_w, peak_power_w;
    unsigned deny_set_clocks, deny_set_power;
    char fail_next[MAX_FAIL_CHARS];
    char fail_always[MAX_FAIL_CHARS];
    long long updated_ns;
    struct gpu_state gpu[MAX_GPUS];
};

static struct nvmlDevice_st g_devices[MAX_GPUS];
static int g_init_count; /* nvmlInit/nvmlShutdown nesting, like the driver's library */

EXPORT int fakeNvmlIsFake(void) { return 1; }

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void set_defaults(struct state *s) {
    memset(s, 0, sizeof *s);
    const char *env_gpus = getenv("FAKE_NVML_GPUS");
    long gpus = env_gpus ? strtol(env_gpus, NULL, 10) : 2;
    s->gpus = (gpus >= 1 && gpus <= MAX_GPUS) ? (unsigned)gpus : 2;
    s->sm_clock_min_mhz = 345;
    s->sm_clock_max_mhz = 1980;
    s->sm_clock_step_mhz = 15;
    s->mem_clocks_mhz[0] = 2619;
    s->mem_clocks_mhz[1] = 1593;
    s->n_mem_clocks = 2;
    s->min_power_limit_mw = 200000;
    s->max_power_limit_mw = 700000;
    s->default_power_limit_mw = 700000;
    s->idle_power_w = 70.0;
    s->peak_power_w = 700.0;
    s->updated_ns = now_ns();
    for (unsigned i = 0; i < MAX_GPUS; i++) {
        s->gpu[i].power_limit_mw = s->default_power_limit_mw;
        s->gpu[i].load_pct = 60;
        s->gpu[i].mem_used_bytes = 512ULL * 1024 * 1024;
    }
}

static void parse_mem_clocks(struct state *s, const char *value) {
    s->n_mem_clocks = 0;
    const char *p = value;
    while (*p && s->n_mem_clocks < MAX_MEM_CLOCKS) {
        char *end;
        unsigned long v = strtoul(p, &end, 10);
        if (end == p) break;
        s->mem_clocks_mhz[s->n_mem_clocks++] = (unsigned)v;
        p = (*end == ',') ? end + 1 : end;
    }
}

static void parse_line(struct state *s, char *key, char *value) {
    if (strncmp(key, "gpu", 3) == 0 && key[3] >= '0' && key[3] <= '9') {
        char *dot;
        unsigned long i = strtoul(key + 3, &dot, 10);
        if (*dot != '.' || i >= MAX_GPUS) return;
        struct gpu_state *g = &s->gpu[i];
        const char *field = dot + 1;
        if (!strcmp(field, "locked_min_mhz")) g->locked_min_mhz = (unsigned)strtoul(value, NULL, 10);
        else if (!strcmp(field, "locked_max_mhz")) g->locked_max_mhz = (unsigned)strtoul(value, NULL, 10);
        else if (!strcmp(field, "power_limit_mw")) g->power_limit_mw = (unsigned)strtoul(value, NULL, 10);
        else if (!strcmp(field, "energy_mj")) g->energy_mj = strtod(value, NULL);
        else if (!strcmp(field, "load_pct")) g->load_pct = (unsigned)strtoul(value, NULL, 10);
        else if (!strcmp(field, "mem_used_bytes")) g->mem_used_bytes = strtoull(value, NULL, 10);
        return;
    }
    if (!strcmp(key, "gpus")) {
        unsigned long n = strtoul(value, NULL, 10);
        if (n >= 1 && n <= MAX_GPUS) s->gpus = (unsigned)n;
    } else if (!strcmp(key, "sm_clock_min_mhz")) s->sm_clock_min_mhz = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "sm_clock_max_mhz")) s->sm_clock_max_mhz = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "sm_clock_step_mhz")) s->sm_clock_step_mhz = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "mem_clocks_mhz")) parse_mem_clocks(s, value);
    else if (!strcmp(key, "min_power_limit_mw")) s->min_power_limit_mw = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "max_power_limit_mw")) s->max_power_limit_mw = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "default_power_limit_mw"))
        s->default_power_limit_mw = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "idle_power_w")) s->idle_power_w = strtod(value, NULL);
    else if (!strcmp(key, "peak_power_w")) s->peak_power_w = strtod(value, NULL);
    else if (!strcmp(key, "deny_set_clocks")) s->deny_set_clocks = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "deny_set_power")) s->deny_set_power = (unsigned)strtoul(value, NULL, 10);
    else if (!strcmp(key, "fail_next")) snprintf(s->fail_next, sizeof s->fail_next, "%s", value);
    else if (!strcmp(key, "fail_always")) snprintf(s->fail_always, sizeof s->fail_always, "%s", value);
    else if (!strcmp(key, "updated_ns")) s->updated_ns = strtoll(value, NULL, 10);
}

/* Parses the file's text over the defaults; a per-GPU power limit absent from the file follows a
 * default_power_limit_mw that is present, as a fresh driver would. */
static void parse_state(struct state *s, char *text) {
    int limit_seen[MAX_GPUS] = {0};
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (!strcmp(line, END_LINE)) break; /* bytes after it are a longer predecessor's tail */
        if (line[0] == '#') continue;
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = '\0';
        char *value = eq + 1;
        size_t n = strlen(value);
        while (n && (value[n - 1] == '\r' || value[n - 1] == ' ')) value[--n] = '\0';
        unsigned long i;
        char *dot;
        if (!strncmp(line, "gpu", 3) && (i = strtoul(line + 3, &dot, 10)) < MAX_GPUS && *dot == '.' &&
            !strcmp(dot + 1, "power_limit_mw"))
            limit_seen[i] = 1;
        parse_line(s, line, value);
    }
    for (unsigned i = 0; i < MAX_GPUS; i++)
        if (!limit_seen[i]) s->gpu[i].power_limit_mw = s->default_power_limit_mw;
}

static int format_state(const struct state *s, char *buf, size_t size) {
    size_t off = 0;
#define EMIT(...)                                                         \
    do {                                                                  \
        int k = snprintf(buf + off, size - off, __VA_ARGS__);             \
        if (k < 0 || (size_t)k >= size - off) return -1;                  \
        off += (size_t)k;                                                 \
    } while (0)
    EMIT("# fake NVML state (tests/fakenvml/fake_nvml.c); key=value, rewritten on every NVML call\n");
    EMIT("gpus=%u\n", s->gpus);
    EMIT("sm_clock_min_mhz=%u\nsm_clock_max_mhz=%u\nsm_clock_step_mhz=%u\n", s->sm_clock_min_mhz,
         s->sm_clock_max_mhz, s->sm_clock_step_mhz);
    EMIT("mem_clocks_mhz=");
    for (unsigned j = 0; j < s->n_mem_clocks; j++) EMIT(j ? ",%u" : "%u", s->mem_clocks_mhz[j]);
    EMIT("\n");
    EMIT("min_power_limit_mw=%u\nmax_power_limit_mw=%u\ndefault_power_limit_mw=%u\n", s->min_power_limit_mw,
         s->max_power_limit_mw, s->default_power_limit_mw);
    EMIT("idle_power_w=%.17g\npeak_power_w=%.17g\n", s->idle_power_w, s->peak_power_w);
    EMIT("deny_set_clocks=%u\ndeny_set_power=%u\n", s->deny_set_clocks, s->deny_set_power);
    EMIT("fail_next=%s\nfail_always=%s\n", s->fail_next, s->fail_always);
    EMIT("updated_ns=%lld\n", s->updated_ns);
    for (unsigned i = 0; i < s->gpus; i++) {
        const struct gpu_state *g = &s->gpu[i];
        EMIT("gpu%u.locked_min_mhz=%u\ngpu%u.locked_max_mhz=%u\n", i, g->locked_min_mhz, i, g->locked_max_mhz);
        EMIT("gpu%u.power_limit_mw=%u\ngpu%u.energy_mj=%.17g\n", i, g->power_limit_mw, i, g->energy_mj);
        EMIT("gpu%u.load_pct=%u\ngpu%u.mem_used_bytes=%llu\n", i, g->load_pct, i, g->mem_used_bytes);
    }
    EMIT("%s\n", END_LINE);
#undef EMIT
    return (int)off;
}

/* ---- physics ---- */

struct operating_point {
    unsigned sm_clock_mhz;
    double power_w;
    unsigned long long reasons;
};

/* Environment knobs read on every call (not state-file keys), as comma-separated <gpu>:<value>[:<value>]
 * entries (or one bare value for every GPU where noted):
 *   FAKE_NVML_SM_CLOCK_CAP_MHZ   <mhz> or <gpu>:<mhz>: the SM clock never exceeds mhz (a GPU that cannot
 *                                hold a higher lock); reason 0x20 (SW thermal slowdown) when it bites.
 *   FAKE_NVML_COMPUTE_PIDS       <gpu>:<pid>[:<used bytes>]: processes nvmlDeviceGetComputeRunningProcesses
 *                                lists on that GPU (default used memory 1 GiB). */
#define REASON_SW_THERMAL_SLOWDOWN 0x20ULL
#define MAX_FAKE_PROCESSES 32

/* The value for `gpu` in env `name` (bare values apply to every GPU); 0 when absent. */
static unsigned long long env_gpu_value(const char *name, int gpu) {
    const char *p = getenv(name);
    unsigned long long found = 0;
    while (p && *p) {
        char *rest;
        unsigned long long first = strtoull(p, &rest, 10);
        if (rest == p) break;
        if (*rest == ':') {
            const char *second = rest + 1;
            unsigned long long value = strtoull(second, &rest, 10);
            if ((int)first == gpu) found = value;
        } else {
            found = first;
        }
        while (*rest && *rest != ',') rest++;
        p = *rest == ',' ? rest + 1 : rest;
    }
    return found;
}

static double power_at(const struct state *s, const struct gpu_state *g, unsigned clock_mhz) {
    double load = g->load_pct / 100.0;
    double ratio = (double)clock_mhz / (double)s->sm_clock_max_mhz;
    return s->idle_power_w + load * (s->peak_power_w - s->idle_power_w) * ratio * ratio;
}

static struct operating_point operating_point(const struct state *s, const struct gpu_state *g) {
    struct operating_point op = {0, 0.0, 0};
    int locked = g->locked_max_mhz != 0;
    unsigned top = locked ? g->locked_max_mhz : s->sm_clock_max_mhz;
    unsigned bottom = locked ? g->locked_min_mhz : s->sm_clock_min_mhz;
    if (g->load_pct == 0) {
        op.sm_clock_mhz = bottom;
        op.reasons = REASON_GPU_IDLE;
    } else {
        op.sm_clock_mhz = top;
        double limit_w = g->power_limit_mw / 1000.0;
        while (power_at(s, g, op.sm_clock_mhz) > limit_w && op.sm_clock_mhz > s->sm_clock_min_mhz) {
            op.sm_clock_mhz = op.sm_clock_mhz >= s->sm_clock_min_mhz + s->sm_clock_step_mhz
                                  ? op.sm_clock_mhz - s->sm_clock_step_mhz
                                  : s->sm_clock_min_mhz;
            op.reasons = REASON_SW_POWER_CAP;
        }
    }
    unsigned long long cap_mhz = env_gpu_value("FAKE_NVML_SM_CLOCK_CAP_MHZ", (int)(g - s->gpu));
    if (cap_mhz && op.sm_clock_mhz > cap_mhz) {
        op.sm_clock_mhz = (unsigned)cap_mhz;
        op.reasons |= REASON_SW_THERMAL_SLOWDOWN;
    }
    op.power_w = power_at(s, g, op.sm_clock_mhz);
    return op;
}

static void advance_energy(struct state *s) {
    long long t = now_ns();
    long long dt_ns = t - s->updated_ns;
    if (dt_ns > 0) /* a reboot restarts CLOCK_MONOTONIC: count nothing for that gap */
        for (unsigned i = 0; i < s->gpus; i++)
            s->gpu[i].energy_mj += operating_point(s, &s->gpu[i]).power_w * (double)dt_ns / 1e6;
    s->updated_ns = t;
}

/* ---- state file I/O: every call is lock, load, act, store, unlock ---- */

struct session {
    int fd;
    struct state st;
    const char *fn; /* the device function of this session (begin_device); NULL for the others */
};

static nvmlReturn_t open_state(struct session *ss) {
    ss->fn = NULL;
    const char *path = getenv("FAKE_NVML_STATE");
    if (!path || !*path) {
        fprintf(stderr, "fake NVML: FAKE_NVML_STATE is not set (path of the fake's state file)\n");
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    ss->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (ss->fd < 0) {
        fprintf(stderr, "fake NVML: cannot open %s: %s\n", path, strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    if (flock(ss->fd, LOCK_EX) != 0) {
        fprintf(stderr, "fake NVML: cannot lock %s: %s\n", path, strerror(errno));
        close(ss->fd);
        return NVML_ERROR_UNKNOWN;
    }
    struct stat sb;
    if (fstat(ss->fd, &sb) != 0) {
        close(ss->fd);
        return NVML_ERROR_UNKNOWN;
    }
    set_defaults(&ss->st);
    char *text = malloc((size_t)sb.st_size + 1);
    if (!text) {
        close(ss->fd);
        return NVML_ERROR_UNKNOWN;
    }
    ssize_t got = pread(ss->fd, text, (size_t)sb.st_size, 0);
    text[got > 0 ? got : 0] = '\0';
    parse_state(&ss->st, text);
    free(text);
    advance_energy(&ss->st);
    return NVML_SUCCESS;
}

static nvmlReturn_t close_state(struct session *ss) {
    char buf[MAX_GPUS * 256 + 4096];
    int n = format_state(&ss->st, buf, sizeof buf);
    nvmlReturn_t rc = NVML_SUCCESS;
    /* Overwrite in place, then trim: truncating to zero first makes ext4 free and reallocate the block
     * on every call (10x slower). */
    if (n < 0 || pwrite(ss->fd, buf, (size_t)n, 0) != n || ftruncate(ss->fd, n) != 0) {
        fprintf(stderr, "fake NVML: cannot write the state file: %s\n", strerror(errno));
        rc = NVML_ERROR_UNKNOWN;
    }
    close(ss->fd); /* releases the flock */
    return rc;
}

/* Finds the first entry of `list` matching (fn, gpu); returns its code, and removes it when `consume`. */
static int match_failure(char *list, const char *fn, int gpu, int consume) {
    size_t fn_len = strlen(fn);
    char *entry = list;
    while (*entry) {
        char *end = strchr(entry, ',');
        size_t len = end ? (size_t)(end - entry) : strlen(entry);
        if (len > fn_len && !strncmp(entry, fn, fn_len) && entry[fn_len] == ':') {
            char *after;
            long code = strtol(entry + fn_len + 1, &after, 10);
            int entry_gpu = (*after == ':') ? (int)strtol(after + 1, NULL, 10) : -1;
            if (entry_gpu == -1 || entry_gpu == gpu) {
                if (consume) {
                    char *next = end ? end + 1 : entry + len;
                    memmove(entry, next, strlen(next) + 1);
                    size_t l = strlen(list);
                    if (l && list[l - 1] == ',') list[l - 1] = '\0';
                }
                return (int)code;
            }
        }
        entry = end ? end + 1 : entry + len;
    }
    return 0;
}

static int injected(struct state *s, const char *fn, int gpu) {
    int code = match_failure(s->fail_next, fn, gpu, 1);
    return code ? code : match_failure(s->fail_always, fn, gpu, 0);
}

static int initialized(void) { return __atomic_load_n(&g_init_count, __ATOMIC_SEQ_CST) > 0; }

/* ---- test hold: stop the calling thread at a chosen call, e.g. to kill -9 the agent there ----
 * FAKE_NVML_BLOCK_ON=<function>[@<n>]: the n-th call (default: first) of <function> in this process
 * waits before it acts. FAKE_NVML_BLOCK_ON=after:<function>[@<n>]: once the n-th call of <function>
 * has succeeded, the next device call on the same thread waits (in the agent: the next call on that
 * GPU's worker thread, i.e. after the hardware write and before what follows it). A waiting call
 * creates the file FAKE_NVML_BLOCK_PATH (content: the function) and polls until the file
 * FAKE_NVML_BLOCK_PATH.release exists. Calls are counted, and the hold happens once, per path (an
 * existing FAKE_NVML_BLOCK_PATH means it happened); it waits outside the state file's lock. */
static pthread_mutex_t g_hold_mutex = PTHREAD_MUTEX_INITIALIZER;
static char g_hold_path[4096]; /* the FAKE_NVML_BLOCK_PATH that g_hold_calls counts for */
static long g_hold_calls;
static __thread int t_hold_next;

/* True when `fn` is the n-th counted call of the FAKE_NVML_BLOCK_ON function of kind `after`. */
static int hold_counts(const char *fn, int after) {
    const char *on = getenv("FAKE_NVML_BLOCK_ON");
    const char *path = getenv("FAKE_NVML_BLOCK_PATH");
    if (!on || !path || !*path) return 0;
    int is_after = !strncmp(on, "after:", 6);
    if (is_after != after) return 0;
    on += after ? 6 : 0;
    const char *at = strchr(on, '@');
    size_t len = at ? (size_t)(at - on) : strlen(on);
    if (strlen(fn) != len || strncmp(on, fn, len)) return 0;
    long nth = at ? strtol(at + 1, NULL, 10) : 1;
    pthread_mutex_lock(&g_hold_mutex);
    if (strcmp(g_hold_path, path)) {
        snprintf(g_hold_path, sizeof g_hold_path, "%s", path);
        g_hold_calls = 0;
    }
    int hit = ++g_hold_calls == nth;
    pthread_mutex_unlock(&g_hold_mutex);
    return hit;
}

static void hold(const char *fn) {
    if (!t_hold_next && !hold_counts(fn, 0)) return;
    t_hold_next = 0;
    const char *path = getenv("FAKE_NVML_BLOCK_PATH");
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return; /* held once already for this path */
    dprintf(fd, "%s\n", fn);
    close(fd);
    char release[4096];
    snprintf(release, sizeof release, "%s.release", path);
    while (access(release, F_OK) != 0) usleep(1000);
}

/* Opens the state for a device call: checks init, the handle and injected failures. */
static nvmlReturn_t begin_device(struct session *ss, const char *fn, nvmlDevice_t device, struct gpu_state **g) {
    if (!initialized()) return NVML_ERROR_UNINITIALIZED;
    hold(fn);
    nvmlReturn_t rc = open_state(ss);
    if (rc != NVML_SUCCESS) return rc;
    ss->fn = fn;
    if (device < g_devices || device >= g_devices + ss->st.gpus) {
        close_state(ss);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    int code = injected(&ss->st, fn, (int)(device - g_devices));
    if (code) {
        close_state(ss);
        return code;
    }
    *g = &ss->st.gpu[device - g_devices];
    return NVML_SUCCESS;
}

static nvmlReturn_t end(struct session *ss, nvmlReturn_t rc) {
    nvmlReturn_t wrc = close_state(ss);
    rc = rc != NVML_SUCCESS ? rc : wrc;
    if (rc == NVML_SUCCESS && ss->fn && hold_counts(ss->fn, 1)) t_hold_next = 1;
    return rc;
}

#define BEGIN(fn, device)                                 \
    struct session ss;                                    \
    struct gpu_state *g;                                  \
    nvmlReturn_t brc = begin_device(&ss, fn, device, &g); \
    if (brc != NVML_SUCCESS) return brc;

/* ---- library ---- */

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned flags) {
    (void)flags;
    struct session ss;
    nvmlReturn_t rc = open_state(&ss);
    if (rc != NVML_SUCCESS) return rc;
    int code = injected(&ss.st, "nvmlInitWithFlags", -1);
    rc = end(&ss, code);
    if (rc == NVML_SUCCESS) __atomic_add_fetch(&g_init_count, 1, __ATOMIC_SEQ_CST);
    return rc;
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void) {
    int count = __atomic_load_n(&g_init_count, __ATOMIC_SEQ_CST);
    while (count > 0 &&
           !__atomic_compare_exchange_n(&g_init_count, &count, count - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return count > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
        case 0: return "Success";
        case 1: return "Uninitialized";
        case 2: return "Invalid Argument";
        case 3: return "Not Supported";
        case 4: return "Insufficient Permissions";
        case 5: return "Already Initialized";
        case 6: return "Not Found";
        case 7: return "Insufficient Size";
        case 8: return "Insufficient External Power";
        case 9: return "Driver Not Loaded";
        case 10: return "Timeout";
        case 11: return "Interrupt Request Issue";
        case 12: return "NVML Shared Library Not Found";
        case 13: return "Function Not Found";
        case 14: return "Corrupted infoROM";
        case 15: return "GPU is lost";
        case 16: return "GPU requires restart";
        case 17: return "The operating system has blocked the request.";
        case 18: return "RM has detected an NVML/RM version mismatch.";
        case 19: return "In use by another client";
        case 20: return "Insufficient Memory";
        case 21: return "No data";
        case 22: return "The requested vgpu operation is not available on target device, becasue ECC is enabled";
        case 23: return "Ran out of critical resources, other than memory";
        case 24: return "The requested frequency is not supported";
        case 25: return "The provided version is invalid/unsupported";
        case 26: return "The requested functionality has been deprecated";
        case 27: return "The system is not ready for the request";
        case 28: return "No GPUs were found";
        case 29: return "Resource not in correct state to perform requested operation";
        case 30: return "The requested reset type is not supported";
        default: return "Unknown Error";
    }
}

static nvmlReturn_t copy_string(const char *value, char *out, unsigned length) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned length) {
    if (!initialized()) return NVML_ERROR_UNINITIALIZED;
    return copy_string("550.54.15-fake", version, length);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned length) {
    if (!initialized()) return NVML_ERROR_UNINITIALIZED;
    return copy_string("12.550.54.15-fake", version, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) {
    if (!initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    struct session ss;
    nvmlReturn_t rc = open_state(&ss);
    if (rc != NVML_SUCCESS) return rc;
    int code = injected(&ss.st, "nvmlDeviceGetCount_v2", -1);
    if (!code) *count = ss.st.gpus;
    return end(&ss, code);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device) {
    if (!initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    struct session ss;
    nvmlReturn_t rc = open_state(&ss);
    if (rc != NVML_SUCCESS) return rc;
    int code = injected(&ss.st, "nvmlDeviceGetHandleByIndex_v2", (int)index);
    if (!code && index >= ss.st.gpus) code = NVML_ERROR_INVALID_ARGUMENT;
    if (!code) *device = &g_devices[index];
    return end(&ss, code);
}

/* ---- device: inventory ---- */

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned length) {
    BEGIN("nvmlDeviceGetName", device);
    (void)g;
    return end(&ss, copy_string("NVIDIA H100 80GB HBM3", name, length));
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned length) {
    BEGIN("nvmlDeviceGetUUID", device);
    (void)g;
    char value[64];
    snprintf(value, sizeof value, "GPU-fa4e0000-0000-4000-8000-%012x", (unsigned)(device - g_devices));
    return end(&ss, copy_string(value, uuid, length));
}

/* nvmlPciInfo_t as nvml.h lays it out since NVML 9 (busIdLegacy kept for ABI compatibility). */
typedef struct {
    char busIdLegacy[16];
    unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    BEGIN("nvmlDeviceGetPciInfo_v3", device);
    (void)g;
    if (!pci) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    memset(pci, 0, sizeof *pci);
    pci->bus = 0x18 + (unsigned)(device - g_devices);
    pci->pciDeviceId = 0x233010DE; /* H100 SXM5 */
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned *index) {
    BEGIN("nvmlDeviceGetIndex", device);
    (void)g;
    if (!index) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned)(device - g_devices);
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    BEGIN("nvmlDeviceGetMemoryInfo", device);
    if (!memory) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    memory->total = MEM_TOTAL_BYTES;
    memory->used = g->mem_used_bytes < MEM_TOTAL_BYTES ? g->mem_used_bytes : MEM_TOTAL_BYTES;
    memory->free = memory->total - memory->used;
    return end(&ss, NVML_SUCCESS);
}

/* Size-query protocol of NVML list getters: too small a count -> INSUFFICIENT_SIZE with the count. */
static nvmlReturn_t fill_list(const unsigned *values, unsigned n, unsigned *count, unsigned *out) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (*count < n || !out) {
        *count = n;
        return n ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    }
    memcpy(out, values, n * sizeof *values);
    *count = n;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t device, unsigned *count, unsigned *clocks) {
    BEGIN("nvmlDeviceGetSupportedMemoryClocks", device);
    (void)g;
    return end(&ss, fill_list(ss.st.mem_clocks_mhz, ss.st.n_mem_clocks, count, clocks));
}

/* Descending, like the driver. The highest memory clock offers the whole SM range; lower memory
 * clocks offer only its lower half, so a backend that asks for the wrong memory clock is caught. */
EXPORT nvmlReturn_t nvmlDeviceGetSupportedGraphicsClocks(nvmlDevice_t device, unsigned mem_clock_mhz,
                                                         unsigned *count, unsigned *clocks) {
    BEGIN("nvmlDeviceGetSupportedGraphicsClocks", device);
    (void)g;
    const struct state *s = &ss.st;
    unsigned top_mem = 0;
    int known = 0;
    for (unsigned j = 0; j < s->n_mem_clocks; j++) {
        if (s->mem_clocks_mhz[j] > top_mem) top_mem = s->mem_clocks_mhz[j];
        if (s->mem_clocks_mhz[j] == mem_clock_mhz) known = 1;
    }
    if (!known || s->sm_clock_step_mhz == 0) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    unsigned top = s->sm_clock_max_mhz;
    if (mem_clock_mhz != top_mem) top = s->sm_clock_min_mhz + (s->sm_clock_max_mhz - s->sm_clock_min_mhz) / 2;
    unsigned values[4096];
    unsigned n = 0;
    for (unsigned f = s->sm_clock_min_mhz; f <= top && n < 4096; f += s->sm_clock_step_mhz) values[n++] = f;
    for (unsigned a = 0, b = n ? n - 1 : 0; a < b; a++, b--) {
        unsigned t = values[a];
        values[a] = values[b];
        values[b] = t;
    }
    return end(&ss, fill_list(values, n, count, clocks));
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device, unsigned *min_mw,
                                                                 unsigned *max_mw) {
    BEGIN("nvmlDeviceGetPowerManagementLimitConstraints", device);
    (void)g;
    if (!min_mw || !max_mw) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *min_mw = ss.st.min_power_limit_mw;
    *max_mw = ss.st.max_power_limit_mw;
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device, unsigned *limit_mw) {
    BEGIN("nvmlDeviceGetPowerManagementDefaultLimit", device);
    (void)g;
    if (!limit_mw) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *limit_mw = ss.st.default_power_limit_mw;
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned *limit_mw) {
    BEGIN("nvmlDeviceGetPowerManagementLimit", device);
    if (!limit_mw) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *limit_mw = g->power_limit_mw;
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned *limit_mw) {
    BEGIN("nvmlDeviceGetEnforcedPowerLimit", device);
    if (!limit_mw) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *limit_mw = g->power_limit_mw;
    return end(&ss, NVML_SUCCESS);
}

/* ---- device: readings ---- */

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned *power_mw) {
    BEGIN("nvmlDeviceGetPowerUsage", device);
    if (!power_mw) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *power_mw = (unsigned)lround(operating_point(&ss.st, g).power_w * 1000.0);
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy_mj) {
    BEGIN("nvmlDeviceGetTotalEnergyConsumption", device);
    if (!energy_mj) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *energy_mj = (unsigned long long)g->energy_mj;
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, int type, unsigned *clock_mhz) {
    BEGIN("nvmlDeviceGetClockInfo", device);
    if (!clock_mhz) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    unsigned top_mem = 0;
    for (unsigned j = 0; j < ss.st.n_mem_clocks; j++)
        if (ss.st.mem_clocks_mhz[j] > top_mem) top_mem = ss.st.mem_clocks_mhz[j];
    switch (type) {
        case NVML_CLOCK_GRAPHICS:
        case NVML_CLOCK_SM: *clock_mhz = operating_point(&ss.st, g).sm_clock_mhz; break;
        case NVML_CLOCK_MEM: *clock_mhz = top_mem; break;
        case NVML_CLOCK_VIDEO: *clock_mhz = 1755; break;
        default: return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    }
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    BEGIN("nvmlDeviceGetUtilizationRates", device);
    if (!utilization) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    utilization->gpu = g->load_pct;
    utilization->memory = g->load_pct / 2;
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned *temperature_c) {
    BEGIN("nvmlDeviceGetTemperature", device);
    if (!temperature_c || sensor != NVML_TEMPERATURE_GPU) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *temperature_c = (unsigned)(30.0 + operating_point(&ss.st, g).power_w / 10.0);
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    BEGIN("nvmlDeviceGetCurrentClocksEventReasons", device);
    if (!reasons) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    *reasons = operating_point(&ss.st, g).reasons;
    return end(&ss, NVML_SUCCESS);
}

/* nvmlProcessInfo_t of nvml.h (v2 and v3 share the layout); its processes come from FAKE_NVML_COMPUTE_PIDS.
 * Size protocol as the driver: too small a count (or no buffer) -> INSUFFICIENT_SIZE with the count. */
typedef struct {
    unsigned pid;
    unsigned long long usedGpuMemory;
    unsigned gpuInstanceId;
    unsigned computeInstanceId;
} nvmlProcessInfo_t;

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned *count,
                                                            nvmlProcessInfo_t *infos) {
    BEGIN("nvmlDeviceGetComputeRunningProcesses_v3", device);
    (void)g;
    if (!count) return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    nvmlProcessInfo_t found[MAX_FAKE_PROCESSES];
    unsigned n = 0;
    int gpu = (int)(device - g_devices);
    for (const char *p = getenv("FAKE_NVML_COMPUTE_PIDS"); p && *p && n < MAX_FAKE_PROCESSES;) {
        char *rest;
        long entry_gpu = strtol(p, &rest, 10);
        if (rest == p || *rest != ':') break;
        unsigned long pid = strtoul(rest + 1, &rest, 10);
        unsigned long long used = 1ULL << 30;
        if (*rest == ':') used = strtoull(rest + 1, &rest, 10);
        if (entry_gpu == gpu && pid) {
            memset(&found[n], 0, sizeof found[n]);
            found[n].pid = (unsigned)pid;
            found[n].usedGpuMemory = used;
            found[n].gpuInstanceId = found[n].computeInstanceId = 0xFFFFFFFFu; /* no MIG */
            n++;
        }
        while (*rest && *rest != ',') rest++;
        p = *rest == ',' ? rest + 1 : rest;
    }
    if (*count < n || (n && !infos)) {
        *count = n;
        return end(&ss, NVML_ERROR_INSUFFICIENT_SIZE);
    }
    if (n) memcpy(infos, found, n * sizeof *found);
    *count = n;
    return end(&ss, NVML_SUCCESS);
}

/* ---- device: settings (root / CAP_SYS_ADMIN on a real driver) ---- */

EXPORT nvmlReturn_t nvmlDeviceSetGpuLockedClocks(nvmlDevice_t device, unsigned min_mhz, unsigned max_mhz) {
    BEGIN("nvmlDeviceSetGpuLockedClocks", device);
    if (ss.st.deny_set_clocks) return end(&ss, NVML_ERROR_NO_PERMISSION);
    if (min_mhz > max_mhz || min_mhz < ss.st.sm_clock_min_mhz || max_mhz > ss.st.sm_clock_max_mhz)
        return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    g->locked_min_mhz = min_mhz;
    g->locked_max_mhz = max_mhz;
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceResetGpuLockedClocks(nvmlDevice_t device) {
    BEGIN("nvmlDeviceResetGpuLockedClocks", device);
    if (ss.st.deny_set_clocks) return end(&ss, NVML_ERROR_NO_PERMISSION);
    g->locked_min_mhz = 0;
    g->locked_max_mhz = 0;
    return end(&ss, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned limit_mw) {
    BEGIN("nvmlDeviceSetPowerManagementLimit", device);
    if (ss.st.deny_set_power) return end(&ss, NVML_ERROR_NO_PERMISSION);
    if (limit_mw < ss.st.min_power_limit_mw || limit_mw > ss.st.max_power_limit_mw)
        return end(&ss, NVML_ERROR_INVALID_ARGUMENT);
    g->power_limit_mw = limit_mw;
    return end(&ss, NVML_SUCCESS);
}
