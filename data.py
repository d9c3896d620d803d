"""Data sets for DiM: images (C, H, W) or videos (T, C, H, W) in [-1, 1], with integer class labels.

  shapes   generated in memory, no download: one coloured shape per image (class = shape x colour),
           or a moving shape per clip with num_frames > 1. Deterministic from a seed. It comes with
           `judge`, a fixed rule that names the class of an image, so samples can be scored.
  folder   any ImageFolder tree (one sub-folder per class), DiT's centre crop, random flips.
  ucf101   the official UCF-101 tree: clips decoded with PyAV (optional package `av`), in pixels.
  imagenet, and folder or ucf101 in latent space: a cache of Stable Diffusion VAE latents (optional
           package `diffusers`) that `python data.py extract` writes, resumably and shared over
           torchrun ranks.

The paper trains on ImageNet latents (DiT's setting) and UCF-101 clips; the shapes set lets the
whole path run on a laptop CPU in minutes and gives a number (judged accuracy) that says whether
the model learned.
"""

import argparse
import contextlib
import functools
import gc
import importlib
import json
import math
import multiprocessing
import os
import re
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

SHAPES = ("square", "triangle", "cross")  # shapes that stay tell-apart at 16x16 pixels
COLOURS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.2, 0.35, 1.0)}
SHAPE_CLASSES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]  # label = 3 * shape + colour


class UserError(Exception):
    """A problem with what the user asked for (a path, a flag, a file): printed without a traceback."""

    def __init__(self, message):
        # raised in a data loader worker, it comes back as one string holding the worker's traceback
        # ("Caught UserError in DataLoader worker process 0 ..."): keep the message that ends it
        if message.startswith("Caught UserError") and "UserError: " in message:
            message = message.rsplit("UserError: ", 1)[1].strip()
        super().__init__(message)


def number_in(kind=float, low=None, high=None, low_open=False):
    """An argparse type: a finite number of `kind` in [low, high] (low excluded when low_open); anything
    else is refused with the flag's name and the range, before any work is done."""
    noun = "an integer" if kind is int else "a number"
    bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
    wanted = "a positive integer" if (kind, low, high, low_open) == (int, 1, None, False) else \
        f"{noun} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


positive_int = number_in(int, 1)  # counts: steps, samples, sizes, frames


@contextlib.contextmanager
def process_group():
    """(rank, world, local_rank) of this process: torchrun sets RANK, and then the processes form a group
    (NCCL on GPUs, gloo on CPUs) that is torn down on the way out; otherwise (0, 1, 0)."""
    if "RANK" not in os.environ:
        yield 0, 1, 0
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        # A clean teardown: no rank may still be sending when another closes its connections (gloo's
        # threads abort the process when a peer vanishes mid-message), and the work that DDP's reducer
        # holds is freed now, not by the interpreter's finalisation after the group is gone.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_script(main, parse_args=None):
    """The command-line entry of each script: main(parse_args()), a UserError as one line on stderr and
    exit status 1 (Ctrl-C as "interrupted" and status 130, the shell's for SIGINT). Under torchrun rank
    0 alone prints the line (every rank meets the same error, mostly), and torchrun then prints its own
    report of the failed ranks, which no rank can silence: each rank writes its line to the error file
    torchrun reads, so that the report names the cause (also of an error only one rank met) instead of
    "To enable traceback see ...". """
    try:
        main(parse_args()) if parse_args else main()
    except UserError as error:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {error}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": f"error: {error}",  # the form torchrun's own record writes
                                       "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
            if rank != "0":  # torchrun stops every rank once one fails: give rank 0 the time to say it
                time.sleep(2)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C where no step is running (train.py saves what a step made): one line
        print("interrupted", file=sys.stderr)
        sys.exit(130)


#################################################################################
#                           shapes: generated in memory                         #
#################################################################################

def shape_mask(shape, centre, radius, size):
    """(size, size) bool: a filled shape whose bounding box is the square of half-side `radius`."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = ys - centre[0], xs - centre[1]
    inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "square":
        return inside
    if shape == "triangle":  # upright: apex at the top, base at the bottom of the box
        return inside & (np.abs(dx) <= (dy + radius) / 2)
    return inside & ((np.abs(dx) <= radius / 3) | (np.abs(dy) <= radius / 3))  # cross: a plus sign


def draw_shape(shape, colour, centre, radius, size):
    """One RGB image (3, size, size) in [0, 1]: a filled shape on a black background."""
    mask = shape_mask(shape, centre, radius, size)
    return mask[None] * np.asarray(COLOURS[colour], dtype=np.float32)[:, None, None]


class ShapesDataset(torch.utils.data.Dataset):
    """`size` images (or clips of `num_frames`) of coloured shapes, 9 classes, fixed by `seed`.
    Each shape fills a box of side 2 * radius, radius a fraction of the image side drawn from `radius`."""

    def __init__(self, size=4096, image_size=32, num_frames=1, seed=0, radius=(0.3, 0.4)):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, len(SHAPE_CLASSES), size)
        radius = rng.uniform(*radius, size) * image_size
        centre = rng.uniform(radius[:, None], image_size - radius[:, None], (size, 2))
        # Clips: the shape moves in a straight line, bouncing off the borders.
        velocity = rng.uniform(-0.06, 0.06, (size, 2)) * image_size
        items = []
        for i in range(size):
            shape, colour = SHAPES[self.labels[i] // len(COLOURS)], list(COLOURS)[self.labels[i] % len(COLOURS)]
            frames = []
            for t in range(num_frames):
                low, high = radius[i], image_size - radius[i]
                position = centre[i] + t * velocity[i] - low
                position = low + np.abs((position + 2 * (high - low)) % (2 * (high - low)) - (high - low))
                frames.append(draw_shape(shape, colour, position, radius[i], image_size))
            items.append(np.stack(frames) if num_frames > 1 else frames[0])
        self.images = torch.from_numpy(np.stack(items)) * 2 - 1            # (size, [T,] 3, H, W)
        self.labels = torch.from_numpy(self.labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


TEMPLATE = 8  # the judge compares shapes at 8 x 8, cropped to their bounding box
TEMPLATES = torch.stack([F.adaptive_avg_pool2d(torch.from_numpy(shape_mask(s, (32, 32), 32, 64))[None].float(),
                                                TEMPLATE)[0] for s in SHAPES])  # (3, 8, 8)


def judge(images):
    """The class of each image (N, 3, H, W) or clip (N, T, 3, H, W) in [-1, 1], by a fixed rule:
    the colour is the brightest channel of the foreground; the shape is the template nearest to the
    foreground cropped to its bounding box and scaled to 8 x 8. Clips take the majority over frames.
    -1 where nothing is drawn."""
    if images.dim() == 5:
        n, frames = images.shape[:2]
        votes = judge(images.flatten(0, 1)).view(n, frames)
        return torch.mode(votes, dim=1).values
    pixels = (images.detach().cpu().float().clamp(-1, 1) + 1) / 2                          # (N, 3, H, W)
    labels = []
    for image in pixels:
        foreground = image.max(dim=0).values > 0.5                          # (H, W)
        if foreground.sum() < 4:
            labels.append(-1)
            continue
        colour = int(image[:, foreground].mean(dim=1).argmax())
        rows, cols = foreground.any(dim=1).nonzero()[:, 0], foreground.any(dim=0).nonzero()[:, 0]
        box = foreground[rows.min():rows.max() + 1, cols.min():cols.max() + 1].float()
        box = F.interpolate(box[None, None], size=(4 * TEMPLATE, 4 * TEMPLATE), mode="nearest")
        box = F.adaptive_avg_pool2d(box[0], TEMPLATE)                       # (1, 8, 8)
        shape = int((box - TEMPLATES).abs().flatten(1).sum(1).argmin())
        labels.append(shape * len(COLOURS) + colour)
    return torch.tensor(labels)


def judge_report(samples, labels):
    """What `judge` says of samples drawn for `labels`: dict(accuracy=the class right, then for each
    colour and each shape the fraction of the samples asked for it that show it)."""
    judged, labels = judge(samples), torch.as_tensor(labels).long()              # (N,) class or -1
    result = dict(accuracy=(judged == labels).float().mean().item())
    drawn, colours = judged >= 0, len(COLOURS)
    for i, colour in enumerate(COLOURS):
        result[colour] = (drawn & (judged % colours == i))[labels % colours == i].float().mean().item()
    for i, shape in enumerate(SHAPES):
        result[shape] = (drawn & (judged // colours == i))[labels // colours == i].float().mean().item()
    return result


def describe_judgement(result):
    """judge_report's numbers in one line (a class never asked for shows as nan)."""
    return (f"class right {result['accuracy']:.3f}; colour right: " + ", ".join(f"{c} {result[c]:.3f}" for c in COLOURS)
            + "; shape right: " + ", ".join(f"{s} {result[s]:.3f}" for s in SHAPES))


#################################################################################
#                         folder: any ImageFolder tree                          #
#################################################################################

IMAGE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises for an empty, truncated or corrupt file
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(image, image_size):
    """DiT's (ADM's) preprocessing: halve with a box filter while large, resize the short side
    to image_size with bicubic, and take the centre square."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def check_image_folder(path):
    """Raise a UserError that says what is wrong unless path is a folder of class folders of images."""
    if not path:
        raise UserError("--dataset folder needs --data-path DIR (a folder with one sub-folder of images per class)")
    if not os.path.isdir(path):
        raise UserError(f"--data-path {path} does not exist or is not a folder")
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir())
    if not classes:
        raise UserError(f"--data-path {path} has no class sub-folders: expected {path}/<class>/<image files>")
    count = sum(1 for c in classes for root, _, files in os.walk(os.path.join(path, c))
                for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if count == 0:
        raise UserError(f"--data-path {path} has class folders ({', '.join(classes[:5])}...) but no images "
                        f"with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return classes


def to_rgb(image):
    """An RGB PIL image from any mode. 16- and 32-bit integer images are scaled by their range first:
    PIL's convert("RGB") would clip them at 255, and a 16-bit PNG would come out washed out."""
    if image.mode.startswith("I"):
        array = np.asarray(image).astype(np.float64)
        top = 255.0 if image.mode == "I" and array.max() <= 255 else 65535.0
        return Image.fromarray((array / top * 255).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


class Skipped:
    """Which items of a data set could not be read, shared with data loader workers: an unreadable
    item is read once, named on stderr, and then passed over (the next readable item stands in)."""

    def __init__(self, size, kind):
        self.flags, self.kind = multiprocessing.Array("b", size, lock=False), kind

    def count(self):
        return int(np.frombuffer(self.flags, dtype=np.int8).sum())

    def first(self, paths):
        """The path of the first unreadable item (None if there is none)."""
        found = np.frombuffer(self.flags, dtype=np.int8).nonzero()[0]
        return paths[found[0]] if len(found) else None

    def first_readable(self, i, read, paths, errors):
        """read(j) of the first item j from i on (wrapping round) that reads without one of `errors`."""
        for j in [*range(i, len(paths)), *range(i)]:
            if self.flags[j]:
                continue
            try:
                return j, read(j)
            except errors as error:
                self.flags[j] = 1
                print(f"skipping unreadable {self.kind} {paths[j]} ({type(error).__name__}: {str(error)[:100]})",
                      file=sys.stderr)
        raise UserError(f"no {self.kind} of the data set could be read")


class ImageFolderSkipping(torch.utils.data.Dataset):
    """torchvision's ImageFolder, but a corrupt or empty image file is skipped and counted instead of
    stopping the run: in a folder of a million images, one bad file should cost one image."""

    def __init__(self, path, transform):
        from torchvision import datasets

        self.folder = datasets.ImageFolder(path, transform=transform)
        self.classes, self.paths = self.folder.classes, [p for p, _ in self.folder.samples]
        self.skipped = Skipped(len(self.paths), "image")

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        return self.skipped.first_readable(i, self.folder.__getitem__, self.paths, IMAGE_ERRORS)[1]


def image_folder(path, image_size, flip=True):
    from torchvision import transforms

    check_image_folder(path)
    transform = transforms.Compose([
        transforms.Lambda(lambda image: center_crop_arr(to_rgb(image), image_size)),
        transforms.RandomHorizontalFlip(0.5 if flip else 0.0),
        transforms.ToTensor(),
        transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),  # [0, 1] -> [-1, 1]
    ])
    return ImageFolderSkipping(path, transform)


#################################################################################
#              Optional packages: PyAV for video, diffusers for the VAE          #
#################################################################################

def require(module, purpose):
    """Import an optional package, or stop with what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the optional package '{module}': pip install {module}") from None


LATENT_SCALE = 0.18215  # makes the SD VAE's latents roughly unit variance (Rombach et al., DiT)
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


@functools.lru_cache(maxsize=2)
def load_vae(name, device="cpu"):
    """The Stable Diffusion VAE: "ema" or "mse" (from the hub, which needs a network the first
    time), or a local folder written by AutoencoderKL.save_pretrained."""
    diffusers = require("diffusers", "the Stable Diffusion VAE")
    source = VAES.get(name, name)
    if name not in VAES and not os.path.isdir(name):
        raise UserError(f"--vae {name}: not a folder; use ema, mse, or a folder of VAE weights")
    try:
        if name in VAES:  # the hub's copy: from its cache if it is there, else a download if there is a network
            try:
                vae = diffusers.AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False, local_files_only=True)
            except Exception:
                check_network("huggingface.co", source)
                vae = diffusers.AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
        else:
            vae = diffusers.AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
    except UserError:
        raise
    except Exception as error:  # no network, no weights, a folder of something else
        raise UserError(f"could not load the VAE {source!r} ({type(error).__name__}: {str(error)[:200]}). "
                        "Without a network, save it elsewhere with AutoencoderKL.save_pretrained and "
                        "pass that folder as --vae") from None
    return vae.to(device).eval().requires_grad_(False)


def check_network(host, what):
    """A UserError at once when `host` cannot be reached, instead of a download's half-minute of retries."""
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise UserError(f"{what} is not in the local cache and {host} cannot be reached (no network?). On a "
                        "machine with one, save it with AutoencoderKL.save_pretrained and pass that folder as --vae") from None


@torch.no_grad()
def encode(vae, pixels, keys):
    """Scaled latents (N, 4, H/8, W/8) of pixels (N, 3, H, W) in [-1, 1]: a draw from the VAE's
    posterior, as DiT's training does, with the noise fixed by each item's key (an integer), so the
    result does not depend on batching, sharding or resuming."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(int(k)))
                         for k in keys]).to(posterior.mean)
    return (posterior.mean + posterior.std * noise) * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents, batch_size=16):
    """Pixels (N, 3, H, W) in [-1, 1] from scaled latents (N, 4, h, w)."""
    pixels = [vae.decode(z.to(vae.device, vae.dtype) / LATENT_SCALE).sample.float().cpu()
              for z in latents.split(batch_size)]
    return torch.cat(pixels).clamp(-1, 1)


#################################################################################
#                    ucf101: the official tree, decoded with PyAV                #
#################################################################################

def ucf101_videos(root, split="all"):
    """(paths, labels, class names) of UCF-101 in its official layout: root/UCF-101/<Class>/v_*.avi
    (or root itself holding the class folders) and ucfTrainTestlist/ with classInd.txt and
    trainlist0K.txt / testlist0K.txt beside or inside it. split: all, train1..3, test1..3."""
    where = "the folder holding UCF-101/ and ucfTrainTestlist/ (from crcv.ucf.edu/data/UCF101.php)"
    if not root:
        raise UserError(f"--dataset ucf101 needs --data-path: {where}")
    if not os.path.isdir(root):
        raise UserError(f"--data-path {root} is not a folder: for ucf101 give {where}")
    videos = os.path.join(root, "UCF-101") if os.path.isdir(os.path.join(root, "UCF-101")) else root
    beside = (os.path.join(root, "ucfTrainTestlist"), os.path.join(os.path.dirname(videos), "ucfTrainTestlist"))
    lists = next((p for p in beside if os.path.isdir(p)), None)
    if lists and os.path.isfile(os.path.join(lists, "classInd.txt")):
        with open(os.path.join(lists, "classInd.txt")) as f:                # "1 ApplyEyeMakeup"
            classes = [line.split()[1] for line in f if line.strip()]
    else:
        classes = sorted(d.name for d in os.scandir(videos) if d.is_dir() and d.name != "ucfTrainTestlist")
    if split == "all":
        names = sorted(os.path.join(c, f) for c in classes if os.path.isdir(os.path.join(videos, c))
                       for f in os.listdir(os.path.join(videos, c)) if f.endswith(".avi"))
    else:
        match = re.fullmatch(r"(train|test)([1-3])", split)
        if not match:
            raise UserError(f"--split {split}: use all, train1, train2, train3, test1, test2 or test3")
        listed = os.path.join(lists or os.path.join(root, "ucfTrainTestlist"), f"{match[1]}list0{match[2]}.txt")
        if not os.path.isfile(listed):
            raise UserError(f"--split {split} needs {listed} (ucfTrainTestlist/ of the official split files)")
        with open(listed) as f:                                              # "Class/v_Class_g08_c01.avi [label]"
            names = [line.split()[0] for line in f if line.strip()]
        missing = [n for n in names if not os.path.isfile(os.path.join(videos, n))]
        if missing:
            raise UserError(f"{len(missing)} videos of {listed} are not under {videos}, e.g. {missing[0]}")
    if not names:
        raise UserError(f"no .avi videos under {videos}/<Class>/: expected the official UCF-101 tree")
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[os.path.dirname(n)] for n in names]
    return [os.path.join(videos, n) for n in names], labels, classes


def clip_indices(count, num_frames, interval, where):
    """Frame numbers of a clip of num_frames at the given interval, from a start `where` in [0, 1)
    of the way along the video; a video too short for the clip is looped."""
    span = (num_frames - 1) * interval + 1
    start = int(where * max(1, count - span + 1))
    return [(start + k * interval) % count for k in range(num_frames)]


def resize_crop(frame, image_size):
    """A PyAV frame -> uint8 (image_size, image_size, 3): short side resized, centre square."""
    scale = image_size / min(frame.width, frame.height)
    width, height = max(image_size, round(frame.width * scale)), max(image_size, round(frame.height * scale))
    array = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
    top, left = (height - image_size) // 2, (width - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def read_frames(path, image_size, wanted=None, every=1):
    """Decoded frames of a video, resized and cropped: those numbered in `wanted` (decoding stops
    after the last of them), or every `every`-th frame. (T, H, W, 3) uint8, in the order asked."""
    av = require("av", "decoding UCF-101 videos")
    frames, number = {}, -1
    with av.open(path) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if (wanted is None and number % every == 0) or (wanted is not None and number in wanted):
                frames[number] = resize_crop(frame, image_size)
            if wanted is not None and number >= max(wanted):
                break
    if number < 0:
        raise ValueError(f"no frames decoded from {path}")
    if wanted is not None and any(n not in frames for n in wanted):
        # the header promised more frames than the video has: loop over those it has
        return read_frames(path, image_size, [n % (number + 1) for n in wanted])
    order = sorted(frames) if wanted is None else wanted
    return np.stack([frames[n] for n in order])


def frame_count(path):
    """The number of frames of a video, from its header (or by decoding when the header has none)."""
    av = require("av", "decoding UCF-101 videos")
    with av.open(path) as container:
        count = container.streams.video[0].frames
        return count or sum(1 for _ in container.decode(video=0))


class UCF101(torch.utils.data.Dataset):
    """Clips (T, 3, H, W) in [-1, 1] of UCF-101: num_frames at frame_interval from a random start,
    short-side resize and centre crop, one horizontal flip for the whole clip. A video that cannot
    be decoded is skipped (the next one is read instead) and counted in `skipped`; one too short
    for the clip is looped."""

    def __init__(self, root, split="all", image_size=64, num_frames=16, frame_interval=3, flip=True):
        require("av", "decoding UCF-101 videos")
        self.paths, self.labels, self.classes = ucf101_videos(root, split)
        self.image_size, self.num_frames, self.frame_interval, self.flip = image_size, num_frames, frame_interval, flip
        self.skipped = Skipped(len(self.paths), "video")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        av = require("av", "decoding UCF-101 videos")
        where, flip = torch.rand(()).item(), torch.rand(()).item() < 0.5

        def read(j):
            wanted = clip_indices(frame_count(self.paths[j]), self.num_frames, self.frame_interval, where)
            return read_frames(self.paths[j], self.image_size, wanted)                 # (T, H, W, 3)
        j, frames = self.skipped.first_readable(i, read, self.paths,
                                                (av.FFmpegError, OSError, ValueError, IndexError, KeyError))
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W)
        return (clip.flip(-1) if flip and self.flip else clip), self.labels[j]


#################################################################################
#        Latent caches: `python data.py extract` and the data set that reads them #
#################################################################################

def read_meta(path, dataset):
    build = f"python data.py extract --dataset {dataset} --data-path SOURCE --out {path or 'DIR'}"
    if not path:
        raise UserError(f"--dataset {dataset} needs --data-path DIR, a latent cache built by {build}")
    meta_file = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_file):
        raise UserError(f"--data-path {path} holds no latent cache (meta.json): build one with {build}")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"{meta_file} is unreadable ({type(error).__name__}): extract again into a new --out") from None
    if not isinstance(meta, dict) or meta.get("dataset") != dataset:
        raise UserError(f"{path} is a latent cache of {meta.get('dataset')}, not of {dataset}")
    if not meta.get("complete"):
        raise UserError(f"the extraction into {path} has not finished: run the same python data.py extract again")
    return meta


class LatentDataset(torch.utils.data.Dataset):
    """Items of a latent cache: scaled SD-VAE latents (4, h, w), or clips (T, 4, h, w), with labels.
    The cache stores each image (or frame) and its mirror image; one of the two is picked at random
    (only the first with flip=False; a cache extracted with --no-flip stores no mirror).

    latents.npy (rows, 2 or 1, 4, h, w) fp16, memory-mapped; index.npy (items, 2): first row, row count
    (1 for an image, the frames of a video; 0 for a video that could not be read); labels.npy."""

    def __init__(self, path, dataset, num_frames=1, frame_interval=1, flip=True):
        self.meta = read_meta(path, dataset)
        if num_frames > 1 and frame_interval != self.meta["frame_interval"]:
            raise UserError(f"{path} stores every {self.meta['frame_interval']}th frame: "
                            f"use --frame-interval {self.meta['frame_interval']}")
        try:
            self.latents = np.load(os.path.join(path, "latents.npy"), mmap_mode="r")
            self.index = np.load(os.path.join(path, "index.npy"))
            self.labels = np.load(os.path.join(path, "labels.npy"))
        except (OSError, ValueError) as error:  # missing, or shorter than its header says
            raise UserError(f"the latent cache {path} is damaged ({type(error).__name__}: {str(error)[:120]}): "
                            "extract again into a new --out") from None
        rows = int(self.index.sum(axis=1).max()) if len(self.index) else 0                 # first + count
        if len(self.labels) != len(self.index) or len(self.latents) < rows:
            raise UserError(f"the latent cache {path} is damaged (its arrays disagree in length): extract again")
        self.items = np.nonzero(self.index[:, 1] > 0)[0]                   # readable items only
        self.num_frames = num_frames
        self.flip = flip and self.latents.shape[1] == 2  # a cache extracted with --no-flip holds no mirrors

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        first, count = self.index[item]
        where, flip = torch.rand(()).item(), int(torch.rand(()).item() < 0.5 and self.flip)
        if self.num_frames == 1:
            x = self.latents[first, flip]                                   # (4, h, w)
        else:  # stored frames are already frame_interval apart
            x = self.latents[[first + k for k in clip_indices(count, self.num_frames, 1, where)], flip]
        return torch.from_numpy(x.astype(np.float32)), int(self.labels[item])


def extract(dataset, data_path, out, image_size, vae, batch_size=32, split="all", frame_interval=3,
            rank=0, world=1, progress=True, flip=True):
    """Encode a data set with the SD VAE into a latent cache in `out`.

    The work is cut into units (a batch of images, or one video), each rank takes every world-th
    unit and writes only its rows, and done.npy marks a unit finished after its rows are flushed:
    an interrupted extraction run again skips finished units and redoes the rest, bit for bit."""
    if dataset in ("imagenet", "folder"):  # ImageNet's train/ is an ImageFolder tree like any other
        from torchvision.datasets import ImageFolder
        check_image_folder(data_path)
        found = ImageFolder(data_path)
        sources, labels, classes = [p for p, _ in found.samples], [c for _, c in found.samples], found.classes
        counts = [1] * len(sources)
        units = [list(range(i, min(i + batch_size, len(sources)))) for i in range(0, len(sources), batch_size)]
    elif dataset == "ucf101":
        sources, labels, classes = ucf101_videos(data_path, split)
        units = [[i] for i in range(len(sources))]
        counts = None  # known once rank 0 has looked at every video
    else:
        raise UserError(f"python data.py extract knows imagenet, folder and ucf101, not {dataset!r}")
    if image_size % 8:
        raise UserError(f"--image-size {image_size}: the VAE needs a multiple of 8")
    meta = dict(dataset=dataset, source=os.path.abspath(data_path), image_size=image_size,
                latent_size=image_size // 8, channels=4, vae=vae, scale=LATENT_SCALE, class_names=classes,
                items=len(sources), split=split, frame_interval=frame_interval if dataset == "ucf101" else 1,
                batch_size=batch_size, complete=False)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; the latent cache is a folder: choose another --out")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    vae_model = load_vae(vae, device)
    distributed = dist.is_available() and dist.is_initialized()
    os.makedirs(out, exist_ok=True)
    meta_file = os.path.join(out, "meta.json")
    if os.path.isfile(meta_file):  # resuming: the same extraction, or refuse to touch it
        with open(meta_file) as f:
            old = json.load(f)
        changed = [k for k in meta if k != "complete" and old.get(k) != meta[k]]
        if changed:
            raise UserError(f"{out} holds another extraction (it differs in {', '.join(changed)}): "
                            "choose another --out")
        if rank == 0 and not os.path.isfile(os.path.join(out, "unreadable.npy")):  # begun by an older data.py
            np.save(os.path.join(out, "unreadable.npy"), np.zeros(len(sources), dtype=np.uint8))
    elif rank == 0:
        if counts is None:
            counts = []
            for path in tqdm(sources, desc="counting frames", disable=not progress):
                try:
                    counts.append(-(-frame_count(path) // frame_interval))
                except Exception:  # unreadable: one row, never read (see done == 2 below)
                    counts.append(1)
        index = np.stack([np.cumsum([0] + counts[:-1]), counts], axis=1)    # (items, 2)
        np.save(os.path.join(out, "labels.npy"), np.asarray(labels, dtype=np.int64))
        np.save(os.path.join(out, "index.npy"), index)
        np.lib.format.open_memmap(os.path.join(out, "latents.npy"), "w+", np.float16,
                                  (max(1, sum(counts)), 2 if flip else 1, 4, image_size // 8, image_size // 8)).flush()
        np.save(os.path.join(out, "done.npy"), np.zeros(len(units), dtype=np.uint8))
        np.save(os.path.join(out, "unreadable.npy"), np.zeros(len(sources), dtype=np.uint8))
        write_json(meta_file, meta)
    if distributed:
        dist.barrier()  # rank 0 has laid out the files

    latents = np.load(os.path.join(out, "latents.npy"), mmap_mode="r+")
    index = np.load(os.path.join(out, "index.npy"))
    done = np.load(os.path.join(out, "done.npy"), mmap_mode="r+")
    unreadable = np.load(os.path.join(out, "unreadable.npy"), mmap_mode="r+")  # items left out at the end
    mine = [u for u in range(rank, len(units), world) if not done[u]]
    for u in tqdm(mine, desc=f"extracting {dataset} (rank {rank})", disable=not progress):
        if dataset != "ucf101":
            images = [read_image(sources[i], image_size, unreadable, i) for i in units[u]]
            pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)     # (n, 3, H, W) uint8
            rows = index[units[u], 0]
        else:
            first, count = index[units[u][0]]
            try:
                pixels = torch.from_numpy(read_frames(sources[units[u][0]], image_size, every=frame_interval))
            except Exception as error:  # finished, unreadable: no rows at the end
                print(f"skipping unreadable video {sources[units[u][0]]} ({type(error).__name__})", file=sys.stderr)
                unreadable[units[u][0]] = 1
                unreadable.flush()
                done[u] = 1
                done.flush()
                continue
            pixels = pixels[:count].permute(0, 3, 1, 2)                        # (n, 3, H, W) uint8
            pixels = torch.cat([pixels, pixels[-1:].expand(count - len(pixels), -1, -1, -1)])  # header overcounted
            rows = first + np.arange(count)
        pixels = pixels.float() / 127.5 - 1
        for part in range(0, len(rows), batch_size):
            x, r = pixels[part:part + batch_size], rows[part:part + batch_size]
            views = [x, x.flip(-1)] if flip else [x]                                 # and the mirror image
            z = encode(vae_model, torch.cat(views), [*(2 * r), *(2 * r + 1)][:len(views) * len(r)])  # (2n | n, 4, h, w)
            latents[r] = z.view(len(views), len(r), *z.shape[1:]).transpose(0, 1).cpu().numpy().astype(np.float16)
        latents.flush()
        unreadable.flush()
        done[u] = 1
        done.flush()
    if distributed:
        dist.barrier()  # every rank has finished its units
    done = np.load(os.path.join(out, "done.npy"))
    if (rank == 0 or not distributed) and done.all():
        bad = np.nonzero(np.load(os.path.join(out, "unreadable.npy")))[0]
        index[bad, 1] = 0  # unreadable images and videos: no rows, passed over by LatentDataset
        np.save(os.path.join(out, "index.npy"), index)
        write_json(meta_file, {**meta, "complete": True})
        print(f"{out}: {len(sources)} items, {len(bad)} unreadable and left out"
              + (f" (first: {sources[bad[0]]})" if len(bad) else ""))
    return out


def read_image(path, image_size, unreadable, item):
    """uint8 (image_size, image_size, 3) of an image file, DiT's crop; black for a file that cannot be
    read, which is then marked in `unreadable` (and named on stderr)."""
    try:
        return np.array(center_crop_arr(to_rgb(Image.open(path)), image_size))
    except IMAGE_ERRORS as error:
        print(f"skipping unreadable image {path} ({type(error).__name__})", file=sys.stderr)
        unreadable[item] = 1
        return np.zeros((image_size, image_size, 3), dtype=np.uint8)


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def write_npz(path, **arrays):
    """np.savez to a temporary file, then renamed: no half-written .npz under the name asked for."""
    with open(path + ".tmp", "wb") as f:  # a file object: np.savez would add .npz to the name
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


#################################################################################
#                       One entry point for train.py                            #
#################################################################################

DATASETS = ("shapes", "folder", "imagenet", "ucf101")
DEFAULT_IMAGE_SIZE = dict(shapes=16, folder=32, ucf101=64)


def make_dataset(name, data_path=None, image_size=None, num_frames=None, seed=0, frame_interval=3, split="all",
                 flip=True):
    """(dataset, info): info says what the model is built for: channels, classes, the image side,
    the side of the model's input (the image, or its latent of side image_size / 8), the frames,
    and for latents the VAE that turns samples back into pixels. flip: random horizontal flips."""
    cached = os.path.isfile(os.path.join(data_path or "", "meta.json"))  # a latent cache of data.py extract
    if name == "imagenet" or (name in ("folder", "ucf101") and cached):
        frames = num_frames or (16 if name == "ucf101" else 1)
        if name != "ucf101" and frames > 1:
            raise UserError(f"--dataset {name} holds images; use --num-frames 1")
        dataset = LatentDataset(data_path, name, frames, frame_interval, flip)
        meta = dataset.meta
        if image_size not in (None, meta["image_size"]):
            raise UserError(f"--image-size {image_size}: the latents in {data_path} are of {meta['image_size']}-pixel "
                            "images; leave --image-size out or extract again")
        return dataset, dict(channels=4, num_classes=len(meta["class_names"]), class_names=meta["class_names"],
                             image_size=meta["image_size"], input_size=meta["latent_size"], num_frames=frames,
                             vae=meta["vae"])
    image_size = image_size or DEFAULT_IMAGE_SIZE.get(name, 32)
    if name == "shapes":
        frames = num_frames or 1
        dataset = ShapesDataset(image_size=image_size, num_frames=frames, seed=seed)
        classes = SHAPE_CLASSES
    elif name == "folder":
        frames = num_frames or 1
        if frames > 1:
            raise UserError("--dataset folder holds images; use --num-frames 1")
        dataset = image_folder(data_path, image_size, flip)
        classes = dataset.classes
    elif name == "ucf101":
        frames = num_frames or 16
        dataset = UCF101(data_path, split, image_size, frames, frame_interval, flip)
        classes = dataset.classes
    else:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return dataset, dict(channels=3, num_classes=len(classes), class_names=classes, image_size=image_size,
                         input_size=image_size, num_frames=frames)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a latent cache with the Stable Diffusion VAE:\n"
                                     "  python data.py extract --dataset imagenet --data-path IMAGENET/train "
                                     "--out latents/imagenet256 --image-size 256 --vae ema\n"
                                     "  torchrun --nproc_per_node=4 data.py extract ...   (ranks share the work)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("extract", help="encode imagenet, folder or ucf101 into a latent cache (resumable)")
    ex.add_argument("--dataset", choices=["imagenet", "folder", "ucf101"], required=True)
    ex.add_argument("--data-path", required=True, help="ImageNet's train/ folder (or any ImageFolder tree), or "
                    "the folder holding UCF-101/")
    ex.add_argument("--out", required=True, help="the cache folder; run again to resume")
    ex.add_argument("--image-size", type=positive_int, default=256, help="pixels; latents are 1/8 of it")
    ex.add_argument("--vae", default="ema", help="ema, mse (stabilityai/sd-vae-ft-*) or a local folder")
    ex.add_argument("--batch-size", type=positive_int, default=32)
    ex.add_argument("--split", default="all", help="ucf101: all, train1..3, test1..3")
    ex.add_argument("--frame-interval", type=positive_int, default=3, help="ucf101: keep every k-th frame")
    ex.add_argument("--no-flip", action="store_true", help="store no mirror images (data with a handedness)")
    ex.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with process_group() as (rank, world, local_rank):
        if world > 1 and torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        return extract(args.dataset, args.data_path, args.out, args.image_size, args.vae, args.batch_size,
                       args.split, args.frame_interval, rank, world, progress=not args.no_progress and rank == 0,
                       flip=not args.no_flip)


if __name__ == "__main__":
    run_script(main)
