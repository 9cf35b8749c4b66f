// Thread pool, job life cycle and host-side flag waits. Waits spin for a few microseconds
// (a hand-off is usually that close), then yield, then sleep with a growing backoff so an idle
// pool costs almost nothing.
#include "thread_pool.h"

#include <chrono>
#include <stdexcept>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace apex {
namespace {

using Clock = std::chrono::steady_clock;

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Backoff {
 public:
  void pause() {
    const auto elapsed = Clock::now() - start_;
    if (elapsed < kSpin) {
      for (int i = 0; i < 16; ++i) cpu_relax();
    } else if (elapsed < kYield) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(sleep_);
      sleep_ = std::min(sleep_ * 2, kMaxSleep);
    }
  }
  double elapsed_s() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  static constexpr std::chrono::microseconds kSpin{50};
  static constexpr std::chrono::microseconds kYield{2000};
  static constexpr std::chrono::microseconds kMaxSleep{1000};
  Clock::time_point start_ = Clock::now();
  std::chrono::microseconds sleep_{20};
};

inline int64_t load_acquire(const int64_t* flag) { return __atomic_load_n(flag, __ATOMIC_ACQUIRE); }

void pin_current_thread(int core) {
#if defined(__linux__)
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  CPU_SET(core, &cpus);
  // Best effort: a core outside this process's cpuset leaves the thread unpinned.
  pthread_setaffinity_np(pthread_self(), sizeof(cpus), &cpus);
#else
  (void)core;
#endif
}

}  // namespace

bool wait_flag(const int64_t* flag, int64_t value, double timeout_s) {
  Backoff backoff;
  while (load_acquire(flag) < value) {
    if (timeout_s >= 0 && backoff.elapsed_s() >= timeout_s) return false;
    backoff.pause();
  }
  return true;
}

void set_flag(int64_t* flag, int64_t value) { __atomic_store_n(flag, value, __ATOMIC_RELEASE); }

namespace {
// Done flags carry step sequence numbers: never move one backwards, so a late job of an old
// step cannot hide a newer step's completion from its waiter.
void raise_flag(int64_t* flag, int64_t value) {
  int64_t current = __atomic_load_n(flag, __ATOMIC_RELAXED);
  while (current < value &&
         !__atomic_compare_exchange_n(flag, &current, value, /*weak=*/true, __ATOMIC_RELEASE,
                                      __ATOMIC_RELAXED)) {
  }
}
}  // namespace

bool Job::is_ready() const {
  return gate_.ready_flag == nullptr || load_acquire(gate_.ready_flag) >= gate_.ready_value;
}

bool Job::wait(double timeout_s) {
  Backoff backoff;
  while (!is_done() && backoff.elapsed_s() < 50e-6) backoff.pause();
  std::unique_lock<std::mutex> lock(mutex_);
  const auto done = [this] { return is_done(); };
  if (timeout_s < 0) {
    done_cv_.wait(lock, done);
  } else if (!done_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), done)) {
    return false;
  }
  if (!error_.empty()) throw std::runtime_error(error_);
  return true;
}

void Job::run_available(WorkerScratch& scratch) {
  while (true) {
    const int index = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (index >= num_tasks_) return;
    try {
      run_task(index, scratch);
    } catch (const std::exception& error) {
      record_error(error.what());
    } catch (...) {
      record_error("unknown error in a CPU attention task");
    }
    finish_tasks(1);
  }
}

void Job::cancel(const char* reason) {
  const int claimed = next_task_.exchange(num_tasks_, std::memory_order_acq_rel);
  if (claimed >= num_tasks_) return;
  record_error(reason);
  finish_tasks(num_tasks_ - claimed);
}

void Job::record_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_.empty()) error_ = message;
}

void Job::finish_tasks(int count) {
  const int finished = finished_tasks_.fetch_add(count, std::memory_order_acq_rel) + count;
  if (finished != num_tasks_) return;
  // Even a failed job raises its done flag, so a waiter on the flag never hangs; the error
  // itself is reported by wait().
  if (gate_.done_flag != nullptr) raise_flag(gate_.done_flag, gate_.done_value);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_.store(true, std::memory_order_release);
  }
  done_cv_.notify_all();
}

ThreadPool::ThreadPool(int num_threads, std::vector<int> pin_cores)
    : pin_cores_(std::move(pin_cores)) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be at least 1");
  workers_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() { close(); }

void ThreadPool::submit_all(std::vector<std::shared_ptr<Job>> jobs) {
  int ready_workers = 0;
  bool any_gated = false;
  for (const auto& job : jobs) {
    if (job->is_ready()) {
      ready_workers += job->num_workers_;
    } else {
      any_gated = true;
    }
  }
  bool need_watcher;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_.load()) throw std::runtime_error("the CPU attention pool is closed");
    for (auto& job : jobs) queue_.push_back(std::move(job));
    queue_version_.fetch_add(1, std::memory_order_release);
    need_watcher = !watcher_active_;
  }
  if (ready_workers > 0) wake_workers(ready_workers);
  // An idle worker becomes the watcher of the gated jobs (one that is already watching sees
  // the version change and re-scans).
  if (any_gated && need_watcher) work_cv_.notify_one();
}

void ThreadPool::wake_workers(int count) {
  if (count >= num_threads()) {
    work_cv_.notify_all();
  } else {
    for (int i = 0; i < count; ++i) work_cv_.notify_one();
  }
}

void ThreadPool::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_.exchange(true)) return;
    for (auto& job : queue_) job->cancel("the CPU attention pool was closed before the job ran");
    queue_.clear();
  }
  work_cv_.notify_all();
  for (auto& worker : workers_) {
    if (worker.joinable()) worker.join();
  }
}

std::shared_ptr<Job> ThreadPool::next_runnable_locked(std::vector<std::shared_ptr<Job>>* gated) {
  std::shared_ptr<Job> runnable;
  for (auto it = queue_.begin(); it != queue_.end();) {
    Job& job = **it;
    if (!job.has_unclaimed_tasks()) {
      it = queue_.erase(it);  // its last tasks are running; the queue no longer needs it
      continue;
    }
    if (job.is_ready()) {
      runnable = *it;
      break;
    }
    gated->push_back(*it);
    ++it;
  }
  return runnable;
}

void ThreadPool::watch(const std::vector<std::shared_ptr<Job>>& gated, uint64_t seen_version) {
  Backoff backoff;
  while (!stopping_.load(std::memory_order_relaxed) &&
         queue_version_.load(std::memory_order_acquire) == seen_version) {
    for (const auto& job : gated) {
      if (job->is_ready()) {
        wake_workers(job->num_workers_ - 1);  // this worker takes one share itself
        return;
      }
    }
    backoff.pause();
  }
}

void ThreadPool::worker_loop(int worker_index) {
  if (!pin_cores_.empty()) pin_current_thread(pin_cores_[worker_index % pin_cores_.size()]);
  WorkerScratch scratch;
  std::vector<std::shared_ptr<Job>> gated;
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    gated.clear();
    std::shared_ptr<Job> job = next_runnable_locked(&gated);
    if (job) {
      lock.unlock();
      job->run_available(scratch);
      job.reset();
      lock.lock();
      continue;
    }
    if (stopping_.load()) return;
    if (!gated.empty() && !watcher_active_) {
      watcher_active_ = true;
      const uint64_t version = queue_version_.load(std::memory_order_acquire);
      lock.unlock();
      watch(gated, version);
      gated.clear();
      lock.lock();
      watcher_active_ = false;
      continue;
    }
    work_cv_.wait(lock);
  }
}

}  // namespace apex
