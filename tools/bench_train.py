"""Training speed: the model's training step on synthetic tensors vs the data pipeline alone, in images/s.

    python tools/bench_train.py                                    # demo preset, built-in dataset
    python tools/bench_train.py --preset coco --no-pretrained --device cuda --amp bf16 --steps 30
    python tools/bench_train.py --help                             # 05_train.py's flags, plus --steps --rounds

The run is built exactly as 05_train.py builds it (its `configure` and `Run`: data, loaders, model, EMA,
optimiser, scaler, loss, compile), from the same flags. Then, in interleaved rounds (tools/timing.py; round 0 warms up: cuDNN
autotuning, allocator, worker start-up, torch.compile):
- "training step": --steps forward + backward + optimiser steps on random tensors of the run's batch and
  input size (what the model alone can do);
- "data pipeline": --steps batches from the run's training loader (decoding, augmentation, collation).
Whichever is slower limits training. On CUDA it also prints the peak GPU memory. With worker processes the
loader prefetches up to 2 batches per worker while the model has its turn, so the data figure is an upper
bound when --steps is not much larger than 2 x --workers.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import importlib  # noqa: E402

import torch  # noqa: E402

from tools.timing import median, show, time_interleaved  # noqa: E402

train = importlib.import_module("05_train")


def benchmark(argv=None):
    """Both rates for 05_train.py's flags `argv` (plus --steps, --rounds); returns them in a dict."""
    parser = train.build_parser()
    parser.prog, parser.description = "tools/bench_train.py", __doc__.splitlines()[0]
    group = parser.add_argument_group("benchmark")
    group.add_argument("--steps", type=int, default=10, help="steps (and batches) per round (default: 10)")
    group.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default: 3)")
    given = vars(parser.parse_args(argv))
    steps, rounds = given.pop("steps"), given.pop("rounds")
    if steps < 1 or rounds < 1:
        parser.error(f"--steps {steps} --rounds {rounds}: both must be >= 1")
    d = train.setup_distributed(given.get("device", "auto"))
    config, spec, _, _ = train.configure(given, d)
    torch.manual_seed(config.seed)
    r = train.Run(config, spec, d, log=lambda message: None)

    B, S, K = config.batch_size, config.img_size, len(r.class_names)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    images = torch.randn(B, 3, S, S, device=d.device).contiguous(memory_format=memory_format)  # (B, 3, S, S)
    targets = (torch.rand(B, K, device=d.device) < 0.05).float()  # (B, K)
    cuda = d.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    r.model.train()

    def training_steps():  # the step of 05_train.train_one_epoch, without its bookkeeping
        for _ in range(steps):
            with torch.autocast(d.device.type, dtype=r.amp_dtype or torch.float32, enabled=r.amp_dtype is not None):
                loss = r.criterion(r.model(images), targets)
            r.scaler.scale(loss).backward()
            r.scaler.step(r.optimizer)
            r.scaler.update()
            r.optimizer.zero_grad(set_to_none=True)

    r.train_loader.sampler.set_epoch(0)
    batches = iter(r.train_loader)

    def data_batches():
        nonlocal batches
        for _ in range(steps):
            try:
                next(batches)
            except StopIteration:  # the epoch ended: the next one, as training would
                batches = iter(r.train_loader)
                next(batches)

    times = time_interleaved({"training step": training_steps, "data pipeline": data_batches}, rounds,
                             sync=torch.cuda.synchronize if cuda else None)
    model_rate, data_rate = (B * steps / median(times[name]) for name in ("training step", "data pipeline"))
    result = {"device": str(d.device), "amp": str(r.amp_dtype), "channels_last": config.channels_last,
              "compile": config.compile, "batch_size": B, "img_size": S, "workers": config.workers,
              "train_images_per_s": model_rate, "data_images_per_s": data_rate, "steps": steps, "rounds": rounds}
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"benchmark ({d.device}, batch {B}, {S} px, amp {r.amp_dtype}, channels_last {config.channels_last}, "
          f"compile {config.compile}, {config.workers} workers; median of {rounds} rounds of {steps} steps):\n"
          f"  training step on synthetic tensors: {model_rate:8.1f} images/s  ({show(times['training step'])})\n"
          f"  data pipeline alone:                {data_rate:8.1f} images/s  ({show(times['data pipeline'])})\n"
          + (f"  peak GPU memory: {result['peak_gpu_memory_gib']:.2f} GiB\n" if cuda else "")
          + f"  -> {'the data pipeline' if data_rate < model_rate else 'the model'} limits training speed")
    return result


if __name__ == "__main__":
    benchmark()
