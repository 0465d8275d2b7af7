// Uses scaletrain as an installed library: builds a configuration in code, validates it, builds
// the model and a dataset, and trains a few steps.
#include <iostream>

#include <scaletrain/core/version.h>
#include <scaletrain/train/trainer.h>

int main() {
  using namespace scaletrain;
  train::RunConfig config;
  config.model.n_layer(1).n_head(2).n_embd(32).block_size(224);
  config.data.train_examples(256).val_examples(8);
  config.train.max_steps(5).batch_size(4).out_dir("").device(train::DeviceChoice::cpu);
  config.eval.before_training(false).examples(4).max_new_tokens(8);

  train::Trainer trainer(config);
  auto summary = trainer.fit();
  std::cout << "scaletrain " << SCALETRAIN_VERSION << ": trained " << summary.steps << " steps, "
            << summary.parameters << " parameters, val loss " << summary.after.loss << "\n";
  std::cout << (summary.after.loss < 6.0 ? "consumer: ok" : "consumer: loss out of range") << "\n";
  return 0;
}
