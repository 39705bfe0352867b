// How finely the kernels split work among torch's threads: by the multiply-adds a chunk holds, not by a count
// of items. Shared by the attention kernel (`local_attention_cpu.cpp`) and the few-row projections
// (`small_linear_cpu.cpp`).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace work_grain {

// Least multiply-adds a parallel chunk holds: a task list whose whole work is below it runs inline, on the
// calling thread (opening a parallel region costs microseconds on an idle machine and milliseconds on a loaded
// one, where the other threads wait to be scheduled: a README model's decode step at two threads took 8-11 ms
// instead of 1.9 while one other process kept a core busy), and bigger lists split into chunks of at least
// this much.
constexpr double MIN_CHUNK_WORK = double(1 << 21);

// The `at::parallel_for` grain of `tasks` tasks that hold about `work` multiply-adds in all (an upper bound).
inline int64_t grain_for(int64_t tasks, double work) {
  if (tasks <= 1 || work <= 0.0) return 1;
  const double per_task = work / double(tasks);
  return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(MIN_CHUNK_WORK / per_task)), 1, tasks);
}

}  // namespace work_grain
