// The memory of the attention kernel's large outputs (`local_attention_cpu.cpp`): a pool of mappings that
// outlive the tensors they held.

#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace local_attention {

// Where the large outputs (out, dq, dk, dv) live. glibc maps every allocation over 32 MB afresh and unmaps it
// when freed, and gives smaller ones back to the kernel too whenever the top of its heap is trimmed, so each
// call would first-touch its outputs page by page: at n = 65536 that was a tenth to a fifth of a
// forward+backward, the only part of its cost that grew faster than n, and at the headline's 16 MB outputs
// still 25 ms of system time in a 270 ms loop step (AVX2 build, one thread). This pool keeps the
// mappings of freed outputs (up to `cap` bytes, $WINDOWED_ATTENTION_POOL_MB, default 1024; 0 turns it off)
// and hands them to the next call of a size that fits. Idle mappings are marked MADV_FREE: reusing them
// costs no page faults, yet the kernel may still reclaim their pages under memory pressure (a reclaimed
// page reads as zeros, which is fine: every output is written in full before it is read). Until it does,
// they count in the process's resident memory, so a mapping no call has reused for `max_idle` seconds
// ($WINDOWED_ATTENTION_POOL_IDLE_S, default 30) is unmapped at the pool's next use: a loop of one shape
// reuses its mappings every step, while the sizes of calls that stopped (another length, a finished
// prefill) do not stay resident up to the cap.
//
// It is a c10::Allocator, so its tensors are ordinary CPU tensors (resizable; a resize allocates here too).
class OutputPool final : public c10::Allocator {
 public:
  static OutputPool& instance() {
    static auto* pool = new OutputPool();  // never destroyed: tensors may be freed during interpreter exit
    return *pool;
  }

  // An uninitialised CPU tensor whose memory comes from this allocator.
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    return at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
  }

  // Outputs of this many bytes and more are pooled.
  static constexpr size_t large = size_t(1) << 20;

  // From the pool (or a fresh mapping) when large, else from torch's CPU allocator.
  c10::DataPtr allocate(size_t bytes) override {
    constexpr size_t page = size_t(1) << 16;
    if (bytes < large || cap_ == 0) return c10::GetCPUAllocator()->allocate(bytes);
    const size_t need = (bytes + page - 1) / page * page;
    void* data = nullptr;
    size_t len = 0;
    std::vector<Idle> evicted;
    {
      std::lock_guard<std::mutex> hold(mutex_);
      evict(Clock::now(), evicted);
      auto best = idle_.end();  // the smallest idle mapping that fits without wasting over a quarter
      for (auto it = idle_.begin(); it != idle_.end(); ++it)
        if (it->len >= need && it->len <= need + need / 4 && (best == idle_.end() || it->len < best->len))
          best = it;
      if (best != idle_.end()) {
        data = best->data;
        len = best->len;
        idle_bytes_ -= len;
        idle_.erase(best);
      }
    }
    unmap(evicted);
    if (data == nullptr) {
      data = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (data == MAP_FAILED) return c10::GetCPUAllocator()->allocate(bytes);
      len = need;
    }
    return {data, new Mapping{data, len}, &OutputPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const { default_copy_data(dest, src, count); }

  // Unmap every idle mapping.
  void release() {
    std::vector<Idle> idle;
    {
      std::lock_guard<std::mutex> hold(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    unmap(idle);
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> hold(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

 private:
  using Clock = std::chrono::steady_clock;

  OutputPool() {
    const char* mb = std::getenv("WINDOWED_ATTENTION_POOL_MB");
    cap_ = static_cast<size_t>(mb != nullptr && *mb != '\0' ? std::max(std::atoll(mb), 0LL) : 1024) << 20;
    const char* idle_s = std::getenv("WINDOWED_ATTENTION_POOL_IDLE_S");
    double seconds = idle_s != nullptr && *idle_s != '\0' ? std::atof(idle_s) : 30.0;
    seconds = seconds >= 0.0 ? std::min(seconds, 1e9) : 0.0;  // negative or NaN: 0, keep none between uses
    max_idle_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }

  struct Mapping {
    void* data;
    size_t len;
  };

  struct Idle {
    void* data;
    size_t len;
    Clock::time_point since;
  };

  static void unmap(const std::vector<Idle>& mappings) {
    for (const auto& m : mappings) munmap(m.data, m.len);
  }

  // Moves the oldest mappings into `evicted` while they are over the cap or idle for longer than max_idle_;
  // mutex_ held.
  void evict(Clock::time_point now, std::vector<Idle>& evicted) {
    auto kept = idle_.begin();
    while (kept != idle_.end() && (idle_bytes_ > cap_ || now - kept->since > max_idle_)) {
      idle_bytes_ -= kept->len;
      evicted.push_back(*kept++);
    }
    idle_.erase(idle_.begin(), kept);
  }

  static void give_back(void* context) {
    const Mapping mapping = *static_cast<Mapping*>(context);
    delete static_cast<Mapping*>(context);
    instance().keep(mapping.data, mapping.len);
  }

  void keep(void* p, size_t len) {
#ifdef MADV_FREE
    madvise(p, len, MADV_FREE);
#endif
    std::vector<Idle> evicted;
    {
      std::lock_guard<std::mutex> hold(mutex_);
      const auto now = Clock::now();
      idle_.push_back(Idle{p, len, now});
      idle_bytes_ += len;
      evict(now, evicted);
    }
    unmap(evicted);
  }

  std::mutex mutex_;
  std::vector<Idle> idle_;  // oldest first
  size_t idle_bytes_ = 0, cap_ = 0;
  Clock::duration max_idle_{};
};

}  // namespace local_attention
