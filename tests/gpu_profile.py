"""Where the time of one recognition goes on a GPU: prefix and decode step timed, and their kernels listed.

Issue 19's targets on an H100 or H200 are one image at top-20 in bfloat16 within 8 ms and batch 64 at
top-10 at 400 images/s or more. For each of those shapes this times the prefix (image encoder, prompt and
the prefill of the cache) and one decode step of the fixed-shape sampler, eager and captured as a CUDA
graph, and lists the kernels of one captured step and of the prefix by GPU time, beside the floors that
bound them: the weights a step must read at the measured copy bandwidth, the prefix's multiply-adds.

    python tests/gpu_profile.py --device cuda              # tests/gpu_check.sh runs it on the GPU
    python tests/gpu_profile.py --device cpu --preset tiny  # a rehearsal
"""

import argparse
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from nxtp_minimal.tools.bench import PROMPT_IDS, build

SHAPES = ((1, 20), (64, 10))  # (images, labels) of the two targets
STEPS = 18  # the decode steps the cache is sized for: the official 19 tokens per branch, the first included


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, repeats=20) -> float:
    fn()  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernels(fn, device, rows: int) -> str:
    """The top `rows` operations of one call by time on the device (the CPU for a rehearsal)."""
    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        sync(device)
    own = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if getattr(e, own) > 0), key=lambda e: -getattr(e, own))
    total = sum(getattr(e, own) for e in events)
    launched = f"{sum(e.device_type == DeviceType.CUDA for e in prof.events())} kernels, " if cuda else ""
    lines = [f"   {launched}{total / 1e3:.3f} ms on the {'GPU' if cuda else 'CPU'}"]
    for e in events[:rows]:
        t = getattr(e, own)
        lines.append(f"   {t / 1e3:8.3f} ms {100 * t / total:5.1f}% x{e.count:<5} {e.key[:90]}")
    return "\n".join(lines)


def copy_bandwidth(device) -> float:
    """Bytes read and written per second by a copy on the device: 1 GiB on a GPU, well past its cache."""
    x = torch.empty(2**30 if torch.device(device).type == "cuda" else 2**24, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / (median_ms(lambda: y.copy_(x), device, 5) / 1e3)


def measure(model, device, images: int, k: int, capture: bool, rows: int) -> None:
    """Timings and kernels for `images` images at top-k."""
    c = model.config
    pixels = torch.randn(images, 3, c.vision.image_size, c.vision.image_size, device=device)
    newest = torch.zeros(images, k, dtype=torch.long, device=device)

    def prefix(capture):  # the image encoder, the prompt and the prefill, into the kept sampler
        return model.static_sampler(pixels, k, PROMPT_IDS, STEPS, capture=capture)

    eager = prefix(False)
    prefix_ms = median_ms(lambda: prefix(False), device)
    eager_ms = median_ms(lambda: eager.step(newest, 1), device)
    # a multiply-add (2 FLOP) per weight and token: the ViT over 1 + P tokens, the decoder's blocks over
    # P + prompt (the output layer runs for the last position only)
    n_vision = sum(p.numel() for p in model.vision_encoder.parameters())
    n_blocks = sum(p.numel() for p in model.language_decoder.layers.parameters())
    flop = 2 * images * (n_vision * (1 + c.vision.n_patches) + n_blocks * (c.vision.n_patches + len(PROMPT_IDS)))
    print(f"\n== {images} image(s), top-{k}: prefix {prefix_ms:.2f} ms ({flop / 1e12:.2f} TFLOP of matrix work: "
          f"{flop / prefix_ms / 1e9:.0f} TFLOP/s); eager step {eager_ms:.2f} ms")
    captured = prefix(capture)
    if capture:
        step_ms = median_ms(lambda: captured.step(newest, 1), device)
        total = prefix_ms + 3 * step_ms  # bench's default: 3 decode steps
        print(f"captured step {step_ms:.2f} ms; prefix + 3 steps {total:.2f} ms: {1e3 * images / total:.0f} images/s")
    print(f"-- one {'captured' if capture else 'eager'} step:")
    print(kernels(lambda: captured.step(newest, 1), device, rows))
    print("-- the prefix:")
    print(kernels(lambda: prefix(capture), device, rows))


@torch.inference_mode()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="full")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=12, help="operations listed per profile")
    args = p.parse_args(argv)
    device = args.device
    capture = torch.device(device).type == "cuda"
    model = build(args.preset, device, getattr(torch, args.dtype))
    decoder_bytes = sum(p.numel() * p.element_size() for p in model.language_decoder.parameters())
    bandwidth = copy_bandwidth(device)
    print(f"{args.preset} model, {args.dtype}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if capture else ''}; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s; a step reads the decoder's {decoder_bytes / 1e9:.2f} GB at least once: "
          f"floor {1e3 * decoder_bytes / bandwidth:.2f} ms per step")
    for images, k in SHAPES:
        measure(model, device, images, k, capture, args.rows)

if __name__ == "__main__":
    main()
