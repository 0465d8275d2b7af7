#pragma once
// A progress bar with loss, learning rate, tokens per second and ETA. On a terminal it redraws
// one line in place; otherwise it stays silent and the trainer's periodic log lines tell progress.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace scaletrain::train {

class ProgressBar {
 public:
  ProgressBar(int64_t total_steps, bool interactive, std::FILE* out = stderr);
  // `done` steps finished, `tokens` processed since the bar started; `loss` may be NaN while
  // unknown. Redraws at most ten times a second (always at the last step).
  void update(int64_t done, double loss, double lr, int64_t tokens);
  // A resumed run: `done` steps and `tokens` were done before the bar started (left out of the
  // rate and the ETA).
  void start_at(int64_t done, int64_t tokens);
  // Prints a line above the bar (or just the line when not interactive).
  void print_line(const std::string& line);
  // Ends the bar's line.
  void finish();
  bool interactive() const { return interactive_; }

  static bool stderr_is_terminal();
  // "1h02m", "3m07s", "12s"
  static std::string format_duration(double seconds);
  // "980", "14.2k", "3.10M"
  static std::string format_rate(double per_second);

 private:
  void draw();
  int64_t total_, done_ = 0, first_done_ = 0, first_tokens_ = 0;
  double loss_ = 0, lr_ = 0;
  int64_t tokens_ = 0;
  bool interactive_, drawn_ = false;
  std::FILE* out_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace scaletrain::train
