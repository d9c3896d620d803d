"""Sample from a trained DiM: checkpoint -> PNG grid (images), animated GIF grid or MP4 (videos), or
an .npz of many samples for FID / FVD (DiT's sample_ddp.py).

    python sample.py --ckpt results/000-DiM-Ti-2-shapes/checkpoints/0001600.pt
    python sample.py --ckpt PATH --sampler ddpm --num-sampling-steps 250 --cfg-scale 4 --class-labels 0 1 2
    torchrun --nproc_per_node=4 sample.py --ckpt PATH --num-fid-samples 50000 --cfg-scale 1.5 --out s.npz

The model is rebuilt from the arguments stored in the checkpoint; the EMA weights are used, as in
DiT. On a GPU it runs under bf16 autocast, as it trained (--precision fp32 for full precision), and
--cuda-graphs replays one recorded forward at each step (small models), --compile fuses it with
torch.compile. A model trained on latents has its samples decoded by the VAE the latents were made
with. For the shapes data set, --judge reports how many samples show the class that was asked for.

Mass sampling draws sample i from noise seeded by (--seed, i) and labels it i mod classes, so the
.npz is the same for any number of ranks, and a stopped run started again carries on where it was.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from data import (UserError, decode, describe_judgement, judge_report, load_vae, number_in, positive_int, process_group,
                  require, run_script, write_json, write_npz)
from diffusion import Diffusion, guided
from dim import build_model
from scan import BACKENDS, triton_available


def load_checkpoint(path):
    """The checkpoint dict, or a UserError that says why this file is not one of ours."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; pass a file, e.g. {os.path.join(path, 'checkpoints', 'NNNNNNN.pt')}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one holding more than plain types
        raise UserError(f"{path} is not a DiM checkpoint ({type(error).__name__}: {str(error)[:200]})") from None
    keys = {"model", "ema", "args", "step", "data_info"}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        missing = ", ".join(sorted(keys - set(ckpt))) if isinstance(ckpt, dict) else "all"
        raise UserError(f"{path} is not a DiM checkpoint of train.py (missing: {missing})")
    missing = [k for k in ("model", "image_size", "num_frames", "mixer", "dataset") if k not in ckpt["args"]] + \
        [k for k in ("channels", "num_classes") if k not in ckpt["data_info"]]
    if missing:
        raise UserError(f"{path} is damaged or from another program: its args / data_info lack {', '.join(missing)}")
    return ckpt


def load_weights(module, state, path, what="model"):
    """module.load_state_dict(state), or a UserError naming the checkpoint and what does not fit."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"the {what} weights of {path} do not fit the model its arguments describe "
                        f"({str(error).splitlines()[0][:200]}...)") from None


def check_device(device):
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU that torch can use; try --device cpu")


def compiled(module, device):
    """torch.compile of module (--compile): the model's ops fused into fewer kernels, each scan one opaque
    operator (scan.py registers them), so the graph has no break. The first calls compile (a minute
    or more for a large model); on the CPU it needs a C++ compiler."""
    if torch.device(device).type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UserError("--compile on the CPU needs a C++ compiler (g++ or clang++; e.g. apt install g++); "
                        "or leave --compile out")
    return torch.compile(module)


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
             precision="fp32", cuda_graph=False, generators=None):
    """Samples for the given labels: (N, C, H, W) or (N, T, C, H, W), pixels in [-1, 1] or latents.
    clip_x0: clamp the predicted clean image to [-1, 1] at each step (default: for pixels, C = 3).
    precision: "bf16" runs the model under bf16 autocast; its output and the sampler stay in fp32.
    cuda_graph: record the model's forward once and replay it at every step (a CUDA GPU).
    generators: one CPU torch.Generator per sample, which draws its starting noise and every step's
    noise, so that a sample does not depend on the batch it is drawn in (mass sampling); by default
    all the noise comes from `seed`."""
    cfg = model.cfg
    device = next(model.parameters()).device
    item = ((cfg.num_frames,) if cfg.num_frames > 1 else ()) + (cfg.in_channels, cfg.input_size, cfg.input_size)
    if generators is None:
        noise = torch.randn((len(labels),) + item, generator=torch.Generator().manual_seed(seed)).to(device)
        noise_fn = torch.randn_like  # the DDPM steps' noise, from torch.manual_seed(seed) below
    else:
        def noise_fn(x):
            return torch.stack([torch.randn(item, generator=g) for g in generators]).to(x.device)
        noise = noise_fn(torch.empty(0, device=device))                    # (N, [T,] C, H, W)
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
        samples = run(model_fn, noise, progress=progress, clip_x0=clip_x0, noise_fn=noise_fn)
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


def quantised(samples):
    """Pixels in [-1, 1] -> uint8 [0, 255] on the CPU, in the same layout."""
    return ((samples.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_samples(samples, path, columns=None):
    """A PNG grid of images, or a grid of clips (one clip per cell): an animated GIF, or an MP4
    when the path ends in .mp4."""
    samples = quantised(samples)
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


#################################################################################
#          Mass sampling for FID / FVD: DiT's sample_ddp.py, resumable          #
#################################################################################

def sample_generators(seed, indices):
    """One generator per sample index, seeded by (seed, index): sample i is the same whichever rank,
    batch or run draws it."""
    return [torch.Generator().manual_seed((seed * (1 << 32) + int(i)) % (1 << 63)) for i in indices]


def to_uint8(samples):
    """Pixels in [-1, 1], (N, [T,] 3, H, W) -> uint8 (N, [T,] H, W, 3), as ADM's evaluator reads them."""
    return quantised(samples).movedim(-3, -1).numpy()


def sample_pixels(model, info, labels, indices, sampler, num_steps, cfg_scale, seed, precision, cuda_graph=False,
                  vae=None):
    """uint8 pixels (n, [T,] H, W, 3) of the samples with these indices (a range), each drawn from the
    noise of its own index (sample_generators) for labels[index]; latents decoded by the VAE."""
    x = generate(model, labels[indices.start:indices.stop], sampler, num_steps, cfg_scale, precision=precision,
                 cuda_graph=cuda_graph, generators=sample_generators(seed, indices))
    return to_uint8(to_pixels(x, info, vae))


def sample_many(model, info, out, num_samples, settings, batch_size, rank=0, world=1, progress=True,
                cuda_graph=False):
    """num_samples samples into `out` (.npz): arr_0 uint8 (N, H, W, 3) or (N, T, H, W, 3), arr_1 the labels,
    uniform over the classes (sample i shows class i mod classes). The work is cut into batches of
    batch_size indices, rank r draws batches r, r + world, ...; each batch lands in a memory-mapped
    array of OUT.partial/ and its samples are marked done only after it is written, so a stopped run
    started again carries on (also with another batch_size, as after running out of memory), and the
    file does not depend on the number of ranks. `settings`: sampler, num_steps,
    cfg_scale, seed, precision and what else identifies the run (the checkpoint, its step)."""
    cfg = model.cfg
    labels = torch.arange(num_samples) % info["num_classes"]
    frames = (cfg.num_frames,) if cfg.num_frames > 1 else ()
    shape = (num_samples, *frames, info["image_size"], info["image_size"], 3)
    batches = [range(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]
    work = out + ".partial"
    meta = dict(settings, num_samples=num_samples, shape=list(shape))
    if rank == 0:
        os.makedirs(work, exist_ok=True)  # the folder of `out` was checked writable (check_output)
        meta_file = os.path.join(work, "meta.json")
        if os.path.isfile(meta_file):  # resuming: the same run, or refuse to mix two
            with open(meta_file) as f:
                old = json.load(f)
            changed = [k for k in meta if old.get(k) != meta[k]]
            if changed:
                raise UserError(f"{work} holds an unfinished sampling run with other settings ({', '.join(changed)}): "
                                "run it as it was, or delete the folder")
        else:
            np.lib.format.open_memmap(os.path.join(work, "samples.npy"), "w+", np.uint8, shape).flush()
            np.save(os.path.join(work, "done.npy"), np.zeros(num_samples, dtype=np.uint8))  # per sample
            write_json(meta_file, meta)
    if world > 1:
        dist.barrier()  # rank 0 has laid out the files
    arrays = np.load(os.path.join(work, "samples.npy"), mmap_mode="r+")
    done = np.load(os.path.join(work, "done.npy"), mmap_mode="r+")
    if done.shape != (num_samples,):
        raise UserError(f"{work} was written by an older sample.py: delete it to sample again")
    mine = [b for b in range(rank, len(batches), world) if not done[batches[b].start:batches[b].stop].all()]
    for b in tqdm(mine, desc=f"sampling (rank {rank})", disable=not progress):
        indices = batches[b]
        arrays[indices.start:indices.stop] = sample_pixels(
            model, info, labels, indices, settings["sampler"], settings["num_steps"], settings["cfg_scale"],
            settings["seed"], settings["precision"], cuda_graph, settings.get("vae"))
        arrays.flush()
        done[indices.start:indices.stop] = 1
        done.flush()
    if world > 1:
        dist.barrier()  # every rank has written its batches
    if rank == 0:
        write_npz(out, arr_0=np.asarray(arrays), arr_1=labels.numpy())
        del arrays, done
        shutil.rmtree(work)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    parser.add_argument("--num-sampling-steps", type=positive_int, default=50,
                        help="steps of the respaced process, at most the 1000 of training")
    parser.add_argument("--cfg-scale", type=number_in(float, 0), default=4.0, help="classifier-free guidance; 1 = none")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="labels to sample (default: every class in turn, --num-samples in all)")
    parser.add_argument("--num-samples", type=positive_int, default=36, help="samples in the grid")
    parser.add_argument("--num-fid-samples", type=positive_int, default=None, help="instead of a grid: this many "
                        "samples, labels uniform over the classes, into an .npz for evaluate.py (torchrun shares it)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="--num-fid-samples: samples per forward")
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
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (its first forwards compile)")
    parser.add_argument("--cuda-graphs", action="store_true", help="record the model's forward once and replay "
                        "it every step: small models on fast GPUs wait on the host otherwise")
    parser.add_argument("--scan", choices=BACKENDS, default="auto",
                        help="selective-scan backend to sample with (the one trained with need not run here)")
    return parser.parse_args(argv)


def main(args):
    with process_group() as (rank, world, local_rank):
        try:
            return sample(args, rank, world, local_rank)
        except torch.OutOfMemoryError:  # more samples at once than the card holds: one line that says what fits
            raise UserError(
                f"a batch of {args.batch_size} samples does not fit in GPU memory: a smaller --batch-size does "
                "(the same command with it carries on and keeps the samples drawn)" if args.num_fid_samples else
                f"the {len(args.class_labels or range(args.num_samples))} samples of a grid, drawn at once, do not "
                "fit in GPU memory: ask for fewer (--num-samples or --class-labels)") from None


def default_out(args, ckpt, extension):
    """A name beside the run's checkpoints that holds every option that changes the samples."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
    count = args.num_fid_samples or (len(args.class_labels) if args.class_labels else args.num_samples)
    labels = "-labels" + "_".join(map(str, args.class_labels))[:40] if args.class_labels else ""
    name = (f"{ckpt['step']:07d}-{args.sampler}{args.num_sampling_steps}-cfg{args.cfg_scale:g}-seed{args.seed}"
            f"{'-raw' if args.no_ema else ''}-{args.precision}-n{count}{labels}.{extension}")
    return os.path.join(run_dir, "samples", name)


def check_output(out, extensions):
    """An output path that sampling can write when it is done: a known extension, a writable folder."""
    if os.path.isdir(out) or not out.lower().endswith(extensions):
        raise UserError(f"--out {out}: name a file ending in {' or '.join(extensions)}")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create {folder} ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"--out {out}: {folder} is not writable")


def sample(args, rank=0, world=1, local_rank=0):
    ckpt = load_checkpoint(args.ckpt)
    train_args, info = ckpt["args"], ckpt["data_info"]
    check_device(args.device)
    device = torch.device(f"cuda:{local_rank}") if world > 1 and torch.device(args.device).type == "cuda" \
        else torch.device(args.device)
    check_scan_backend(args.scan, device)
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU (--device cuda)")
    if args.cuda_graphs and args.compile:
        raise UserError("--compile and --cuda-graphs: choose one")
    trained_steps = Diffusion().num_timesteps
    if args.num_sampling_steps > trained_steps:
        raise UserError(f"--num-sampling-steps {args.num_sampling_steps}: the model was trained on {trained_steps} "
                        "steps, the most a sampler can take")
    if args.judge and train_args["dataset"] != "shapes":
        raise UserError("--judge only knows the shapes data set")
    if world > 1 and not args.num_fid_samples:
        raise UserError("torchrun shares the work of --num-fid-samples; a grid is drawn by one process")
    args.precision = precision_for(args.precision, device)
    model = model_from_args(dict(train_args, scan=args.scan), info)
    load_weights(model, ckpt["model" if args.no_ema else "ema"], args.ckpt)
    model.to(device).eval()
    if args.compile:
        model = compiled(model, device)
    num_classes = info["num_classes"]
    if args.num_fid_samples:
        out = args.out or default_out(args, ckpt, "npz")
        check_output(out, (".npz",))
        if os.path.exists(out):
            raise UserError(f"{out} exists: choose another --out, or delete it to sample again")
        settings = dict(checkpoint=os.path.abspath(args.ckpt), step=ckpt["step"], ema=not args.no_ema,
                        sampler=args.sampler, num_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                        seed=args.seed, precision=args.precision, vae=args.vae)
        sample_many(model, info, out, args.num_fid_samples, settings, args.batch_size, rank, world,
                    progress=rank == 0, cuda_graph=args.cuda_graphs)
        if rank == 0:
            print(f"wrote {args.num_fid_samples} samples to {out} (arr_0: pixels, arr_1: labels)")
        return dict(path=out)
    labels = args.class_labels or [i % num_classes for i in range(args.num_samples)]
    if min(labels) < 0 or max(labels) >= num_classes:
        raise UserError(f"--class-labels must lie in [0, {num_classes - 1}] for this checkpoint")
    labels = torch.tensor(labels)
    video = model.cfg.num_frames > 1
    out = args.out or default_out(args, ckpt, "gif" if video else "png")
    check_output(out, (".gif", ".mp4") if video else (".png", ".gif", ".jpg"))  # before the work, not after
    samples = generate(model, labels, args.sampler, args.num_sampling_steps, args.cfg_scale, args.seed, progress=True,
                       precision=args.precision, cuda_graph=args.cuda_graphs)
    samples = to_pixels(samples, info, args.vae)
    save_samples(samples, out, columns=num_classes if len(labels) % num_classes == 0 else None)
    print(f"wrote {len(labels)} {'clips' if video else 'images'} to {out}")
    result = dict(path=out, samples=samples, labels=labels)
    if args.judge:
        result.update(judge_report(samples, labels))
        print(f"judged {len(labels)} samples: {describe_judgement(result)}")
    return result


if __name__ == "__main__":
    run_script(main, parse_args)
