"""Flash attention forward and backward TFLOP/s against every SDPA backend, in one process.

    python benchmarks/python/bench_attention.py --out benchmarks/results/attention_h200.json
    python benchmarks/python/bench_attention.py --hd 64 --seqs 1024 4096 --out /tmp/a.json
    python benchmarks/python/bench_attention.py --gpt2-build build-gpu --seqs --out /tmp/gpt2.json

Cases as ../shared/anchors/measure_pytorch_baselines.py measures them: bf16, 16k tokens per batch
(batch = 16384 / s), 2048 / head_dim heads, s = 512 .. 16384, causal and not. FLOPs: 4 * batch *
heads * s^2 * head_dim (halved when causal); the backward counts 2.5x the forward. Times: the median
of per-iteration CUDA events over --rep runs after 5 warm-ups; the backward is autograd.grad of the
forward's output (retain_graph), the same call for every implementation. --timing device (the
default) queues each call behind a sleep kernel, so the events time the GPU's work alone, as in a
training loop whose host runs ahead; --timing called lets the host's time per call (op dispatch,
allocation, launch) show too, which matters only for the shortest cases. Before timing, each case
checks our output and gradients against SDPA's (printed as the max abs difference). On an sm_90
device ours runs the Hopper kernels; the portable (mma.sync) kernels are timed beside them
(SCALETRAIN_FLASH_SM90=0) and recorded as rows of their own.

--gpt2-build BUILD adds the end-to-end row: GPT-2 124M bf16 training tok/s (configs/gpt2_124m.yaml,
B16 x T1024, bench_train_gpt2.py's runner) with model.attention=flash against model.attention=sdpa
(torch's SDPA, which picks its flash or cuDNN kernel), both scaletrain's trainer.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grad_pass import timed  # noqa: E402
from bench_results import write_results  # noqa: E402
from scaletrain.attention import cuda_last_forward_kernel, flash_attention  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_impl(attend, q, k, v, do, rep, queued):
    fwd = timed(lambda: attend(q, k, v), nothing, rep, 5, queued)
    o = attend(q, k, v)
    bwd = timed(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), nothing, rep, 5, queued)
    return fwd, bwd


def nothing():
    pass


def sdpa(backend, causal):
    def attend(q, k, v):
        with sdpa_kernel(BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attend


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--hd", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqs", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--baselines", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--timing", choices=["device", "called"], default="device",
                    help="device: calls queued behind a sleep kernel (GPU time alone); called: host time shows too")
    ap.add_argument("--gpt2-build", help="build folder with the scaletrain executable: add the GPT-2 124M row")
    ap.add_argument("--gpt2-steps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA device")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = torch.device("cuda")
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    # On sm_90 (and a build for it) ours are the Hopper kernels; the portable ones are timed too.
    hopper = torch.cuda.get_device_capability() == (9, 0) and os.environ.get("SCALETRAIN_FLASH_SM90") != "0"
    rows, table = [], []
    queued = args.timing == "device"
    for hd in args.hd:
        for causal in causals:
            for s in args.seqs:
                batch, heads = max(1, 16384 // s), 2048 // hd
                torch.manual_seed(0)
                q, k, v = [torch.randn(batch, heads, s, hd, device=dev, dtype=dtype, requires_grad=True)
                           for _ in range(3)]
                do = torch.randn_like(q)
                flops = 4 * batch * heads * s * s * hd / (2 if causal else 1)
                words = f"{args.dtype} hd{hd} s{s} {'causal' if causal else 'noncausal'}"
                ours_fn = lambda a, b, c: flash_attention(a, b, c, causal=causal)  # noqa: E731
                # Agreement with SDPA flash before timing.
                o_ours = ours_fn(q, k, v)
                kernel = cuda_last_forward_kernel()  # which forward ran (the timed calls take the same)
                g_ours = torch.autograd.grad(o_ours, (q, k, v), do)
                o_ref = sdpa("flash", causal)(q, k, v)
                g_ref = torch.autograd.grad(o_ref, (q, k, v), do)
                diff = [float((a.float() - b.float()).abs().max()) for a, b in zip((o_ours, *g_ours), (o_ref, *g_ref))]
                del o_ours, g_ours, o_ref, g_ref
                f_ours, b_ours = time_impl(ours_fn, q, k, v, do, args.rep, queued)
                t = {"ours": (f_ours, b_ours)}
                if hopper:  # the portable mma.sync kernels, which the Hopper ones replace on sm_90
                    os.environ["SCALETRAIN_FLASH_SM90"] = "0"
                    try:
                        t["ours portable"] = time_impl(ours_fn, q, k, v, do, args.rep, queued)
                    finally:
                        del os.environ["SCALETRAIN_FLASH_SM90"]
                for name in args.baselines:
                    try:
                        t[name] = time_impl(sdpa(name, causal), q, k, v, do, args.rep, queued)
                    except RuntimeError as e:
                        print(f"  {name}: {str(e)[:100]}", flush=True)
                tf = {n: (flops / f / 1e9, 2.5 * flops / b / 1e9) for n, (f, b) in t.items()}
                line = f"{words:32s} ours {tf['ours'][0]:6.1f} / {tf['ours'][1]:6.1f}" + "".join(
                    f"  {n} {tf[n][0]:6.1f} / {tf[n][1]:6.1f}" for n in args.baselines if n in tf)
                if "ours portable" in tf:
                    line += f"  ours portable {tf['ours portable'][0]:6.1f} / {tf['ours portable'][1]:6.1f}"
                print(line + f"   max|diff| vs flash out {diff[0]:.2e} dq {diff[1]:.2e} dk {diff[2]:.2e} "
                      f"dv {diff[3]:.2e}   forward kernel {kernel}", flush=True)
                table.append({"hd": hd, "causal": causal, "s": s, "batch": batch, "heads": heads,
                              "ours_forward_kernel": kernel,
                              "tflops": {n: [round(x, 1) for x in v_] for n, v_ in tf.items()},
                              "max_abs_diff_vs_sdpa_flash": dict(zip(["out", "dq", "dk", "dv"], diff))})
                for name in args.baselines + ["ours portable"]:
                    if name not in tf:
                        continue
                    baseline_name = ("scaletrain portable kernels (mma.sync, SCALETRAIN_FLASH_SM90=0)"
                                     if name == "ours portable" else f"torch SDPA {name}")
                    for i, direction in enumerate(["fwd", "bwd"]):
                        rows.append({"name": f"attention {direction} {words}", "unit": "TFLOP/s",
                                     "ours": round(tf["ours"][i], 1), "baseline": round(tf[name][i], 1),
                                     "baseline_name": baseline_name, "higher_is_better": True})
                del q, k, v, do
                torch.cuda.empty_cache()
                write_results(args.out, torch.cuda.get_device_name(), timing=args.timing, rows=rows, cases=table)  # a cut run keeps these
    if args.gpt2_build:  # after the kernels' rows are saved
        rows += gpt2_rows(Path(args.gpt2_build), args.gpt2_steps)
        write_results(args.out, torch.cuda.get_device_name(), timing=args.timing, rows=rows, cases=table)


def gpt2_rows(build, steps):
    import tempfile

    import numpy as np
    from bench_train_gpt2 import VOCAB, ours
    with tempfile.TemporaryDirectory() as work:
        tokens = Path(work) / "tokens.bin"
        np.random.default_rng(0).integers(0, VOCAB, 20_000_000, dtype=np.uint16).tofile(tokens)
        rate = {}
        for backend in ("flash", "sdpa"):
            rate[backend], peak, _, _ = ours(build / "scaletrain", tokens, "bf16", steps, work,
                                             extra=[f"model.attention={backend}"])
            print(f"train gpt2-124m bf16 attention {backend}: {rate[backend]:,.0f} tok/s, "
                  f"peak {peak / 2**30:.2f} GiB", flush=True)
    return [{"name": "train gpt2-124m bf16 attention flash tok/s", "unit": "tok/s", "ours": round(rate["flash"]),
             "baseline": round(rate["sdpa"]), "baseline_name": "scaletrain with model.attention=sdpa (torch SDPA)",
             "higher_is_better": True}]


if __name__ == "__main__":
    main()
