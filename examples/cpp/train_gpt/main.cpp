// Train a GPT from C++ without the CLI: load a YAML file, override a key in code, train, then
// decode a request of your own.
//
//   ./build/examples/cpp/train_gpt/train_gpt configs/tiny_cpu.yaml "from sales.csv, take 5"
#include <iostream>

#include <scaletrain/data/dataset.h>
#include <scaletrain/data/tokenizer.h>
#include <scaletrain/model/generate.h>
#include <scaletrain/train/trainer.h>

int main(int argc, char** argv) {
  using namespace scaletrain;
  if (argc < 2) {
    std::cerr << "usage: train_gpt CONFIG.yaml [REQUEST]\n";
    return 2;
  }
  try {
    auto config = train::RunConfig::load(argv[1], {"train.out_dir=runs/train_gpt_example"});
    train::Trainer trainer(config);
    auto summary = trainer.fit();
    std::cout << train::format_summary(summary);
    if (argc > 2) {
      model::GenerateOptions options;
      auto out = model::greedy_generate(trainer.model(), {data::PairDataset::prompt_tokens(argv[2])}, options);
      std::cout << "\n" << argv[2] << "\n  => " << data::ByteTokenizer().decode(out[0]) << "\n";
    }
  } catch (const core::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
