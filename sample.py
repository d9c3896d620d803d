"""Sample from a trained DiM: checkpoint -> PNG grid (images), or animated GIF grid or MP4 (videos).

    python sample.py --ckpt results/000-DiM-Ti-2-shapes/checkpoints/0001600.pt
    python sample.py --ckpt PATH --sampler ddpm --num-sampling-steps 250 --cfg-scale 4 --class-labels 0 1 2

The model is rebuilt from the arguments stored in the checkpoint; the EMA weights are used, as in
DiT. On a GPU it runs under bf16 autocast, as it trained (--precision fp32 for full precision), and
--cuda-graphs replays one recorded forward at each step (small models). A model trained on latents
has its samples decoded by the VAE the latents were made with. For the shapes data set, --judge
reports how many samples show the class that was asked for.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

from data import SHAPE_CLASSES, UserError, decode, judge, load_vae, require
from diffusion import Diffusion, guided
from dim import build_model
from scan import BACKENDS, triton_available


def load_checkpoint(path):
    """The checkpoint dict, or a UserError that says why this file is not one of ours."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one holding more than plain types
        raise UserError(f"{path} is not a DiM checkpoint ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "ema", "args", "step"} <= set(ckpt):
        raise UserError(f"{path} is not a DiM checkpoint (expected the keys model, ema, opt, args, step)")
    return ckpt


def positive_int(text):
    """argparse type for counts (steps, samples, sizes): 0 or less is refused with the flag's name."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_device(device):
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU that torch can use; try --device cpu")


def check_scan_backend(backend, device):
    """A scan backend that cannot run on this device, asked for by name, is the user's to change."""
    if backend == "triton" and not triton_available(torch.device(device)):
        raise UserError(f"--scan triton needs a CUDA GPU and Triton (this is {device}); "
                        "--scan auto takes the fastest scan that runs here")


def model_from_args(args, info):
    """Build the DiM that train.py trains for these arguments (a dict) and data set info."""
    return build_model(args["model"], input_size=info.get("input_size", args["image_size"]),  # latents: side / 8
                       in_channels=info["channels"], num_classes=info["num_classes"], num_frames=args["num_frames"],
                       mixer=args["mixer"], scan_backend=args["scan"], grad_ckpt=args.get("grad_ckpt", False))


def precision_for(precision, device):
    """The autocast precision asked for, or the default: bf16 on GPUs (as train.py trains), fp32 on the CPU."""
    return precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")


@torch.no_grad()
def generate(model, labels, sampler="ddim", num_steps=50, cfg_scale=1.0, seed=0, progress=False, clip_x0=None,
             precision="fp32", cuda_graph=False):
    """Samples for the given labels: (N, C, H, W) or (N, T, C, H, W), pixels in [-1, 1] or latents.
    clip_x0: clamp the predicted clean image to [-1, 1] at each step (default: for pixels, C = 3).
    precision: "bf16" runs the model under bf16 autocast; its output and the sampler stay in fp32.
    cuda_graph: record the model's forward once and replay it at every step (a CUDA GPU)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    shape = (len(labels),) + ((cfg.num_frames,) if cfg.num_frames > 1 else ()) + \
        (cfg.in_channels, cfg.input_size, cfg.input_size)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator).to(device)
    diffusion = Diffusion(learn_sigma=cfg.learn_sigma).respaced(num_steps).to(device)
    model_fn = guided(lambda x, t, y: model(x, t, y).float(), labels.to(device), cfg_scale, cfg.num_classes)
    # a graph cannot hold autocast's cache of cast weights; eager, the cache casts each weight once a run
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                              cache_enabled=not cuda_graph)
    # the DDPM noise from `seed`, without disturbing the caller's random streams (a training run's)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        if cuda_graph:
            model_fn = recorded(model_fn, noise, torch.zeros(len(labels), dtype=torch.long, device=device))
        torch.manual_seed(seed)
        run = diffusion.ddpm_sample if sampler == "ddpm" else diffusion.ddim_sample
        clip_x0 = cfg.in_channels == 3 if clip_x0 is None else clip_x0
        samples = run(model_fn, noise, progress=progress, clip_x0=clip_x0)
        return samples.clamp(-1, 1) if cfg.in_channels == 3 else samples


def recorded(model_fn, x, t):
    """model_fn recorded as a CUDA graph on inputs like (x, t), and a function that replays it: a step
    then launches one graph instead of a few thousand kernels, which is most of a small model's time on
    a fast GPU. Each call copies its inputs into the graph's own and returns a copy of its output.
    Two warm-up calls first, on a side stream as recording wants (Triton compiles, cuBLAS chooses)."""
    inputs = (x.clone(), t.clone())
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            model_fn(*inputs)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = model_fn(*inputs)

    def replay(x, t):
        inputs[0].copy_(x)
        inputs[1].copy_(t)
        graph.replay()
        return output.clone()
    replay.model_fn = model_fn  # the graph reads tensors that model_fn holds (the labels): keep them alive
    return replay


def to_pixels(samples, info, vae=None):
    """Samples of a latent model decoded by the SD VAE the data set was encoded with (or `vae`);
    pixel samples as they are."""
    if "vae" not in info:
        return samples
    pixels = decode(load_vae(vae or info["vae"], samples.device), samples.flatten(0, samples.dim() - 4))
    return pixels.view(*samples.shape[:-3], *pixels.shape[1:])               # (N, [T,] 3, H, W)


def save_samples(samples, path, columns=None):
    """A PNG grid of images, or a grid of clips (one clip per cell): an animated GIF, or an MP4
    when the path ends in .mp4."""
    samples = ((samples.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    clips = samples if samples.dim() == 5 else samples[:, None]              # (N, T, C, H, W)
    n, frames, c, h, w = clips.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = torch.zeros(frames, c, rows * (h + 2), columns * (w + 2), dtype=torch.uint8)
    for i in range(n):
        top, left = (i // columns) * (h + 2) + 1, (i % columns) * (w + 2) + 1
        grid[:, :, top:top + h, left:left + w] = clips[i]
    pictures = [Image.fromarray(frame.permute(1, 2, 0).squeeze(-1).numpy()) for frame in grid]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".mp4"):
        save_mp4(grid.permute(0, 2, 3, 1).numpy(), path)
    elif frames == 1:
        pictures[0].save(path)
    else:
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=125, loop=0)
    return path


def save_mp4(frames, path, fps=8):
    """frames (T, H, W, 3) uint8 -> an MPEG-4 video (H and W even, as yuv420p needs)."""
    av = require("av", "MP4 output")
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=50,
                        help="steps of the respaced process, at most the 1000 of training")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance; 1 = none")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="labels to sample (default: every class in turn, --num-samples in all)")
    parser.add_argument("--num-samples", type=positive_int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--judge", action="store_true", help="shapes only: score samples against their labels")
    parser.add_argument("--out", default=None, help="output file: .png, .gif, or .mp4 for videos "
                        "(default: next to the run's checkpoints)")
    parser.add_argument("--vae", default=None, help="latent models: the VAE that decodes samples (default: the "
                        "one recorded with the data set; ema, mse, or a local folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="autocast precision of the model (default: bf16 on GPUs, fp32 on the CPU)")
    parser.add_argument("--cuda-graphs", action="store_true", help="record the model's forward once and replay "
                        "it every step: small models on fast GPUs wait on the host otherwise")
    parser.add_argument("--scan", choices=BACKENDS, default="auto",
                        help="selective-scan backend to sample with (the one trained with need not run here)")
    return parser.parse_args(argv)


def main(args):
    ckpt = load_checkpoint(args.ckpt)
    train_args, info = ckpt["args"], ckpt["data_info"]
    check_device(args.device)
    check_scan_backend(args.scan, args.device)
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU (--device cuda)")
    trained_steps = Diffusion().num_timesteps
    if args.num_sampling_steps > trained_steps:
        raise UserError(f"--num-sampling-steps {args.num_sampling_steps}: the model was trained on {trained_steps} "
                        "steps, the most a sampler can take")
    model = model_from_args(dict(train_args, scan=args.scan), info)
    model.load_state_dict(ckpt["model" if args.no_ema else "ema"])
    model.to(args.device).eval()
    num_classes = info["num_classes"]
    labels = args.class_labels or [i % num_classes for i in range(args.num_samples)]
    if min(labels) < 0 or max(labels) >= num_classes:
        raise UserError(f"--class-labels must lie in [0, {num_classes - 1}] for this checkpoint")
    labels = torch.tensor(labels)
    samples = generate(model, labels, args.sampler, args.num_sampling_steps, args.cfg_scale, args.seed, progress=True,
                       precision=precision_for(args.precision, args.device), cuda_graph=args.cuda_graphs)
    samples = to_pixels(samples, info, args.vae)
    video = samples.dim() == 5
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))), "samples",
                                   f"sample-{ckpt['step']:07d}-{args.sampler}{args.num_sampling_steps}"
                                   f"-cfg{args.cfg_scale:g}.{'gif' if video else 'png'}")
    save_samples(samples, out, columns=num_classes if len(labels) % num_classes == 0 else None)
    print(f"wrote {len(labels)} {'clips' if video else 'images'} to {out}")
    result = dict(path=out, samples=samples, labels=labels)
    if args.judge:
        if train_args["dataset"] != "shapes":
            raise UserError("--judge only knows the shapes data set")
        result["accuracy"] = (judge(samples) == labels).float().mean().item()
        print(f"judged accuracy: {result['accuracy']:.3f} of samples show the requested class "
              f"({', '.join(SHAPE_CLASSES)})")
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as error:
        sys.exit(f"error: {error}")
