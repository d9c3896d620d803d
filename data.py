"""Data sets for DiM: images (C, H, W) or videos (T, C, H, W) in [-1, 1], with integer class labels.

  shapes   generated in memory, no download: one coloured shape per image (class = shape x colour),
           or a moving shape per clip with num_frames > 1. Deterministic from a seed. It comes with
           `judge`, a fixed rule that names the class of an image, so samples can be scored.
  folder   any ImageFolder tree (one sub-folder per class), DiT's centre crop, random flips.

The paper trains on ImageNet latents and UCF-101 clips; the shapes set lets the whole path run on
a laptop CPU in minutes and gives a number (judged accuracy) that says whether the model learned.
"""

import os

import numpy as np
import torch
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.2, 0.35, 1.0)}
SHAPE_CLASSES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]  # label = 3 * shape + colour


class UserError(Exception):
    """A problem with what the user asked for (a path, a flag, a file): printed without a traceback."""


#################################################################################
#                           shapes: generated in memory                         #
#################################################################################

def draw_shape(shape, colour, centre, radius, size):
    """One RGB image (3, size, size) in [0, 1]: a filled shape on a black background."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = ys - centre[0], xs - centre[1]
    if shape == "circle":
        mask = dx ** 2 + dy ** 2 <= radius ** 2
    elif shape == "square":
        mask = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    else:  # an upright triangle: apex at the top, base at the bottom of its box
        mask = (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    return mask[None] * np.asarray(COLOURS[colour], dtype=np.float32)[:, None, None]


class ShapesDataset(torch.utils.data.Dataset):
    """`size` images (or clips of `num_frames`) of coloured shapes, 9 classes, fixed by `seed`."""

    def __init__(self, size=4096, image_size=32, num_frames=1, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, len(SHAPE_CLASSES), size)
        radius = rng.uniform(0.25, 0.35, size) * image_size
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


def judge(images):
    """The class of each image (N, 3, H, W) or clip (N, T, 3, H, W) in [-1, 1], by a fixed rule:
    colour from the brightest channel of the foreground, shape from how much of its bounding box it
    fills (square 1.0, circle pi/4, triangle 1/2). Clips take the majority over frames."""
    if images.dim() == 5:
        n, frames = images.shape[:2]
        votes = judge(images.flatten(0, 1)).view(n, frames)
        return torch.mode(votes, dim=1).values
    pixels = (images.float().clamp(-1, 1) + 1) / 2                           # (N, 3, H, W)
    labels = []
    for image in pixels:
        foreground = image.max(dim=0).values > 0.5                          # (H, W)
        if foreground.sum() < 4:
            labels.append(-1)
            continue
        colour = int(image[:, foreground].mean(dim=1).argmax())
        rows, cols = foreground.any(dim=1).nonzero(), foreground.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = foreground.sum().item() / box.item()
        shape = int(np.argmin([abs(fill - target) for target in (np.pi / 4, 1.0, 0.5)]))
        labels.append(shape * len(COLOURS) + colour)
    return torch.tensor(labels)


#################################################################################
#                         folder: any ImageFolder tree                          #
#################################################################################

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


def image_folder(path, image_size):
    from torchvision import datasets, transforms

    check_image_folder(path)
    transform = transforms.Compose([
        transforms.Lambda(lambda image: center_crop_arr(image.convert("RGB"), image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),  # [0, 1] -> [-1, 1]
    ])
    return datasets.ImageFolder(path, transform=transform)


#################################################################################
#                       One entry point for train.py                            #
#################################################################################

DATASETS = ("shapes", "folder")


def make_dataset(name, data_path=None, image_size=32, num_frames=1, seed=0):
    """(dataset, info): info says what the model must be built for (channels, classes, frames)."""
    if name == "shapes":
        dataset = ShapesDataset(image_size=image_size, num_frames=num_frames, seed=seed)
        return dataset, dict(channels=3, num_classes=len(SHAPE_CLASSES), class_names=SHAPE_CLASSES)
    if name == "folder":
        if num_frames > 1:
            raise UserError("--dataset folder holds images; use --num-frames 1")
        dataset = image_folder(data_path, image_size)
        return dataset, dict(channels=3, num_classes=len(dataset.classes), class_names=dataset.classes)
    raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
