"""The real data sets on a CPU with no network: ImageNet-style latent extraction with a tiny, randomly
initialised SD-style VAE, and a tiny UCF-101 tree of AVI files written by PyAV whose frames encode
their own index (in their brightness) and their orientation (a bright bar on the left)."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import data
import sample
import train
from data import UserError


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A 4-level AutoencoderKL (8x down, 4 latent channels, like the SD VAE) with 8 channels a level."""
    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                  norm_num_groups=4, sample_size=32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """ImageNet's layout: train/<wnid>/<images>, 2 classes of 5 JPEGs of assorted sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        os.makedirs(root / wnid)
        for i in range(5):
            pixels = rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.JPEG", format="JPEG")
    return str(root)


def extract_images(image_tree, vae_dir, out, **kwargs):
    return data.extract("imagenet", image_tree, str(out), 32, vae_dir, batch_size=4, progress=False, **kwargs)


def test_imagenet_extraction_then_training_and_sampling(image_tree, vae_dir, tmp_path):
    out = extract_images(image_tree, vae_dir, tmp_path / "latents")
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["complete"] and meta["latent_size"] == 4 and meta["class_names"] == ["n01440764", "n01443537"]
    latents = np.load(os.path.join(out, "latents.npy"), mmap_mode="r")
    assert latents.shape == (10, 2, 4, 4, 4) and latents.dtype == np.float16
    assert np.load(os.path.join(out, "labels.npy")).tolist() == [0] * 5 + [1] * 5

    # Row 0 is the first image (DiT's centre crop) and its mirror image, encoded and scaled.
    first = sorted(os.listdir(os.path.join(image_tree, "n01440764")))[0]
    crop = data.center_crop_arr(Image.open(os.path.join(image_tree, "n01440764", first)).convert("RGB"), 32)
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = data.encode(data.load_vae(vae_dir), torch.cat([x, x.flip(-1)]), [0, 1])
    torch.testing.assert_close(torch.from_numpy(latents[0].astype(np.float32)), expected, atol=2e-3, rtol=2e-3)

    dataset, info = data.make_dataset("imagenet", out)
    assert (info["channels"], info["input_size"], info["image_size"], info["num_classes"]) == (4, 4, 32, 2)
    torch.manual_seed(0)
    draws = [dataset[0][0] for _ in range(16)]
    assert draws[0].shape == (4, 4, 4) and draws[0].dtype == torch.float32
    stored = {flip: torch.from_numpy(latents[0, flip].astype(np.float32)) for flip in (0, 1)}
    assert {next(f for f in (0, 1) if torch.equal(d, stored[f])) for d in draws} == {0, 1}  # both flips come up
    with pytest.raises(UserError, match="latents in .* are of 32-pixel images"):
        data.make_dataset("imagenet", out, image_size=64)
    with pytest.raises(UserError, match="a latent cache of imagenet, not of folder"):
        data.make_dataset("folder", out)  # a folder cache is made with --dataset folder

    result = train.main(train.parse_args(["--dataset", "imagenet", "--data-path", out, "--model", "DiM-Ti/2",
                                          "--max-steps", "2", "--global-batch-size", "4", "--no-progress",
                                          "--results-dir", str(tmp_path / "runs")]))
    assert os.path.isfile(os.path.join(result["run_dir"], "samples", "0000002.png"))
    grid = sample.main(sample.parse_args(["--ckpt", result["checkpoint"], "--num-samples", "4",
                                          "--num-sampling-steps", "4", "--out", str(tmp_path / "grid.png")]))
    assert grid["samples"].shape == (4, 3, 32, 32)                  # decoded by the VAE to pixels
    assert Image.open(grid["path"]).size == (2 * 34, 2 * 34)


def test_any_image_folder_can_be_trained_in_latent_space(image_tree, vae_dir, tmp_path):
    out = data.extract("folder", image_tree, str(tmp_path / "cache"), 16, vae_dir, progress=False)
    dataset, info = data.make_dataset("folder", out)
    assert (len(dataset), info["channels"], info["input_size"], info["vae"]) == (10, 4, 2, vae_dir)
    dataset, info = data.make_dataset("folder", image_tree, image_size=16)  # the tree itself: pixels
    assert (info["channels"], dataset[0][0].shape) == (3, (3, 16, 16))


def test_interrupted_and_sharded_extractions_give_the_same_array(image_tree, vae_dir, tmp_path, monkeypatch):
    reference = np.load(os.path.join(extract_images(image_tree, vae_dir, tmp_path / "a"), "latents.npy"))

    encode, calls, kill_at = data.encode, [], [2]

    class Killed(Exception):
        pass

    def interrupted(*args):
        calls.append(1)
        if len(calls) in kill_at:
            raise Killed  # the process dies while encoding the second batch
        return encode(*args)

    monkeypatch.setattr(data, "encode", interrupted)
    with pytest.raises(Killed):
        extract_images(image_tree, vae_dir, tmp_path / "b")
    with pytest.raises(UserError, match="has not finished"):
        data.make_dataset("imagenet", str(tmp_path / "b"))
    calls.clear()
    kill_at.clear()
    extract_images(image_tree, vae_dir, tmp_path / "b")
    assert len(calls) == 2  # the two unfinished batches of three, not the finished one
    assert np.array_equal(np.load(tmp_path / "b" / "latents.npy"), reference)

    # Two ranks, one after the other: rank 0 writes batches 0 and 2 only; rank 1 finishes the job.
    calls.clear()
    extract_images(image_tree, vae_dir, tmp_path / "c", rank=0, world=2)
    assert np.load(tmp_path / "c" / "done.npy").tolist() == [1, 0, 1]
    assert not np.load(tmp_path / "c" / "latents.npy")[4:8].any()
    extract_images(image_tree, vae_dir, tmp_path / "c", rank=1, world=2)
    assert len(calls) == 3 and json.load(open(tmp_path / "c" / "meta.json"))["complete"]
    assert np.array_equal(np.load(tmp_path / "c" / "latents.npy"), reference)

    with pytest.raises(UserError, match="holds another extraction .*image_size"):
        data.extract("imagenet", image_tree, str(tmp_path / "c"), 64, vae_dir, batch_size=4, progress=False)


def test_extraction_skips_a_corrupt_image_and_a_rerun_finishes(image_tree, vae_dir, tmp_path):
    """One bad file among a million must not stop every rerun at the same place: it is left out and named."""
    tree = tmp_path / "tree"
    shutil.copytree(image_tree, tree)
    (tree / "n01440764" / "broken.JPEG").write_bytes(b"")
    out = extract_images(str(tree), vae_dir, tmp_path / "cache")
    dataset, _ = data.make_dataset("imagenet", out)
    assert len(dataset) == 10 and np.load(os.path.join(out, "unreadable.npy")).sum() == 1


def test_extraction_without_flips_stores_no_mirrors(image_tree, vae_dir, tmp_path):
    out = extract_images(image_tree, vae_dir, tmp_path / "cache", flip=False)
    assert np.load(os.path.join(out, "latents.npy"), mmap_mode="r").shape[1] == 1
    dataset, _ = data.make_dataset("imagenet", out)
    assert len(dataset) == 10 and dataset[0][0].shape == (4, 4, 4)


def test_extraction_under_torchrun_shares_the_work(image_tree, vae_dir, tmp_path):
    reference = np.load(os.path.join(extract_images(image_tree, vae_dir, tmp_path / "one"), "latents.npy"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
               os.path.join(root, "data.py"), "extract", "--dataset", "imagenet", "--data-path", image_tree,
               "--out", str(tmp_path / "two"), "--image-size", "32", "--vae", vae_dir, "--batch-size", "4"]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0" in result.stderr and "rank 1" not in result.stderr  # one progress bar
    assert json.load(open(tmp_path / "two" / "meta.json"))["complete"]
    assert np.array_equal(np.load(tmp_path / "two" / "latents.npy"), reference)


#################################################################################
#                                    UCF-101                                    #
#################################################################################

def level(k):
    return 20 + 7 * k  # frame k's brightness


def write_avi(path, count):
    """A 40x32 MPEG-4 AVI of `count` grey frames of brightness level(k), with a white bar on the left."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 40, 32, "yuv420p", 8_000_000
        for k in range(count):
            frame = np.full((32, 40, 3), level(k), dtype=np.uint8)
            frame[:, 4:12] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf")
    videos = {"ApplyEyeMakeup": [("g01_c01", 30), ("g08_c01", 30)], "Basketball": [("g01_c01", 30), ("g08_c01", 5)]}
    for name, clips in videos.items():
        os.makedirs(root / "UCF-101" / name)
        for clip, count in clips:
            write_avi(root / "UCF-101" / name / f"v_{name}_{clip}.avi", count)
    (root / "UCF-101" / "Basketball" / "v_Basketball_g09_c01.avi").write_bytes(os.urandom(3000))  # corrupt
    os.makedirs(root / "ucfTrainTestlist")
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Basketball\n")
    (root / "ucfTrainTestlist" / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nBasketball/v_Basketball_g08_c01.avi 2\n")
    (root / "ucfTrainTestlist" / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nBasketball/v_Basketball_g01_c01.avi\n")
    return str(root)


def read_clip(clip):
    """(frame numbers, flipped?) from a clip (T, 3, H, W) in [-1, 1] of the videos above."""
    pixels = (clip + 1) * 127.5                                             # (T, 3, 16, 16)
    left, right = pixels[:, :, :, :5].mean(dim=(1, 2, 3)), pixels[:, :, :, -5:].mean(dim=(1, 2, 3))
    flipped = bool((right > left).all())
    assert flipped or bool((left > right).all())  # one flip for the whole clip
    grey = pixels[:, :, :, 7:10]                                          # away from the bar
    numbers = ((grey.mean(dim=(1, 2, 3)) - level(0)) / 7).round().long().tolist()
    return numbers, flipped


def test_ucf101_clip_sampler_picks_the_right_frames(ucf_root):
    dataset = data.UCF101(ucf_root, "all", image_size=16, num_frames=4, frame_interval=3)
    names = [os.path.basename(p) for p in dataset.paths]
    assert len(dataset) == 5 and dataset.classes == ["ApplyEyeMakeup", "Basketball"]
    torch.manual_seed(0)
    long, short = names.index("v_ApplyEyeMakeup_g01_c01.avi"), names.index("v_Basketball_g08_c01.avi")
    starts, flips = set(), set()
    for _ in range(12):
        clip, label = dataset[long]
        assert clip.shape == (4, 3, 16, 16) and label == 0
        numbers, flipped = read_clip(clip)
        assert [b - a for a, b in zip(numbers, numbers[1:])] == [3, 3, 3] and 0 <= numbers[0] <= 30 - 10
        starts.add(numbers[0])
        flips.add(flipped)
    assert len(starts) > 3 and flips == {False, True}
    clip, label = dataset[short]  # 5 frames for a span of 10: looped
    numbers, _ = read_clip(clip)
    assert label == 1 and numbers == [(numbers[0] + 3 * k) % 5 for k in range(4)]

    # A header that promises more frames than there are (100 for 30): the clip loops over the real ones.
    frames = data.read_frames(dataset.paths[long], 16, [81, 84, 87, 90])
    numbers, _ = read_clip(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert numbers == [21, 24, 27, 0]

    corrupt = names.index("v_Basketball_g09_c01.avi")
    clip, label = dataset[corrupt]  # skipped: the next video (in order, wrapping) is read instead
    assert dataset.skipped.count() == 1 and clip.shape == (4, 3, 16, 16)
    assert label == dataset.labels[(corrupt + 1) % len(dataset)]


def test_ucf101_splits_and_errors(ucf_root, tmp_path):
    paths, labels, _ = data.ucf101_videos(ucf_root, "train1")
    assert [os.path.basename(p) for p in paths] == ["v_ApplyEyeMakeup_g08_c01.avi", "v_Basketball_g08_c01.avi"]
    assert labels == [0, 1]
    assert len(data.ucf101_videos(ucf_root, "test1")[0]) == 2
    assert len(data.ucf101_videos(os.path.join(ucf_root, "UCF-101"), "all")[0]) == 5  # the video folder itself
    with pytest.raises(UserError, match="--split train9"):
        data.ucf101_videos(ucf_root, "train9")
    with pytest.raises(UserError, match="trainlist02.txt"):
        data.ucf101_videos(ucf_root, "train2")
    with pytest.raises(UserError, match="is not a folder"):
        data.ucf101_videos(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no .avi videos"):
        data.ucf101_videos(str(tmp_path))
    with pytest.raises(UserError, match="python data.py extract --dataset imagenet"):
        data.make_dataset("imagenet", str(tmp_path))
    with pytest.raises(UserError, match="--dataset imagenet needs --data-path"):
        data.make_dataset("imagenet", None)
    with pytest.raises(UserError, match="--dataset ucf101 needs --data-path"):
        data.make_dataset("ucf101", None)


def test_ucf101_training_then_gif_and_mp4(ucf_root, tmp_path):
    result = train.main(train.parse_args(["--dataset", "ucf101", "--data-path", ucf_root, "--num-frames", "4",
                                          "--image-size", "16", "--max-steps", "2", "--global-batch-size", "4",
                                          "--log-every", "1", "--no-progress", "--results-dir", str(tmp_path / "runs")]))
    with open(os.path.join(result["run_dir"], "log.txt")) as f:
        assert "(1 unreadable videos skipped so far, the first " in f.read()  # 8 of the 5 videos read: the corrupt one too
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert (ckpt["args"]["num_frames"], ckpt["args"]["frame_interval"], ckpt["data_info"]["num_classes"]) == (4, 3, 2)
    out = sample.main(sample.parse_args(["--ckpt", result["checkpoint"], "--num-samples", "2",
                                         "--num-sampling-steps", "3", "--out", str(tmp_path / "clips.gif")]))
    gif = Image.open(out["path"])
    assert gif.n_frames == 4 and gif.size == (2 * 18, 18)
    out = sample.main(sample.parse_args(["--ckpt", result["checkpoint"], "--num-samples", "2",
                                         "--num-sampling-steps", "3", "--out", str(tmp_path / "clips.mp4")]))
    with av.open(out["path"]) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 4 and (frames[0].width, frames[0].height) == (2 * 18, 18)


def test_ucf101_latent_cache(ucf_root, vae_dir, tmp_path):
    out = data.extract("ucf101", ucf_root, str(tmp_path / "cache"), 16, vae_dir, frame_interval=3, progress=False)
    index = np.load(os.path.join(out, "index.npy"))
    assert index[:, 1].tolist() == [10, 10, 10, 2, 0]  # every 3rd frame; the corrupt video has none
    dataset, info = data.make_dataset("ucf101", out, num_frames=4, frame_interval=3)
    assert len(dataset) == 4 and info["channels"] == 4 and info["input_size"] == 2
    clip, label = dataset[0]
    assert clip.shape == (4, 4, 2, 2) and label == 0
    with pytest.raises(UserError, match="--frame-interval 3"):
        data.make_dataset("ucf101", out, num_frames=4, frame_interval=2)


def test_missing_optional_packages_say_what_to_install(monkeypatch):
    real = importlib.import_module

    def without(name, *args):
        if name in ("av", "diffusers"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without)
    data.load_vae.cache_clear()
    with pytest.raises(UserError, match="pip install diffusers"):
        data.load_vae("ema")
    with pytest.raises(UserError, match="pip install av"):
        data.frame_count("video.avi")
    with pytest.raises(UserError, match="--vae nowhere: not a folder"):
        monkeypatch.setattr(importlib, "import_module", real)
        data.load_vae("nowhere")
