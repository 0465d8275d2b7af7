#include "scaletrain/train/progress.h"

#include <unistd.h>

#include <cmath>

#include <fmt/format.h>

namespace scaletrain::train {

ProgressBar::ProgressBar(int64_t total_steps, bool interactive, std::FILE* out)
    : total_(total_steps), interactive_(interactive), out_(out), start_(std::chrono::steady_clock::now()) {}

bool ProgressBar::stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

std::string ProgressBar::format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

std::string ProgressBar::format_rate(double per_second) {
  if (per_second >= 1e6) return fmt::format("{:.2f}M", per_second / 1e6);
  if (per_second >= 1e3) return fmt::format("{:.1f}k", per_second / 1e3);
  return fmt::format("{:.0f}", per_second);
}

void ProgressBar::update(int64_t done, double loss, double lr, int64_t tokens) {
  done_ = done, loss_ = loss, lr_ = lr, tokens_ = tokens;
  if (!interactive_) return;
  auto now = std::chrono::steady_clock::now();
  if (done_ < total_ && drawn_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  draw();
}

void ProgressBar::start_at(int64_t done, int64_t tokens) {
  done_ = first_done_ = done;
  tokens_ = first_tokens_ = tokens;
}

void ProgressBar::draw() {
  constexpr int kWidth = 24;
  const double fraction = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1.0;
  const int filled = static_cast<int>(fraction * kWidth);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int64_t done_here = done_ - first_done_;
  const double eta =
      done_here > 0 ? elapsed / static_cast<double>(done_here) * static_cast<double>(total_ - done_) : NAN;
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(kWidth - filled), '.');
  const std::string loss = std::isnan(loss_) ? "-" : fmt::format("{:.4f}", loss_);
  const double rate = elapsed > 0 ? static_cast<double>(tokens_ - first_tokens_) / elapsed : 0.0;
  fmt::print(out_, "\r\033[Kstep {}/{} [{}] {:3.0f}% loss {} lr {:.2e} {} tok/s ETA {}", done_, total_, bar,
             100 * fraction, loss, lr_, format_rate(rate), format_duration(eta));
  std::fflush(out_);
  drawn_ = true;
}

void ProgressBar::print_line(const std::string& line) {
  if (interactive_ && drawn_) fmt::print(out_, "\r\033[K");
  fmt::print(out_, "{}\n", line);
  if (interactive_ && drawn_) draw();
  std::fflush(out_);
}

void ProgressBar::finish() {
  if (interactive_ && drawn_) {
    draw();
    fmt::print(out_, "\n");
    std::fflush(out_);
    drawn_ = false;
  }
}

}  // namespace scaletrain::train
