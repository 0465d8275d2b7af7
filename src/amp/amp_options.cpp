#include "scaletrain/amp/amp_options.h"

#include <cmath>
#include <limits>
#include <stdexcept>

#include "scaletrain/core/error.h"

namespace scaletrain::amp {
namespace {

// The scale is a float32 (as torch.amp.GradScaler's): every bound must be one.
constexpr double kLargestScale = std::numeric_limits<float>::max();

// "auto", "dynamic", "none" or a positive number; nullopt for a word, the number otherwise.
std::optional<double> static_scale(const std::string& text) {
  if (text == "auto" || text == "dynamic" || text == "none") return std::nullopt;
  size_t used = 0;
  double value = NAN;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || !(value > 0) || !(value <= kLargestScale)) {
    throw core::ConfigError("amp.loss_scale", "amp.loss_scale: got '" + text +
                                                  "', expected auto, dynamic, none or a positive number (at most " +
                                                  core::format_number(kLargestScale) + ")");
  }
  return value;
}

}  // namespace

c10::ScalarType compute_dtype(Precision precision) {
  switch (precision) {
    case Precision::bf16: return c10::kBFloat16;
    case Precision::fp16: return c10::kHalf;
    case Precision::fp32: break;
  }
  return c10::kFloat;
}

void LossScalerOptions::check() const {
  auto require = [](bool ok, const char* name, const std::string& expected, double got) {
    if (!ok) throw std::invalid_argument(std::string(name) + ": got " + core::format_number(got) + ", expected " + expected);
  };
  constexpr double largest = kLargestScale;
  require(init_scale() > 0 && init_scale() <= largest, "init_scale", "a finite number > 0", init_scale());
  require(growth_factor() > 1 && std::isfinite(growth_factor()), "growth_factor", "a finite number > 1", growth_factor());
  require(backoff_factor() > 0 && backoff_factor() < 1, "backoff_factor", "a number in (0, 1)", backoff_factor());
  require(growth_interval() >= 1, "growth_interval", "at least 1", static_cast<double>(growth_interval()));
  require(hysteresis() >= 1, "hysteresis", "at least 1", static_cast<double>(hysteresis()));
  require(min_scale() > 0 && min_scale() <= largest, "min_scale", "a finite number > 0", min_scale());
  require(max_scale() >= min_scale() && max_scale() <= largest, "max_scale",
          "a finite number >= min_scale (" + core::format_number(min_scale()) + ")", max_scale());
  // A dynamic scale starts inside its bounds; a static one (dynamic false) is init_scale itself.
  if (dynamic()) {
    require(init_scale() >= min_scale() && init_scale() <= max_scale(), "init_scale",
            "a number in [min_scale, max_scale] = [" + core::format_number(min_scale()) + ", " +
                core::format_number(max_scale()) + "]",
            init_scale());
  }
}

void LossScalerOptions::visit(core::FieldVisitor& v) {
  const core::Bounds scale_bounds{0, kLargestScale, true, false};  // (0, FLT_MAX]
  v.field("init_scale", init_scale(), "first loss scale (dynamic and static)", scale_bounds);
  v.field("growth_interval", growth_interval(), "finite steps before the scale grows", core::at_least(1));
  v.field("growth_factor", growth_factor(), "scale multiplier after growth_interval finite steps",
          core::Bounds{1, kLargestScale, true, false});
  v.field("backoff_factor", backoff_factor(), "scale multiplier after an overflow", core::Bounds{0, 1, true, true});
  v.field("hysteresis", hysteresis(), "overflows tolerated before the scale backs off", core::at_least(1));
  v.field("min_scale", min_scale(), "smallest loss scale", scale_bounds);
  v.field("max_scale", max_scale(), "largest loss scale", scale_bounds);
}

void AmpOptions::visit(core::FieldVisitor& v) {
  v.choice("precision", precision(), "fp32, bf16 or fp16 (bf16/fp16: autocast forward, fp32 loss and reductions)");
  v.field("loss_scale", loss_scale(), "auto (dynamic for fp16, else none), dynamic, none or a static scale", true);
  v.field("low_precision_params", low_precision_params(),
          "keep parameters in bf16/fp16; the optimizer updates fp32 master copies");
  v.field("fp32_grad_accum", fp32_grad_accum(), "with low_precision_params: accumulate gradients in fp32");
  v.field("emulated_fp16", emulated_fp16(), "allow fp16 on a CPU without native fp16 arithmetic (slow; for tests)");
  scaler().visit(v);  // flat: amp.init_scale, amp.growth_interval, ...
}

void AmpOptions::validate() const {
  const auto fixed = static_scale(loss_scale());
  const bool scaled = loss_scale() == "dynamic" || fixed.has_value();
  if (scaled && precision() == Precision::fp32) {
    throw core::ConfigError("amp.loss_scale", "amp.loss_scale: got '" + loss_scale() +
                                                  "', but amp.precision is fp32 (loss scaling is for fp16 or bf16; "
                                                  "expected auto or none)");
  }
  if (low_precision_params() && precision() == Precision::fp32) {
    throw core::ConfigError("amp.low_precision_params",
                            "amp.low_precision_params: true needs amp.precision bf16 or fp16 (got fp32)");
  }
  if (scaler().max_scale() < scaler().min_scale()) {
    throw core::ConfigError("amp.max_scale", "amp.max_scale: got " + core::format_number(scaler().max_scale()) +
                                                 ", expected at least amp.min_scale (" +
                                                 core::format_number(scaler().min_scale()) + ")");
  }
  const auto options = scaler_options();
  if (options && options->dynamic() &&
      (options->init_scale() < options->min_scale() || options->init_scale() > options->max_scale())) {
    throw core::ConfigError("amp.init_scale", "amp.init_scale: got " + core::format_number(options->init_scale()) +
                                                  ", expected a number in [amp.min_scale, amp.max_scale] = [" +
                                                  core::format_number(options->min_scale()) + ", " +
                                                  core::format_number(options->max_scale()) + "]");
  }
}

std::optional<LossScalerOptions> AmpOptions::scaler_options() const {
  const auto fixed = static_scale(loss_scale());
  const bool dynamic = loss_scale() == "dynamic" || (loss_scale() == "auto" && precision() == Precision::fp16);
  if (!dynamic && !fixed) return std::nullopt;
  LossScalerOptions options = scaler();
  options.dynamic(dynamic);
  if (fixed) options.init_scale(*fixed);
  return options;
}

}  // namespace scaletrain::amp
