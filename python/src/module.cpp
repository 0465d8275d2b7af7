// scaletrain._C: bindings only; every behaviour lives in the C++ library.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scaletrain/core/build_info.h"
#include "scaletrain/core/config.h"
#include "scaletrain/data/dsl.h"
#include "scaletrain/train/config.h"
#include "scaletrain/train/text_metrics.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace scaletrain::python {
void bind_amp(py::module_& parent);        // amp_bindings.cpp
void bind_optim(py::module_& parent);      // optim_bindings.cpp
void bind_attention(py::module_& parent);  // attention_bindings.cpp
}

namespace {

using namespace scaletrain;

// Writes a configuration into nested Python dicts.
class DictWriter final : public core::FieldVisitor {
 public:
  DictWriter() { stack_.push_back(py::dict()); }
  py::dict result() const { return stack_.front(); }

  void field(const char* name, int64_t& value, const char*, core::Bounds) override { set(name, py::int_(value)); }
  void field(const char* name, double& value, const char*, core::Bounds) override { set(name, py::float_(value)); }
  void field(const char* name, bool& value, const char*) override { set(name, py::bool_(value)); }
  void field(const char* name, std::string& value, const char*, bool) override { set(name, py::str(value)); }
  void field(const char* name, std::vector<std::string>& value, const char*, const std::vector<std::string>&,
             bool) override {
    set(name, py::cast(value));
  }

 protected:
  void choice_field(const char* name, std::string& value, const std::vector<std::string>&, const char*) override {
    set(name, py::str(value));
  }
  bool begin_section(const char* name, const char*) override {
    py::dict section;
    set(name, section);
    stack_.push_back(section);
    return true;
  }
  void end_section() override { stack_.pop_back(); }

 private:
  void set(const char* name, py::object value) { stack_.back()[py::str(name)] = std::move(value); }
  std::vector<py::dict> stack_;
};

train::RunConfig load(const std::optional<std::string>& path, const std::vector<std::string>& overrides) {
  // None means the defaults; "" is a path that was meant to be set (an unset variable, say).
  if (path && path->empty()) throw core::ConfigError("", "path: got an empty path, expected a YAML file (or None)");
  return train::RunConfig::load(path.value_or(""), overrides);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "scaletrain native module";

  // ConfigError(ValueError) carries .key, the dotted key at fault ("" for the whole file);
  // InputError(ValueError) covers unreadable data and files.
  py::object builtins = py::module_::import("builtins");
  py::object config_error = builtins.attr("type")("ConfigError", py::make_tuple(builtins.attr("ValueError")),
                                                  py::dict("__module__"_a = "scaletrain"));
  py::object input_error = builtins.attr("type")("InputError", py::make_tuple(builtins.attr("ValueError")),
                                                 py::dict("__module__"_a = "scaletrain"));
  m.attr("ConfigError") = config_error;
  m.attr("InputError") = input_error;
  py::register_exception_translator([](std::exception_ptr p) {
    auto raise = [](const char* type_name, const std::string& message, const std::string& key) {
      py::object type = py::module_::import("scaletrain._C").attr(type_name);
      py::object error = type(message);
      error.attr("key") = key;
      PyErr_SetObject(type.ptr(), error.ptr());
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const core::ConfigError& e) {
      raise("ConfigError", e.what(), e.key());
    } catch (const core::UsageError& e) {
      raise("ConfigError", e.what(), "");
    } catch (const core::Error& e) {
      raise("InputError", e.what(), "");
    }
  });

  m.def("version", [] { return core::build_info().version; }, "scaletrain version");
  m.def(
      "build_info",
      [] {
        auto info = core::build_info();
        py::dict d;
        d["version"] = info.version;
        d["torch_version"] = info.torch_version;
        d["cuda"] = info.cuda;
        d["cuda_architectures"] = info.cuda_architectures;
        return d;
      },
      "what this build contains");

  m.def(
      "load_config",
      [](const std::optional<std::string>& path, const std::vector<std::string>& overrides) {
        auto config = load(path, overrides);
        DictWriter writer;
        config.visit(writer);
        return writer.result();
      },
      py::arg("path") = py::none(), py::arg("overrides") = std::vector<std::string>{},
      "Load and validate a run configuration (YAML file, then 'key.path=value' overrides) as nested dicts. "
      "Raises ConfigError (a ValueError with .key) naming the key, the value and what was expected.");
  m.def(
      "config_yaml",
      [](const std::optional<std::string>& path, const std::vector<std::string>& overrides) {
        return load(path, overrides).to_yaml();
      },
      py::arg("path") = py::none(), py::arg("overrides") = std::vector<std::string>{},
      "The resolved configuration as YAML text.");
  m.def(
      "config_reference",
      [] {
        train::RunConfig defaults;
        return core::reference_markdown(core::root_of(defaults));
      },
      "Every configuration key with type, default and meaning, as a Markdown table.");

  m.def(
      "dsl_split",
      [](uint64_t seed, const std::vector<std::string>& tasks, int64_t train_size, int64_t val_size) {
        std::vector<data::DslTask> parsed;
        for (const auto& name : tasks) parsed.push_back(data::parse_dsl_task(name, "tasks"));
        auto split = data::make_dsl_split(seed, parsed, train_size, val_size);
        auto pairs = [](const std::vector<data::DslExample>& examples) {
          std::vector<std::pair<std::string, std::string>> out;
          for (const auto& e : examples) out.emplace_back(e.request, e.program);
          return out;
        };
        return std::make_pair(pairs(split.train), pairs(split.validation));
      },
      py::arg("seed"), py::arg("tasks") = std::vector<std::string>{"flowroll", "dimmatch"}, py::arg("train_size"),
      py::arg("val_size"), "FLOWROLL/DIMMATCH (request, program) pairs: (train, validation).");
  m.def("check_program", &data::check_program, py::arg("program"),
        "'' when the program follows the FLOWROLL/DIMMATCH grammar, else the reason.");

  m.def("corpus_bleu4", &train::corpus_bleu4, py::arg("candidates"), py::arg("references"),
        "Corpus BLEU-4 over whitespace tokens, no smoothing.");
  m.def("rouge_l", &train::rouge_l, py::arg("candidate"), py::arg("reference"), "ROUGE-L F1 over whitespace tokens.");
  scaletrain::python::bind_amp(m);
  scaletrain::python::bind_optim(m);
  scaletrain::python::bind_attention(m);

  m.def("mean_rouge_l", &train::mean_rouge_l, py::arg("candidates"), py::arg("references"));
}
