"""Train DiM: one code path for a laptop CPU, one GPU, or several with torchrun (DDP).

    python train.py                                   # shapes, DiM-Ti/2, minutes on a CPU
    python train.py --dataset folder --data-path DIR --model DiM-S/2 --image-size 64
    torchrun --nproc_per_node=4 train.py --model DiM-XL/2 --dataset folder --data-path DIR
    python train.py --resume auto                     # continue the newest run of this model and data

DiT's recipe (AdamW, no weight decay, EMA of the weights, label dropout for classifier-free
guidance, the hybrid loss of diffusion.py), with what small-GPU work needs: bf16 autocast, gradient
clipping and checkpointing, exact resume, periodic EMA samples, a progress bar, --compile
(torch.compile), and --cuda-graphs for small models on fast GPUs, whose steps otherwise wait on the
host's kernel launches. The learning rate decays on a cosine to zero at --max-steps (a short run
ends better); --lr-schedule constant is DiT's.
A run lives in results/NNN-<model>[-attention]-<dataset>[-<T>f]/ with log.txt, loss.png,
checkpoints/NNNNNNN.pt and samples/. --accum-steps splits a step into micro-batches for small GPUs;
--eval-every logs the FID of EMA samples (evaluate.py).
"""

import argparse
import contextlib
import copy
import glob
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from data import DATASETS, UserError, make_dataset, number_in, process_group, run_script
from diffusion import Diffusion
from evaluate import TrainingFID
from dim import PRESETS
from sample import (check_scan_backend, compiled, generate, load_checkpoint, load_weights, model_from_args,
                    positive_int, precision_for, save_samples, to_pixels)
from scan import BACKENDS

ARCHITECTURE = ("model", "image_size", "num_frames", "mixer", "dataset")  # must match to resume


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="shapes")
    parser.add_argument("--data-path", default=None, help="folder: <class>/<images>; imagenet: a latent cache of "
                        "python data.py extract; ucf101: the folder holding UCF-101/ (or a latent cache)")
    parser.add_argument("--model", choices=list(PRESETS), default="DiM-Ti/2")
    parser.add_argument("--mixer", choices=["mamba", "attention"], default="mamba",
                        help="token mixer: mamba (DiM) or attention (the same model as DiT)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="side of the images in pixels (default: shapes 16, folder 32, ucf101 64; "
                             "a latent cache knows its own)")
    parser.add_argument("--num-frames", type=positive_int, default=None,
                        help="frames per clip; 1 for images (default: 16 for ucf101, else 1)")
    parser.add_argument("--frame-interval", type=positive_int, default=3, help="ucf101: take every k-th frame")
    parser.add_argument("--split", default="all", help="ucf101: all, train1..3, test1..3")
    parser.add_argument("--global-batch-size", type=positive_int, default=32, help="summed over all ranks")
    parser.add_argument("--lr", type=number_in(float, 0, low_open=True), default=None,
                        help="AdamW learning rate (default: by model size, see DEFAULT_LR; DiT: 1e-4 at batch 256)")
    parser.add_argument("--accum-steps", type=positive_int, default=1, help="gradient accumulation: each optimizer "
                        "step sums the gradients of this many micro-batches of global-batch-size / (ranks x this)")
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips (digits, text, charts "
                        "and other data with a handedness)")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                        help="a cosine decay to zero at --max-steps, or constant (DiT's)")
    parser.add_argument("--warmup-steps", type=number_in(int, 0), default=0, help="linear warm-up of the learning rate")
    parser.add_argument("--weight-decay", type=number_in(float, 0), default=0.0)
    parser.add_argument("--max-steps", type=positive_int, default=1600,
                        help="the default fits 10 minutes on 2 CPU cores")
    parser.add_argument("--ema-decay", type=number_in(float, 0, 1), default=0.9999,
                        help="EMA decay, warmed up as min(decay, (1 + step) / (10 + step))")
    parser.add_argument("--grad-clip", type=number_in(float, 0), default=1.0, help="max gradient norm; 0 turns it off")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="autocast precision (default: bf16 on GPUs, fp32 on the CPU)")
    parser.add_argument("--grad-ckpt", action="store_true", help="recompute each block in the backward pass")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model: fewer, fused kernels "
                        "(the first steps compile)")
    parser.add_argument("--cuda-graphs", action="store_true", help="record the model's forward and backward once "
                        "and replay them every step (one GPU): small models on fast GPUs wait on the host otherwise")
    parser.add_argument("--scan", choices=BACKENDS, default="auto",
                        help="selective-scan backend of scan.py")
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=1000, help="steps between checkpoints "
                        "(the last step always writes one)")
    parser.add_argument("--sample-every", type=number_in(int, 0), default=1000, help="steps between EMA sample "
                        "grids (the last step always draws one); 0: no grids at all")
    parser.add_argument("--grid-samples", type=positive_int, default=None,
                        help="samples in a grid (default: 36 images or 12 clips)")
    parser.add_argument("--grid-steps", type=positive_int, default=50, help="DDIM steps of a grid")
    parser.add_argument("--eval-every", type=positive_int, default=None, help="steps between FIDs of "
                        "--eval-samples EMA samples against as many training items (off by default)")
    parser.add_argument("--eval-samples", type=positive_int, default=2000)
    parser.add_argument("--inception", default=None, help="--eval-every: the FID Inception-v3 weights file "
                        "(default: torch-fidelity's download)")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--resume", default=None,
                        help="a checkpoint, a run folder (its newest checkpoint), or 'auto' (newest run "
                             "of this --model and --dataset)")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--num-workers", type=number_in(int, 0), default=None, help="data loader workers (default: 0 on CPU, 4 on GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to log.txt)")
    args = parser.parse_args(argv)
    for action in parser._actions:  # parse again without defaults: what remains is what the user gave
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(parser.parse_args(argv)))
    if args.lr is None:
        args.lr = DEFAULT_LR[model_size(args.model)]
    return args


# The learning rate when --lr is not given, by model size: the tiny default's rate on shapes, what a
# DiM-S/2 trained well with here on shapes at batch 64 (BENCHMARKS.md), and DiT's 1e-4 from B on.
DEFAULT_LR = {"Ti": 5e-3, "S": 1e-3, "B": 1e-4, "L": 1e-4, "XL": 1e-4}


def model_size(model):
    """"DiM-S/2" -> "S"."""
    return model.split("-")[1].split("/")[0]


# choices of this machine and this invocation, not of the run: a resume does not inherit them
NOT_INHERITED = {"resume", "results_dir", "no_progress", "num_workers", "given", "scan", "cuda_graphs", "compile",
                 "inception"}


def inherit_flags(args, old):
    """On --resume, the run's own flags replace the defaults of those the user did not give now, so that
    `--resume auto` continues the run as it was; returns what the user changed, to be logged."""
    given = set(getattr(args, "given", vars(args)))
    changed = []
    for key, value in old.items():
        if key in NOT_INHERITED or not hasattr(args, key) or getattr(args, key) == value:
            continue
        if key in given:
            changed.append(f"--{key.replace('_', '-')} {getattr(args, key)} (the run had {value})")
        else:
            setattr(args, key, value)
    return changed


#################################################################################
#                              Runs and checkpoints                             #
#################################################################################

def run_name(args):
    """<model>-<dataset>, with the mixer when it is attention and the frames when given: runs that
    differ in what --resume must match have different names."""
    mixer = "-attention" if args.mixer == "attention" else ""
    frames = f"-{args.num_frames}f" if args.num_frames and args.num_frames > 1 else ""
    return f"{args.model.replace('/', '-')}{mixer}-{args.dataset}{frames}"


def numbered_runs(results_dir, name=None):
    """{number: folder} of the run folders NNN-<name> (any name if None) in results_dir."""
    if not os.path.isdir(results_dir):
        return {}
    found = (re.fullmatch(r"(\d+)-(.+)", d) for d in os.listdir(results_dir))
    return {int(m[1]): os.path.join(results_dir, m[0]) for m in found if m and (name is None or m[2] == name)}


def newest_checkpoint(run_dir):
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")))
    if not found:
        raise UserError(f"--resume: no checkpoints in {run_dir}/checkpoints")
    return found[-1]


def find_resume(args):
    """The checkpoint --resume names: a file, a run folder, or 'auto' (the newest run of this name that
    has a checkpoint)."""
    if args.resume == "auto":
        runs = numbered_runs(args.results_dir, run_name(args))
        for number in sorted(runs, reverse=True):
            if glob.glob(os.path.join(runs[number], "checkpoints", "*.pt")):
                return newest_checkpoint(runs[number])
        raise UserError(f"--resume auto: no run of {run_name(args)} with a checkpoint in {args.results_dir}/")
    if os.path.isdir(args.resume):
        return newest_checkpoint(args.resume)
    if not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume} does not exist")
    return args.resume


def claim_run_dir(results_dir, name):
    """A new run folder NNN-<name> (NNN one past the highest number there), with checkpoints/ inside.
    makedirs without exist_ok claims it atomically: of two runs started together, the second takes
    the next number instead of sharing the folder."""
    try:
        os.makedirs(results_dir, exist_ok=True)
        number = max(numbered_runs(results_dir), default=-1) + 1
        while True:
            run_dir = os.path.join(results_dir, f"{number:03d}-{name}")
            try:
                os.makedirs(run_dir)
                break
            except FileExistsError:
                number += 1
        os.makedirs(os.path.join(run_dir, "checkpoints"))
    except PermissionError as error:
        raise UserError(f"--results-dir {results_dir}: cannot write there ({error.strerror})") from None
    return run_dir


def rng_states(world):
    """Every rank's random state (rank 0 writes them all), so a resumed run draws the same numbers."""
    state = dict(torch=torch.random.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path, model, ema, opt, args, step, info, rng):
    """Plain types only (loads with weights_only=True); written to a temporary file, then renamed,
    so that a crash mid-write never leaves a broken checkpoint in place of a good one."""
    ckpt = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), args=vars(args).copy(),
                step=step, data_info=info, rng=rng)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    try:
        torch.save(ckpt, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # a full disk comes back as a RuntimeError from the zip writer
        if os.path.exists(temporary):
            os.remove(temporary)
        full = getattr(error, "errno", None) == 28 or any(
            sign in str(error) for sign in ("No space left", "file write failed"))  # torch's zip writer's words
        reason = "disk full" if full else str(error).splitlines()[0][:200]
        raise UserError(f"could not write the checkpoint {path} ({reason}); the earlier checkpoints are intact") from None


class Logger:
    """Lines to log.txt (rank 0) and above the progress bar."""

    def __init__(self, run_dir):
        self.file = open(os.path.join(run_dir, "log.txt"), "a") if run_dir else None

    def __call__(self, message):
        if self.file:
            tqdm.write(message)
            self.file.write(message + "\n")
            self.file.flush()


#################################################################################
#                                 The training loop                             #
#################################################################################

class SeededItems(torch.utils.data.Dataset):
    """dataset[index] read with the random state seeded by `key` (random flips, clip starts): what an
    item draws then depends on the item, not on which loader worker reads it or what that worker read
    before, which a resumed run could not reproduce."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_and_key):
        index, key = index_and_key
        with torch.random.fork_rng(devices=[]):  # without workers this runs in the training process
            torch.manual_seed(key)
            return self.dataset[index]


def batches(dataset, local_batch, rank, world, seed, step, steps_per_epoch, workers):
    """Endless batches, starting at `step`: each epoch is a DistributedSampler permutation fixed by
    (seed, epoch), and each item's random draws are fixed by (seed, epoch, item), so a resumed run
    reads exactly the batches an uninterrupted one would have."""
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        key = (seed * 1_000_003 + epoch) * len(dataset)
        indices = [(i, key + i) for i in list(sampler)[skip * local_batch:]]
        loader = torch.utils.data.DataLoader(SeededItems(dataset), batch_size=local_batch, sampler=indices,
                                             drop_last=True, num_workers=workers,
                                             generator=torch.Generator().manual_seed(seed + epoch),
                                             persistent_workers=False, pin_memory=torch.cuda.is_available())
        yield from loader
        epoch, skip = epoch + 1, 0


def learning_rate(args, step):
    """The rate of optimizer step `step` (from 0): a linear warm-up, then DiT's constant rate or a
    cosine decay that reaches zero at --max-steps. A function of the step and the flags only, so a
    run resumed with the same flags continues exactly."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def graphed(model, batch, autocast):
    """The model with its forward and backward recorded as CUDA graphs and replayed at each call
    (torch.cuda.make_graphed_callables): a step then launches two graphs instead of thousands of kernels.
    Every call must pass `batch` items. Recording runs the model a few times on stand-in inputs; the
    random state is put back afterwards, so a resumed run draws what an uninterrupted one does."""
    cfg, device = model.cfg, next(model.parameters()).device
    frames = (cfg.num_frames,) if cfg.num_frames > 1 else ()
    rng = torch.cuda.get_rng_state(device)
    x = torch.randn(batch, *frames, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t, y = (torch.zeros(batch, dtype=torch.long, device=device) for _ in range(2))
    with autocast, warnings.catch_warnings():
        # torch keeps its warm-up's autograd graph alive while it records, and warns that the gradients'
        # streams differ from it; the recorded step matches the eager one (tests/test_train.py)
        warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
        model = torch.cuda.make_graphed_callables(model, (x, t, y))
    torch.cuda.set_rng_state(rng, device)
    return model


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, every parameter at once (a few fused kernels on a GPU)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def stop_if_not_finite(losses, step, good_checkpoint):
    """Stops the run at the first non-finite loss among the last len(losses) steps. Checked before each
    log line, sample grid and checkpoint rather than every step: reading a loss back makes the host
    wait for the GPU, which would keep it from queueing the next step while the GPU runs this one."""
    finite = torch.isfinite(torch.stack(losses))                                 # (steps,)
    if not finite.all():
        first = int((~finite).nonzero()[0])
        message = f"the loss is {losses[first].item()} at step {step - len(losses) + first + 1}: stopping."
        if good_checkpoint:
            message += f" The last good checkpoint is intact: {good_checkpoint}"
        raise UserError(message + " Try a lower --lr, --grad-clip, or --precision fp32.")


def out_of_memory(args, local_batch, device, good_checkpoint):
    """The error for a step larger than the GPU's memory, with the flags that need less of it: the same
    update in more, smaller micro-batches, each block recomputed in the backward, or a smaller input."""
    card = "memory" if device.type != "cuda" else \
        f"{torch.cuda.get_device_name(device)}'s {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
    splits = [k for k in range(2, local_batch + 1) if local_batch % k == 0]  # what divides a micro-batch
    shown, more = splits[:3], ", ..." if len(splits) > 3 else ""
    fixes = (["no --cuda-graphs"] if args.cuda_graphs else []) \
        + ([f"--accum-steps {', '.join(str(args.accum_steps * k) for k in shown)}{more} (micro-batches of "
            f"{', '.join(str(local_batch // k) for k in shown)}{more})"] if splits else []) \
        + ([] if args.grad_ckpt else ["--grad-ckpt"]) + ["a smaller --global-batch-size, --image-size or --num-frames"]
    message = (f"a training step of {local_batch} samples a rank ({args.model}, {args.image_size} px"
               f"{f', {args.num_frames} frames' if args.num_frames > 1 else ''}) does not fit in {card}. "
               f"Each of these needs less: {'; '.join(fixes)}.")
    if good_checkpoint:
        message += f" The last checkpoint is intact: {good_checkpoint}"
    return UserError(message)


def main(args):
    with process_group() as (rank, world, local_rank):  # torchrun sets RANK; otherwise one process
        return train(args, rank, world, local_rank)


def train(args, rank, world, local_rank):
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = precision_for(args.precision, device)
    check_scan_backend(args.scan, device)

    # --- checks that need no work, then the data and the model --------------------------------
    resume_path = find_resume(args) if args.resume else None
    resume = load_checkpoint(resume_path) if resume_path else None
    changed = inherit_flags(args, resume["args"]) if resume is not None else []
    default_lr = resume is None and "lr" not in getattr(args, "given", ["lr"])
    if args.global_batch_size % (world * args.accum_steps):
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} ranks "
                        f"x {args.accum_steps} accumulation steps")
    local_batch = args.global_batch_size // (world * args.accum_steps)                # one micro-batch of a rank
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU")
    if args.cuda_graphs and (world > 1 or args.grad_ckpt or args.accum_steps > 1):
        raise UserError("--cuda-graphs records the whole model on one GPU: not under torchrun, not with --grad-ckpt "
                        "or --accum-steps")
    if args.cuda_graphs and args.compile:
        raise UserError("--compile and --cuda-graphs: choose one")
    dataset, info = make_dataset(args.dataset, args.data_path, args.image_size, args.num_frames, args.global_seed,
                                 args.frame_interval, args.split, flip=not args.no_flip)
    args.image_size, args.num_frames = info["image_size"], info["num_frames"]  # the data set's defaults
    info = dict(info, items=len(dataset), source=os.path.abspath(args.data_path) if args.data_path else None)
    if resume is not None:
        old = resume["args"]
        different = [f"--{k.replace('_', '-')} {old[k]} (checkpoint) vs {getattr(args, k)} (now)"
                     for k in ARCHITECTURE if old.get(k) != getattr(args, k)]
        if different:
            raise UserError("--resume: the checkpoint is of another model or data set: " + "; ".join(different))
        differs = [k for k in ("source", "items", "num_classes", "class_names")
                   if k in resume["data_info"] and resume["data_info"][k] != info[k]]
        if differs:
            shown = {k: (resume["data_info"][k], info[k]) for k in differs if k != "class_names"}
            raise UserError("--resume: the data differs from the run's (" + ", ".join(
                f"{k}: {a} then, {b} now" for k, (a, b) in shown.items()) + (", other class names" if
                "class_names" in differs else "") + "); resuming would not continue the same run: start a new one")
        if resume["step"] >= args.max_steps:
            raise UserError(f"--resume: {resume_path} is at step {resume['step']}, and --max-steps is "
                            f"{args.max_steps}: nothing to train; give a larger --max-steps")
    if len(dataset) < args.global_batch_size:
        raise UserError(f"the data set has {len(dataset)} items, fewer than --global-batch-size {args.global_batch_size}")
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank and every run
    try:
        model = model_from_args(vars(args), info).to(device)
    except ValueError as error:
        raise UserError(f"--model {args.model} with --image-size {args.image_size}: {error}") from None
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.optimizer_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    diffusion = Diffusion(learn_sigma=model.cfg.learn_sigma).to(device)
    evaluate_fid = TrainingFID(dataset, info, args.eval_samples, args.inception, device, args.global_seed) \
        if args.eval_every and rank == 0 else None

    step = 0
    if resume is not None:
        load_weights(model, resume["model"], resume_path)
        load_weights(ema, resume["ema"], resume_path, "EMA")
        load_weights(opt, resume.get("opt", {}), resume_path, "optimizer")
        step = resume["step"]
        if len(resume["rng"]) == world:
            torch.random.set_rng_state(resume["rng"][rank]["torch"])
            if device.type == "cuda" and "cuda" in resume["rng"][rank]:
                torch.cuda.set_rng_state(resume["rng"][rank]["cuda"])
        else:  # another number of ranks: the data order still holds, the noise draws are new
            torch.manual_seed(args.global_seed * world + rank + 1_000_003 * step)
    else:
        torch.manual_seed(args.global_seed * world + rank)  # each rank its own noise and timesteps
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else model
    if args.compile:  # lazy: it compiles at the first step; a machine that cannot is told here, before any work
        ddp = compiled(ddp, device)

    # --- the run folder (rank 0 writes; resuming continues the same folder) --------------------
    run_dir, new_run = None, resume is None or not is_run_checkpoint(resume_path)
    if rank == 0:  # a checkpoint from elsewhere (copied, downloaded) continues in a new run folder
        run_dir = claim_run_dir(args.results_dir, run_name(args)) if new_run else \
            os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
    log = Logger(run_dir)
    log(f"{'resumed at step ' + str(step) if step else 'started'}: {args.model} ({args.mixer}), "
        f"{model.num_params() / 1e6:.2f} M parameters, {model.gmacs():.3f} GMACs per sample, "
        f"{len(dataset)} items of {args.dataset}, {world} rank(s) on {device.type}, {precision}"
        f"{', compiled' if args.compile else ''}, global batch "
        f"{args.global_batch_size}" + (f" ({args.accum_steps} micro-batches of {local_batch} a rank)"
                                       if args.accum_steps > 1 else "")
        + f", lr {args.lr:g}" + (f" (the default for DiM-{model_size(args.model)})" if default_lr else "")
        + (f", from {resume_path}" if resume is not None and new_run else "")
        + (f"; changed from the run: {', '.join(changed)}" if changed else ""))
    interrupted, first_step, last_checkpoint = None, step, None
    try:
        # --- the loop ------------------------------------------------------------------------------
        micro_per_epoch = len(dataset) // (local_batch * world)  # micro-batches of every rank in an epoch
        workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
        data = batches(dataset, local_batch, rank, world, args.global_seed, step * args.accum_steps, micro_per_epoch,
                       workers)
        # the cast-weight cache off: CUDA graphs need it, and one forward casts each weight once anyway
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)
        model.train()
        if args.cuda_graphs:
            ddp = graphed(model, local_batch, autocast)
        bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0 or args.no_progress, desc="training")
        losses, norms, last_time, last_step = [], [], time.time(), step
        interrupted = GracefulStop() if world == 1 else None  # under torchrun, Ctrl-C stops every rank at once
        while step < args.max_steps:
            opt.zero_grad(set_to_none=True)
            micro_losses = []
            for micro in range(args.accum_steps):
                x, y = next(data)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
                last_micro = micro == args.accum_steps - 1  # DDP averages over ranks there, and only there
                with ddp.no_sync() if world > 1 and not last_micro else contextlib.nullcontext():
                    with autocast:
                        loss = diffusion.training_losses(lambda xt, tt: ddp(xt, tt, y).float(), x, t)["loss"].mean()
                    (loss / args.accum_steps if args.accum_steps > 1 else loss).backward()
                micro_losses.append(loss.detach())
            loss = micro_losses[0] if args.accum_steps == 1 else torch.stack(micro_losses).mean()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step)
            opt.step()
            update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
            step += 1
            bar.update(1)
            losses.append(loss)
            norms.append(norm.detach())
            if step == first_step + 1 and device.type == "cuda":
                log(f"step {step:7d}  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
            last = step == args.max_steps or (interrupted is not None and interrupted.is_set())
            log_now, sample_now, save_now, eval_now = (
                (last or step % every == 0) if every else False
                for every in (args.log_every, args.sample_every, args.ckpt_every, args.eval_every))
            if log_now or sample_now or save_now or eval_now:  # before anything is logged, sampled or saved
                stop_if_not_finite(losses, step, last_checkpoint or resume_path)

            if log_now:
                mean_loss = torch.stack(losses).mean()
                if world > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss /= world
                rate = (step - last_step) / (time.time() - last_time)
                skipped = dataset.skipped.count() if hasattr(dataset, "skipped") else 0
                log(f"step {step:7d}  loss {mean_loss.item():.4f}  steps/s {rate:.2f}  "
                    f"grad_norm {torch.stack(norms).mean().item():.3f}  lr {opt.param_groups[0]['lr']:.2e}"
                    + (f"  ({skipped} unreadable {dataset.skipped.kind}s skipped so far, the first "
                       f"{dataset.skipped.first(dataset.paths)})" if skipped else ""))
                bar.set_postfix(loss=f"{mean_loss.item():.4f}")
                losses, norms, last_time, last_step = [], [], time.time(), step
            if save_now:  # first: a sample grid or an evaluation that fails must not cost the checkpoint
                rng = rng_states(world)
                if rank == 0:
                    last_checkpoint = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
                    save_checkpoint(last_checkpoint, model, ema, opt, args, step, info, rng)
                    log(f"step {step:7d}  checkpoint {last_checkpoint}")
                    plot_losses(run_dir)
            if interrupted is not None and interrupted.is_set():
                raise UserError(f"interrupted at step {step}; the checkpoint {last_checkpoint} holds it: "
                                f"python train.py --resume {run_dir} carries on")
            if rank == 0 and sample_now:
                try:  # a grid that fails (a VAE folder gone, a full disk) is logged; the run goes on
                    path = sample_grid(ema, info, args, step, precision, run_dir)
                    log(f"step {step:7d}  samples (EMA, DDIM {args.grid_steps}, guidance 4) in {path}")
                except Exception as error:
                    log(f"step {step:7d}  no sample grid: {type(error).__name__}: {str(error)[:300]}")
            if evaluate_fid is not None and eval_now:
                try:  # like a grid: logged if it fails, and the run goes on
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        score = evaluate_fid(ema, precision)
                    log(f"step {step:7d}  FID {score:.3f} of {args.eval_samples} EMA samples (DDIM 50, guidance 1.5) "
                        f"against {min(args.eval_samples, len(dataset))} training items")
                except Exception as error:
                    log(f"step {step:7d}  no FID: {type(error).__name__}: {str(error)[:300]}")
        bar.close()

        if world > 1:  # DDP keeps the replicas equal; prove it
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            reference = flat.clone()
            dist.broadcast(reference, 0)
            difference = (flat - reference).abs().max()
            dist.all_reduce(difference, op=dist.ReduceOp.MAX)
            log(f"weights identical on all {world} ranks: {difference.item() == 0}")
        return dict(run_dir=run_dir, step=step, model=model, ema=ema, checkpoint=last_checkpoint)
    except BaseException as error:
        too_big = isinstance(error, torch.OutOfMemoryError)
        if too_big:  # a step larger than the card: one line that says what needs less
            error = out_of_memory(args, local_batch, device, last_checkpoint or resume_path)
        if rank == 0 and new_run and step == first_step:
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before its first step: leave no empty run behind
        elif rank == 0:  # log.txt ends with why the run stopped
            log(f"stopped: {error if isinstance(error, UserError) else type(error).__name__ + ': ' + str(error)}")
        if too_big:
            raise error from None
        raise
    finally:
        if interrupted is not None:
            interrupted.restore()


def sample_grid(ema, info, args, step, precision, run_dir):
    """The periodic EMA grid: a column per class, DDIM (--grid-steps) with guidance 4; returns its path."""
    count = args.grid_samples or (36 if args.num_frames == 1 else 12)  # clips cost T times more
    labels = torch.arange(count) % info["num_classes"]                     # a class a column
    samples = to_pixels(generate(ema, labels, "ddim", args.grid_steps, cfg_scale=4.0, seed=args.global_seed,
                                 precision=precision), info)
    return save_samples(samples, os.path.join(run_dir, "samples", f"{step:07d}.{'gif' if args.num_frames > 1 else 'png'}"),
                        columns=min(count, info["num_classes"]))


def plot_losses(run_dir):
    """loss.png beside log.txt: the logged mean losses against the step, if matplotlib is installed
    (it is not a requirement: without it, nothing is drawn and nothing is said)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = [(int(line.split()[1]), float(line.split("loss ")[1].split()[0]))
              for line in open(os.path.join(run_dir, "log.txt")) if "  loss " in line]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*points) if points else ([], []))
    axes.set(xlabel="step", ylabel="loss (mean since the last line)", yscale="log", title=os.path.basename(run_dir))
    figure.tight_layout()
    path = os.path.join(run_dir, "loss.png")
    figure.savefig(path + ".tmp.png")
    plt.close(figure)
    os.replace(path + ".tmp.png", path)
    return path


class GracefulStop:
    """Ctrl-C sets this event instead of raising mid-step: the loop then saves a checkpoint of the last
    whole step and stops with one line. A second Ctrl-C interrupts at once. restore() puts back the
    handler there was (only the main thread may set one; elsewhere this does nothing)."""

    def __init__(self):
        self.event, self.previous = threading.Event(), None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def is_set(self):
        return self.event.is_set()

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def is_run_checkpoint(path):
    """Whether path is RUN/checkpoints/NNNNNNN.pt of a run folder train.py made (RUN/log.txt beside)."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.basename(parent) == "checkpoints" and os.path.isfile(os.path.join(os.path.dirname(parent), "log.txt"))



if __name__ == "__main__":
    run_script(main, parse_args)
