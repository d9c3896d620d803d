"""Evaluate samples as the papers do: FID, Inception Score and precision/recall for images, FVD for videos.

    python sample.py --ckpt C --num-fid-samples 50000 --cfg-scale 1.5 --out samples.npz   # DiT's protocol
    python evaluate.py fid samples.npz VIRTUAL_imagenet256_labeled.npz --inception weights.pth
    python evaluate.py reference --dataset ucf101 --data-path D --image-size 256 --num 2048 --out real.npz
    python evaluate.py fvd samples.npz real.npz --i3d i3d_torchscript.pt

Samples and references are .npz files whose arr_0 is uint8 (N, H, W, 3) images or (N, T, H, W, 3) clips
(what sample.py and ADM's evaluator write), or folders of image files; a reference may instead hold
precomputed `mu` and `sigma` (ADM's reference batches hold both).

  FID   Frechet distance between Gaussians fitted to Inception-v3 pool features (2,048) of samples and
        reference (Heusel et al. 2017), with the 2015-12-05 TensorFlow weights that every FID since uses,
        as torch-fidelity ports them (its own resize, bit-compatible with TensorFlow's). Also the
        Inception Score (10 splits) and precision/recall (k = 3, Kynkaenniemi et al. 2019).
  FVD   the same distance on I3D features of 16-frame clips, with StyleGAN-V's protocol (Skorokhodov et
        al. 2022, which Latte and the DiM paper follow): its TorchScript I3D (Kinetics-400), clips
        resized to 224 and rescaled inside the network, 2,048 generated against 2,048 real clips.

The distance is written here once, in float64; the feature networks come from files (--inception,
--i3d) or, with a network, from their usual downloads. Nothing is fetched at import time.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from data import (IMAGE_EXTENSIONS, UserError, describe_judgement, judge_report, make_dataset, positive_int, require,
                  run_script, to_rgb, write_npz)
from sample import sample_pixels, to_pixels, to_uint8

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
FVD_FRAMES, FVD_CLIPS = 16, 2048  # StyleGAN-V's FVD_2048^16


#################################################################################
#                            The Frechet distance                               #
#################################################################################

def statistics(features):
    """Mean (F,) and covariance (F, F) of features (N, F), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise UserError(f"a covariance needs at least 2 samples, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    tr (sigma1 sigma2)^(1/2) is the sum of the square roots of the eigenvalues of
    sigma1^(1/2) sigma2 sigma1^(1/2), which is symmetric and positive semi-definite: two symmetric
    eigendecompositions, no general matrix square root, and no complex round-off to throw away."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"features of different sizes: {mu1.shape[0]} and {mu2.shape[0]}")
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T                        # sigma1^(1/2)
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


#################################################################################
#                              Samples and references                           #
#################################################################################

def load_pixels(path, what="samples"):
    """uint8 (N, H, W, 3) images or (N, T, H, W, 3) clips from an .npz (arr_0) or a folder of images."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UserError(f"{what} {path}: a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
        images = [np.asarray(to_rgb(Image.open(f))) for f in files]
        if len({image.shape for image in images}) > 1:
            raise UserError(f"{what} {path}: the images are not all of one size")
        return np.stack(images)
    arrays = load_npz(path, what)
    if "arr_0" not in arrays:
        raise UserError(f"{what} {path} has no arr_0 (it holds {', '.join(arrays) or 'nothing'})")
    return check_pixels(arrays["arr_0"], f"{what} {path}")


def load_npz(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except Exception as error:  # not an npz, or a truncated one
        raise UserError(f"{what} {path} is not a readable .npz ({type(error).__name__}: {str(error)[:100]})") from None


def check_pixels(array, what):
    if array.dtype != np.uint8 or array.ndim not in (4, 5) or array.shape[-1] != 3:
        raise UserError(f"{what}: arr_0 is {array.dtype} {tuple(array.shape)}; expected uint8 (N, H, W, 3) "
                        "images or (N, T, H, W, 3) clips, as sample.py --num-fid-samples writes")
    return array


def take(pixels, count, what):
    """The first `count` items (all of them for None), or a UserError when there are fewer."""
    if count is not None and len(pixels) < count:
        raise UserError(f"{what} holds {len(pixels)} items; the evaluation asks for {count}")
    return pixels if count is None else pixels[:count]


def check_same_size(samples, reference):
    if samples.shape[1:] != reference.shape[1:]:
        raise UserError(f"samples are {'x'.join(map(str, samples.shape[1:]))} and the reference "
                        f"{'x'.join(map(str, reference.shape[1:]))}: compare like with like (same frames "
                        "and resolution; resize the reference with evaluate.py reference --image-size)")


#################################################################################
#                                Feature networks                               #
#################################################################################

def weights_file(path, url, flag):
    """A local weights file: `path` if given, else the usual download into torch's hub cache."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url).split("?")[0])
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, progress=True)
        except Exception as error:  # no network, or a refused download
            raise UserError(f"could not download {url} ({type(error).__name__}); fetch it on a machine with a "
                            f"network and pass it as {flag} PATH") from None
    return cached


class Inception(torch.nn.Module):
    """uint8 images (N, 3, H, W) -> (pool features (N, 2048), logits (N, 1008)): torch-fidelity's port of
    the FID Inception-v3. has_classifier is False for a weights file without the logits layer."""

    def __init__(self, path=None):
        super().__init__()
        fidelity = require("torch_fidelity", "FID and the Inception Score")
        path = weights_file(path, INCEPTION_URL, "--inception")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=path)
        except Exception as error:
            raise UserError(f"--inception {path}: not the FID Inception-v3 weights that torch-fidelity "
                            f"{fidelity.__version__} loads ({type(error).__name__}: {str(error)[:150]})") from None
        self.has_classifier = bool(self.net.fc.weight.abs().max() > 0)

    def forward(self, images):
        return self.net(images)


class I3D(torch.nn.Module):
    """uint8 clips (N, T, H, W, 3) -> I3D features (N, 400), as StyleGAN-V calls its TorchScript I3D:
    (N, 3, T, H, W) in [0, 255], rescaled to [-1, 1] and resized to 224 x 224 inside the network."""

    def __init__(self, path=None):
        super().__init__()
        path = weights_file(path, I3D_URL, "--i3d")
        try:
            self.net = torch.jit.load(path, map_location="cpu").eval()
        except Exception as error:
            raise UserError(f"--i3d {path}: not a TorchScript file ({type(error).__name__}: {str(error)[:150]})") from None

    def forward(self, clips):
        clips = clips.permute(0, 4, 1, 2, 3).float()                           # (N, 3, T, H, W)
        return self.net(clips, rescale=True, resize=True, return_features=True)


@torch.no_grad()
def features(network, pixels, batch_size=64, device="cpu", progress=False, what="features"):
    """network applied to uint8 pixels (N, ...) in batches: each of its outputs concatenated, float64."""
    network = network.to(device)
    outputs = []
    for start in tqdm(range(0, len(pixels), batch_size), desc=what, disable=not progress, leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size])).to(device)
        out = network(batch.permute(0, 3, 1, 2) if batch.dim() == 4 else batch)   # images: (n, 3, H, W)
        outputs.append([o.double().cpu() for o in (out if isinstance(out, (tuple, list)) else (out,))])
    return [torch.cat(parts).numpy() for parts in zip(*outputs)]


#################################################################################
#                                  The metrics                                  #
#################################################################################

def fid(samples, reference, network, num_samples=None, batch_size=64, device="cpu", progress=False):
    """dict(fid, inception_score, precision, recall, num_samples, num_reference) of samples against a
    reference: dict(pixels=uint8 images) and/or dict(mu=, sigma=) of the network's first output."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    samples = take(samples, num_samples, "the samples")
    if samples.ndim != 4:
        raise UserError("FID compares images; these samples are clips (use evaluate.py fvd)")
    pool, logits = features(network, samples, batch_size, device, progress, "Inception (samples)")
    result = dict(num_samples=len(samples))
    if reference.get("pixels") is not None:
        check_same_size(samples, reference["pixels"])
        ref_pool = features(network, reference["pixels"], batch_size, device, progress, "Inception (reference)")[0]
        precision, recall = calculate_precision_recall_part(torch.from_numpy(pool).float().to(device),
                                                            torch.from_numpy(ref_pool).float().to(device), 3)
        result.update(precision=precision, recall=recall, num_reference=len(ref_pool))
    mu, sigma = (reference["mu"], reference["sigma"]) if "mu" in reference else statistics(ref_pool)
    result["fid"] = frechet_distance(*statistics(pool), mu, sigma)
    if getattr(network, "has_classifier", True):
        result["inception_score"] = isc_features_to_metric(torch.from_numpy(logits), splits=10)["inception_score_mean"]
    return result


def fvd(samples, reference, network, num_clips=FVD_CLIPS, batch_size=4, device="cpu", progress=False):
    """dict(fvd, num_clips, protocol) of the first num_clips 16-frame clips of samples and reference."""
    for name, clips in (("samples", samples), ("reference", reference)):
        if clips.ndim != 5 or clips.shape[1] != FVD_FRAMES:
            raise UserError(f"FVD (StyleGAN-V's protocol) compares {FVD_FRAMES}-frame clips; the {name} are "
                            f"{tuple(clips.shape)}")
    samples, reference = take(samples, num_clips, "the samples"), take(reference, num_clips, "the reference")
    check_same_size(samples, reference)
    fake = features(network, samples, batch_size, device, progress, "I3D (samples)")[0]
    real = features(network, reference, batch_size, device, progress, "I3D (reference)")[0]
    protocol = (f"FVD_{num_clips}^{FVD_FRAMES} (StyleGAN-V): I3D TorchScript, rescale + resize to 224 inside it, "
                f"{num_clips} generated vs {num_clips} real clips of {FVD_FRAMES} frames at "
                f"{samples.shape[2]}x{samples.shape[3]}")
    return dict(fvd=frechet_distance(*statistics(fake), *statistics(real)), num_clips=num_clips, protocol=protocol)


def judge_samples(path):
    """Judged accuracy of shapes samples (data.judge), overall and per colour and per shape."""
    arrays = load_npz(path, "samples")
    if "arr_1" not in arrays:
        raise UserError(f"samples {path} have no labels (arr_1): judge needs sample.py --num-fid-samples output")
    pixels = torch.from_numpy(check_pixels(arrays["arr_0"], f"samples {path}")).movedim(-1, -3).float() / 127.5 - 1
    labels = torch.from_numpy(arrays["arr_1"]).long()
    result = judge_report(pixels, labels)
    print(f"judged {len(labels)} samples of {path}: {describe_judgement(result)}")
    return result


def load_reference(path):
    """dict(pixels=, mu=, sigma=) of an .npz or image folder; mu and sigma only where the file has them."""
    if os.path.isdir(path):
        return dict(pixels=load_pixels(path, "reference"))
    arrays = load_npz(path, "reference")
    reference = {key: arrays[key] for key in ("mu", "sigma") if key in arrays}
    if "arr_0" in arrays:
        reference["pixels"] = check_pixels(arrays["arr_0"], f"reference {path}")
    if "arr_0" not in arrays and len(reference) < 2:
        raise UserError(f"reference {path} holds neither images (arr_0) nor statistics (mu, sigma)")
    return reference


def real_pixels(items, info, num, seed=0, progress=False):
    """uint8 pixels of `num` items of a data set, in an order fixed by `seed`, each item's random draws
    (flips, clip starts) fixed by it too; latents are decoded by the data set's VAE."""
    from train import SeededItems  # train.py imports this file

    if len(items) < num:
        raise UserError(f"{num} reference items asked for; the data set has only {len(items)}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    seeded = SeededItems(items)
    pixels = [to_uint8(to_pixels(seeded[(i, seed * 1_000_003 + i)][0][None], info))[0]
              for i in tqdm(order, desc="reference", disable=not progress)]
    return np.stack(pixels)


def write_reference(dataset, data_path, out, num, image_size=None, num_frames=None, frame_interval=3, split="all",
                    seed=0, progress=True):
    """The first `num` items of a data set (see real_pixels) in out (.npz): the real side of FVD (UCF-101
    clips), or of FID for a folder of images."""
    items, info = make_dataset(dataset, data_path, image_size, num_frames, seed, frame_interval, split)
    write_npz(out, arr_0=real_pixels(items, info, num, seed, progress))
    return out


class TrainingFID:
    """FID of a model's samples against its training data, for train.py --eval-every: the reference
    statistics are computed once, each call draws `num_samples` EMA samples (DDIM 50, guidance 1.5,
    sample i seeded by i as in sample.py) and measures them. Clips are measured by their frames."""

    def __init__(self, items, info, num_samples, inception=None, device="cpu", seed=0, batch_size=100):
        self.info, self.num_samples, self.device, self.seed, self.batch_size = info, num_samples, device, seed, batch_size
        self.network = Inception(inception).to(device)
        self.items = items
        self.reference = None

    def frames(self, pixels):
        return pixels.reshape(-1, *pixels.shape[-3:])                            # (N [* T], H, W, 3)

    def __call__(self, model, precision="fp32"):
        if self.reference is None:
            real = real_pixels(self.items, self.info, min(self.num_samples, len(self.items)), self.seed)
            self.reference = statistics(features(self.network, self.frames(real), device=self.device)[0])
        labels = torch.arange(self.num_samples) % self.info["num_classes"]
        pool = []
        for start in range(0, self.num_samples, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.num_samples))
            pixels = sample_pixels(model, self.info, labels, indices, "ddim", 50, 1.5, self.seed, precision)
            pool.append(features(self.network, self.frames(pixels), device=self.device)[0])
        return frechet_distance(*statistics(np.concatenate(pool)), *self.reference)


#################################################################################
#                                  Command line                                 #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in (("fid", "FID, Inception Score, precision/recall of images"), ("fvd", "FVD of 16-frame clips")):
        command = commands.add_parser(name, help=what)
        command.add_argument("samples", help=".npz (arr_0) or a folder of images")
        command.add_argument("reference", help=".npz (arr_0 and/or mu, sigma) or a folder of images")
        command.add_argument("--batch-size", type=positive_int, default=64 if name == "fid" else 4)
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--no-progress", action="store_true")
    commands.choices["fid"].add_argument("--inception", default=None,
                                         help=f"FID Inception-v3 weights (default: download {INCEPTION_URL})")
    commands.choices["fid"].add_argument("--num-samples", type=positive_int, default=None,
                                         help="evaluate the first N samples (default: all; DiT: 50,000)")
    commands.choices["fvd"].add_argument("--i3d", default=None, help=f"StyleGAN-V's I3D TorchScript (default: "
                                         f"download {I3D_URL})")
    commands.choices["fvd"].add_argument("--num-clips", type=positive_int, default=FVD_CLIPS,
                                         help="clips of each side (the protocol: 2048; fewer is not comparable)")
    judged = commands.add_parser("judge", help="shapes only: how many samples show the class they were asked for")
    judged.add_argument("samples", help=".npz of sample.py --num-fid-samples (arr_0 pixels, arr_1 labels)")
    reference = commands.add_parser("reference", help="an .npz of real items of a data set (the real side of FVD)")
    reference.add_argument("--dataset", required=True, choices=["shapes", "folder", "imagenet", "ucf101"])
    reference.add_argument("--data-path", default=None)
    reference.add_argument("--image-size", type=positive_int, default=None)
    reference.add_argument("--num-frames", type=positive_int, default=None)
    reference.add_argument("--frame-interval", type=positive_int, default=3)
    reference.add_argument("--split", default="all")
    reference.add_argument("--num", type=positive_int, default=FVD_CLIPS, help="items to write")
    reference.add_argument("--seed", type=int, default=0)
    reference.add_argument("--out", required=True)
    reference.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return args


def main(args):
    if args.command == "reference":
        out = write_reference(args.dataset, args.data_path, args.out, args.num, args.image_size, args.num_frames,
                              args.frame_interval, args.split, args.seed, not args.no_progress)
        print(f"wrote {args.num} items of {args.dataset} to {out}")
        return dict(path=out)
    if args.command == "judge":
        return judge_samples(args.samples)
    samples = load_pixels(args.samples)
    progress = not args.no_progress
    if args.command == "fid":
        reference = load_reference(args.reference)
        result = fid(samples, reference, Inception(args.inception), args.num_samples, args.batch_size, args.device,
                     progress)
        print(f"FID {result['fid']:.3f} of {result['num_samples']} samples against {args.reference}"
              + (f"; Inception Score {result['inception_score']:.2f}" if "inception_score" in result else
                 "; no Inception Score (the weights file has no classifier)")
              + (f"; precision {result['precision']:.3f}, recall {result['recall']:.3f} "
                 f"({result['num_reference']} reference images)" if "precision" in result else ""))
    else:
        reference = load_pixels(args.reference, "reference")
        result = fvd(samples, reference, I3D(args.i3d), args.num_clips, args.batch_size, args.device, progress)
        print(f"FVD {result['fvd']:.2f}  [{result['protocol']}]")
    return result


if __name__ == "__main__":
    run_script(main, parse_args)
