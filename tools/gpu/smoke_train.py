"""In-process training smoke test on the GPU host: scaletrain.train on the GPT-2 config, 3 steps."""
import faulthandler
import sys
import tempfile

import numpy as np

faulthandler.enable()
import scaletrain  # noqa: E402

d = tempfile.mkdtemp()
np.random.default_rng(0).integers(0, 50257, 3_000_000, dtype=np.uint16).tofile(d + "/t.bin")
summary = scaletrain.train("configs/gpt2_124m.yaml", [f"data.path={d}/t.bin", "train.max_steps=3", f"train.out_dir={d}/o",
                                                     "eval.every=0", "eval.loss_batches=1", "train.save_model=false"]
                           + sys.argv[1:])
print("smoke_train ok", summary["tokens_per_second"], flush=True)
