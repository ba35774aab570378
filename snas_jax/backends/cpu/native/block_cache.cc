// Keeps the last freed large block mapped for the next allocation of about
// its size: a malloc front end, LD_PRELOADed by the entry scripts' restart
// (snas_jax/cli.py, --tune_memory).
//
// Why: XLA:CPU allocates a train step's temporaries (2.6 GB at the paper's
// search configuration) with malloc when the step starts and frees them when
// it ends. glibc serves such blocks with mmap and returns them with munmap,
// so the kernel maps and zeroes 2.6 GB again every step: ~10% of the step's
// CPU time (docs/cpu_backend.md). glibc's own knobs cannot keep them: with
// mmap off, the freed block is split by small allocations and the next step
// maps a second one (peak memory x2, measured).
//
// Blocks of at least kLarge bytes are mapped here. Freed ones stay mapped and
// serve the next large requests of about their size (3/4 of it or more): as
// many as the process has had twins live at once (devices' programs running
// side by side: blocks born within kOldNs of each other, each device's
// temporaries), one where a step runs alone. Never more resident than the
// process already held at its peak: a block freed while the kept blocks and
// the live ones of its size already number the twins is unmapped, a freed
// block unmaps the kept ones of other sizes, and a request no kept block
// fits unmaps them before mapping anew. All other
// requests go to glibc (its __libc_* entry points). Thread-safe; no
// allocation inside.
//
// XLA frees a step's temporaries a few ms after its outputs are ready, so the
// next step's request often comes while they are still live (measured: freed
// 14 ms after the next step's request, on 2 cores). A request that a live
// block of at least kOldNs's age would serve waits up to kWaitNs for it to be
// freed and takes it; without the wait the next step mapped and zeroed a
// fresh 2.6 GB every other step (0.3-0.5 s). Blocks younger than that are
// concurrent twins: no wait. Without a kept block per twin, NB201's search on
// 2 devices mapped and zeroed one device's temporaries every step.
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

extern "C" {
void* __libc_malloc(size_t);
void __libc_free(void*);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
void* __libc_valloc(size_t);
void* __libc_pvalloc(size_t);
}

namespace {

constexpr size_t kLarge = size_t{64} << 20;
constexpr size_t kPage = 4096;
constexpr size_t kHuge = size_t{2} << 20;
constexpr int kSlots = 32;  // live large blocks tracked; more go to glibc
constexpr int64_t kOldNs = 200'000'000, kWaitNs = 100'000'000;

struct Block {
  void* ptr;
  size_t size;  // mapped bytes
  int64_t born;  // CLOCK_MONOTONIC ns when handed out
};

pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t freed = PTHREAD_COND_INITIALIZER;  // signalled when a block is kept
Block live[kSlots];    // guarded by mu; ptr == nullptr: empty
Block cached[kSlots];  // freed blocks kept mapped; guarded by mu; ptr == nullptr: empty
int twins = 1;         // most blocks of one size born within kOldNs, live at once; guarded by mu
// Read without the lock by free(): whether any large block is live, so the
// common free() of a small block costs one load.
volatile int live_count = 0;

struct Lock {
  Lock() { pthread_mutex_lock(&mu); }
  ~Lock() { pthread_mutex_unlock(&mu); }
};

// Whether a mapped block of `size` bytes serves a request for n.
bool Fits(size_t size, size_t n) { return size >= n && size - size / 4 <= n; }

int64_t Now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1'000'000'000 + t.tv_nsec;
}

// A kept block that serves n, or -1. Caller holds mu.
int CachedFit(size_t n) {
  for (int i = 0; i < kSlots; ++i)
    if (cached[i].ptr != nullptr && Fits(cached[i].size, n)) return i;
  return -1;
}

// Whether a live block that is kOldNs old or more would serve n. Caller holds mu.
bool OldTwinLive(size_t n, int64_t now) {
  for (const Block& b : live)
    if (b.ptr != nullptr && Fits(b.size, n) && now - b.born >= kOldNs) return true;
  return false;
}

// A mapped block for n bytes (nullptr if none): a kept one that fits (after
// waiting for an old twin's free, see the top), else a new mapping on
// transparent huge pages.
void* Allocate(size_t n, bool zero) {
  Lock lock;
  const int64_t start = Now();
  if (CachedFit(n) < 0 && OldTwinLive(n, start)) {
    timespec deadline;  // the condition variable's clock: CLOCK_REALTIME
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_nsec += kWaitNs;
    deadline.tv_sec += deadline.tv_nsec / 1'000'000'000;
    deadline.tv_nsec %= 1'000'000'000;
    while (CachedFit(n) < 0 && OldTwinLive(n, start) &&
           pthread_cond_timedwait(&freed, &mu, &deadline) == 0) {
    }
  }
  int slot = 0;
  while (slot < kSlots && live[slot].ptr != nullptr) ++slot;
  if (slot == kSlots) return nullptr;
  Block b = {nullptr, 0, 0};
  const int kept = CachedFit(n);
  if (kept >= 0) {
    b = cached[kept];
    cached[kept] = {nullptr, 0, 0};
    if (zero) memset(b.ptr, 0, n);
  } else {
    for (Block& c : cached)
      if (c.ptr != nullptr) munmap(c.ptr, c.size), c = {nullptr, 0, 0};
    const size_t size = (n + kHuge - 1) / kHuge * kHuge;
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    madvise(p, size, MADV_HUGEPAGE);
    b = {p, size, 0};  // fresh pages read as zero
  }
  b.born = Now();
  live[slot] = b;
  live_count = live_count + 1;
  int young = 0;  // live blocks of b's size born with it: b's twins, b included
  for (const Block& l : live)
    young += l.ptr != nullptr && Fits(b.size, l.size) && b.born - l.born < kOldNs;
  if (young > twins) twins = young;
  return b.ptr;
}

// The live block at p, or -1. Caller holds mu.
int Find(void* p) {
  for (int i = 0; i < kSlots; ++i)
    if (live[i].ptr == p) return i;
  return -1;
}

bool Release(void* p) {
  if (live_count == 0) return false;
  Lock lock;
  const int i = Find(p);
  if (i < 0) return false;
  const Block b = live[i];
  live[i] = {nullptr, 0, 0};
  live_count = live_count - 1;
  int held = 0;  // blocks a request for b would take: live, or kept
  int free_slot = -1;
  for (int j = 0; j < kSlots; ++j) {
    if (cached[j].ptr != nullptr && !Fits(b.size, cached[j].size))  // kept for another size
      munmap(cached[j].ptr, cached[j].size), cached[j] = {nullptr, 0, 0};
    held += live[j].ptr != nullptr && Fits(b.size, live[j].size);
    held += cached[j].ptr != nullptr && Fits(b.size, cached[j].size);
    if (cached[j].ptr == nullptr) free_slot = j;
  }
  if (held >= twins || free_slot < 0) {
    munmap(b.ptr, b.size);
    return true;
  }
  cached[free_slot] = b;
  pthread_cond_broadcast(&freed);
  return true;
}

size_t SizeOf(void* p) {
  if (live_count == 0) return 0;
  Lock lock;
  const int i = Find(p);
  return i < 0 ? 0 : live[i].size;
}

bool Aligned(size_t alignment) {
  return alignment >= sizeof(void*) && (alignment & (alignment - 1)) == 0;
}

}  // namespace

extern "C" {

void* malloc(size_t n) {
  if (n >= kLarge)
    if (void* p = Allocate(n, false)) return p;
  return __libc_malloc(n);
}

void free(void* p) {
  if (p != nullptr && !Release(p)) __libc_free(p);
}

void* calloc(size_t count, size_t size) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return nullptr;
  }
  if (n >= kLarge)
    if (void* p = Allocate(n, true)) return p;
  return __libc_calloc(count, size);
}

void* realloc(void* p, size_t n) {
  const size_t old = p == nullptr ? 0 : SizeOf(p);
  if (old == 0) return __libc_realloc(p, n);  // not ours: glibc's
  if (n == 0) {
    free(p);
    return nullptr;
  }
  void* q = malloc(n);
  if (q == nullptr) return nullptr;
  memcpy(q, p, n < old ? n : old);
  free(p);
  return q;
}

void* memalign(size_t alignment, size_t n) {
  if (n >= kLarge && alignment <= kPage)  // mappings are page-aligned
    if (void* p = Allocate(n, false)) return p;
  return __libc_memalign(alignment, n);
}

void* aligned_alloc(size_t alignment, size_t n) { return memalign(alignment, n); }

int posix_memalign(void** out, size_t alignment, size_t n) {
  if (!Aligned(alignment)) return EINVAL;
  void* p = memalign(alignment, n);
  if (p == nullptr && n != 0) return ENOMEM;
  *out = p;
  return 0;
}

void* valloc(size_t n) { return memalign(kPage, n); }

void* pvalloc(size_t n) { return memalign(kPage, (n + kPage - 1) / kPage * kPage); }

size_t malloc_usable_size(void* p) {
  if (const size_t size = p == nullptr ? 0 : SizeOf(p)) return size;
  static auto next = reinterpret_cast<size_t (*)(void*)>(dlsym(RTLD_NEXT, "malloc_usable_size"));
  return next == nullptr ? 0 : next(p);
}

}  // extern "C"
