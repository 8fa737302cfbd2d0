// A pool of persistent threads for the CPU kernels, one per process, shared by every
// kernel module (row_matmul, quant_matmul, bf16_matmul, short_attention, row_ops,
// causal_attention).
#pragma once
#include <immintrin.h>

#include <nanobind/nanobind.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <string>
#include <thread>
#include <vector>

namespace kernelext {

// Persistent workers that share each product's weight blocks with the calling thread.
// Chunks are claimed from a ticket, so a worker the OS has not scheduled yet costs
// nothing: the caller takes the chunks it leaves, and waits only for chunks a worker
// has claimed (a fixed split would stall every product on a descheduled worker).
// The ticket holds generation, chunk count and next chunk in one atomic word: a worker
// that read an exhausted ticket of one product and resumes after the next product set
// its (larger) count must not claim with the stale ticket. With the count kept in a
// separate variable it could: it then ran a chunk twice and counted it done, so a
// product returned while that chunk was still running on its freed activations (a
// segfault in the quantized kernels under load, more often with small prefill chunks).
class Workers {
 public:
  explicit Workers(int n) {
    // Spin only where a core is left for the spinner. Besides the workers, the engine keeps
    // two threads busy: MLX's stream thread (the caller, which takes chunks too) and the
    // Python thread that builds the next layers' graph meanwhile. On 2 cores a worker
    // spinning 100 us after each kernel took the core Python needed: single-stream decode
    // ran at 74 tok/s against 93 with no spin (interleaved A/B, Gemma 3 270M).
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    spin_ = std::chrono::microseconds(cores > (unsigned)n + 2 ? 100 : 0);
    if (const char* us = std::getenv("KERNELEXT_KERNEL_SPIN_US")) spin_ = std::chrono::microseconds(std::atol(us));
    for (int i = 0; i < n; i++)
      threads_.emplace_back([this] {
        pthread_setname_np(pthread_self(), "kernelext-pool");  // tests count them by name
        loop();
      });
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return (int)threads_.size() + 1; }
  // Whether idle workers spin before sleeping (see the constructor). Without the spin a
  // worker's wake-up is a futex round trip, which kernels weigh against a small job.
  bool spins() const { return spin_.count() > 0; }

  // Runs job(chunk) for every chunk in [0, chunks) on the caller and the workers.
  void run(const std::function<void(int)>& job, int chunks) {
    if (chunks <= kMaxChunks) return run_round(job, chunks);
    for (int base = 0; base < chunks; base += kMaxChunks) {  // a ticket counts kMaxChunks at most
      std::function<void(int)> part = [&job, base](int c) { job(base + c); };
      run_round(part, std::min(kMaxChunks, chunks - base));
    }
  }

 private:
  static constexpr int kMaxChunks = 0xffff;
  void run_round(const std::function<void(int)>& job, int chunks) {
    std::lock_guard<std::mutex> caller(run_mutex_);  // one product at a time (any stream)
    chunks = std::max(0, chunks);
    if (chunks == 1) return job(0);  // nothing to share: waking a worker would only cost
    job_ = &job;
    done_.store(0, std::memory_order_relaxed);
    uint64_t gen = ++generation_ & 0xffffffffu;
    ticket_.store(gen << 32 | (uint64_t)chunks << 16);  // publishes job_
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
    work(gen);
    while (done_.load(std::memory_order_acquire) < chunks) _mm_pause();
  }
  bool claim(uint64_t gen, int& chunk) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    // Generation, count and next chunk from the same word: a claim belongs to one product.
    while ((t >> 32) == gen && (t & 0xffffu) < ((t >> 16) & 0xffffu)) {
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        chunk = (int)(t & 0xffffu);
        return true;
      }
    }
    return false;
  }
  void work(uint64_t gen) {
    int chunk;
    while (claim(gen, chunk)) {
      (*job_)(chunk);
      done_.fetch_add(1, std::memory_order_release);
    }
  }
  void loop() {
    uint64_t seen = 0;
    while (true) {
      // Spin a little where a core is free (see the constructor): a decode step issues its
      // products tens of us apart. Then sleep.
      // Bounded in time: a spin of 20,000 pauses (0.5-0.8 ms here) took a core from MKL's
      // and MLX's threads between a prefill's products (perf: 18% of a 2-core prefill).
      auto until = std::chrono::steady_clock::now() + spin_;
      for (int i = 1; (ticket_.load() >> 32) == seen; i++) {
        _mm_pause();
        if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
      }
      if ((ticket_.load() >> 32) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_++;
        cv_.wait(lock, [&] { return stop_ || (ticket_.load() >> 32) != seen; });
        sleepers_--;
        if (stop_) return;
      }
      seen = ticket_.load() >> 32;
      work(seen);
    }
  }
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> ticket_{0};  // generation << 32 | chunks << 16 | next chunk
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
  uint64_t generation_ = 0;  // the calling (MLX stream) thread only
  const std::function<void(int)>* job_ = nullptr;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::chrono::microseconds spin_{0};  // KERNELEXT_KERNEL_SPIN_US
};

inline int default_threads() {
  // A memory-bound product stops scaling after a few cores; more spinning workers
  // would only take CPU from everything else.
  // KERNELEXT_KERNEL_THREADS caps it (tests compare one thread with all).
  int n = (int)std::min(8u, std::max(1u, std::thread::hardware_concurrency()));
  if (const char* cap = std::getenv("KERNELEXT_KERNEL_THREADS")) n = std::max(1, std::min(n, std::atoi(cap)));
  return n - 1;
}

// This module's pointer to the process's pool (set by share_workers, or made on first use).
inline Workers*& pool_slot() {
  static Workers* pool = nullptr;
  return pool;
}

inline Workers& workers() {
  Workers*& pool = pool_slot();
  if (pool == nullptr) pool = new Workers(default_threads());  // a module imported on its own
  return *pool;
}

// Why one pool for all modules: each kernel module is its own shared object with hidden
// symbols, so a static pool in this header gave each module its own. A decode step then
// woke three workers (products, norms, attention), and each spun 100 us after its kernel
// while the next kernel's worker waited for the core: on 2 cores a batch-1 step of
// Gemma 3 270M took 13.0 ms, against 11.3 ms with no spinning at all. The first module
// imported makes the pool and leaves it on its package as a capsule; the others take it.
// The capsule's name carries the class's layout version: modules built from another
// version of this header keep a pool of their own rather than share a different class.
constexpr const char* kPoolCapsule = "kernelext.workers.v2";

inline void share_workers(nanobind::module_& m) {
  namespace nb = nanobind;
  const std::string name = nb::str(m.attr("__name__")).c_str();
  const size_t dot = name.rfind('.');
  if (dot == std::string::npos) return;  // no package to share through
  nb::module_ package = nb::module_::import_(name.substr(0, dot).c_str());
  nb::object held = nb::getattr(package, "_kernel_workers", nb::none());
  if (!held.is_none() && PyCapsule_IsValid(held.ptr(), kPoolCapsule)) {
    pool_slot() = static_cast<Workers*>(PyCapsule_GetPointer(held.ptr(), kPoolCapsule));
    return;
  }
  // Never freed: the pool lives as long as the process, as the static did.
  package.attr("_kernel_workers") = nb::capsule(&workers(), kPoolCapsule);
}

}  // namespace kernelext
