// The extension's own thread pool: persistent workers, jobs split into tasks that workers claim
// from a shared counter, optional ready/done flags so a job can be gated on memory written by
// another agent (a GPU copy stream) and signal its completion without any Python in between.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace apex {

// Per-worker float scratch, grown on demand and reused, so steady-state jobs allocate nothing.
class WorkerScratch {
 public:
  float* floats(size_t count) {
    if (buffer_.size() < count) buffer_.resize(count);
    return buffer_.data();
  }

 private:
  std::vector<float> buffer_;
};

// A flag is one int64 in host memory: readers load it with acquire, writers store with release.
struct FlagGate {
  const int64_t* ready_flag = nullptr;  // start only once *ready_flag >= ready_value
  int64_t ready_value = 0;
  int64_t* done_flag = nullptr;  // *done_flag = done_value once every task has finished
  int64_t done_value = 0;
};

class Job {
 public:
  explicit Job(const FlagGate& gate) : gate_(gate) {}
  virtual ~Job() = default;
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;

  bool is_ready() const;
  bool is_done() const { return done_.load(std::memory_order_acquire); }
  // Blocks until every task has finished; throws std::runtime_error with the first task error.
  // timeout_s >= 0 bounds the wait: false when the job is still running by then.
  bool wait(double timeout_s = -1.0);

 protected:
  // Called once by the derived constructor, before the job is submitted. num_workers: how
  // many workers the job's work is worth (each wake-up costs microseconds); default all.
  void set_num_tasks(int num_tasks, int num_workers = 1 << 30) {
    num_tasks_ = num_tasks;
    num_workers_ = std::max(1, std::min(num_tasks, num_workers));
  }
  virtual void run_task(int index, WorkerScratch& scratch) = 0;

 private:
  friend class ThreadPool;
  bool has_unclaimed_tasks() const {
    return next_task_.load(std::memory_order_relaxed) < num_tasks_;
  }
  // Runs tasks until none is left to claim.
  void run_available(WorkerScratch& scratch);
  // Claims every task nobody has started and finishes them with `reason` as the error.
  void cancel(const char* reason);
  void record_error(const std::string& message);
  void finish_tasks(int count);

  FlagGate gate_;
  int num_tasks_ = 0;
  int num_workers_ = 1;
  std::atomic<int> next_task_{0};
  std::atomic<int> finished_tasks_{0};
  std::atomic<bool> done_{false};
  std::mutex mutex_;  // guards error_ and the condition variable below
  std::condition_variable done_cv_;
  std::string error_;
};

class ThreadPool {
 public:
  // pin_cores empty: no pinning; else worker i is pinned to pin_cores[i % size] (Linux only).
  ThreadPool(int num_threads, std::vector<int> pin_cores);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return int(workers_.size()); }
  void submit(std::shared_ptr<Job> job) { submit_all({std::move(job)}); }
  // Queues every job under one lock with one round of wake-ups (a step's jobs at once).
  void submit_all(std::vector<std::shared_ptr<Job>> jobs);
  // Stops the workers; jobs not yet started finish with an error (and set their done flags).
  void close();

 private:
  void worker_loop(int worker_index);
  // The first job with unclaimed tasks that may start; fills `gated` with those that may not.
  std::shared_ptr<Job> next_runnable_locked(std::vector<std::shared_ptr<Job>>* gated);
  // One idle worker polls the gated jobs' ready flags (no Python, no futex per flag).
  void watch(const std::vector<std::shared_ptr<Job>>& gated, uint64_t seen_version);
  void wake_workers(int count);

  std::vector<int> pin_cores_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::deque<std::shared_ptr<Job>> queue_;  // FIFO; gated jobs may be overtaken by ready ones
  std::atomic<uint64_t> queue_version_{0};  // bumped on every submit, so a watcher re-scans
  bool watcher_active_ = false;
  std::atomic<bool> stopping_{false};
};

// Waits until *flag >= value (acquire): spins briefly, then yields, then sleeps with backoff.
// timeout_s < 0 waits forever; returns false on timeout.
bool wait_flag(const int64_t* flag, int64_t value, double timeout_s);
void set_flag(int64_t* flag, int64_t value);

}  // namespace apex
