"""Evaluation on the CPU, offline: the Frechet distance against closed forms and scipy, mass sampling
(.npz layout, labels, any number of ranks, resume), FID / FVD plumbing with stand-in feature networks
built here, train.py --eval-every, and the errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluate
import sample
import train
from data import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "DiM-Ti/8", "--image-size", "16", "--global-batch-size", "8", "--no-progress"]


#################################################################################
#                            The Frechet distance                               #
#################################################################################

def test_frechet_distance_of_gaussians_with_known_moments():
    """Commuting covariances have the closed form |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    sigma = q @ np.diag(a) @ q.T
    assert evaluate.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0, abs=1e-10)
    assert evaluate.frechet_distance(np.zeros(5), np.eye(5), np.ones(5), np.eye(5)) == pytest.approx(5.0)


def test_frechet_distance_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 20)), rng.normal(size=(200, 20)) @ rng.normal(size=(20, 20)) * 0.5 + 0.3
    (mu1, sigma1), (mu2, sigma2) = evaluate.statistics(x), evaluate.statistics(y)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root)
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    # rank-deficient covariances (fewer samples than features), as a small FID has them
    (mu1, sigma1), (mu2, sigma2) = evaluate.statistics(x[:8]), evaluate.statistics(y[:8])
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root)
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-5)


#################################################################################
#                                 Mass sampling                                 #
#################################################################################

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny image run and a tiny 3-frame video run, two steps each."""
    folder = tmp_path_factory.mktemp("runs")
    common = TINY + ["--results-dir", str(folder), "--max-steps", "2", "--sample-every", "100"]
    image = train.main(train.parse_args(common))["checkpoint"]
    video = train.main(train.parse_args(common + ["--num-frames", "3"]))["checkpoint"]
    return dict(image=image, video=video)


def mass_sample(ckpt, out, *flags):
    args = sample.parse_args(["--ckpt", ckpt, "--num-fid-samples", "11", "--batch-size", "4",
                              "--num-sampling-steps", "3", "--sampler", "ddpm", "--out", str(out), *flags])
    return sample.main(args)


def test_mass_sampling_writes_what_the_adm_evaluator_reads(checkpoints, tmp_path):
    mass_sample(checkpoints["image"], tmp_path / "images.npz")
    with np.load(tmp_path / "images.npz") as f:
        assert f["arr_0"].shape == (11, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [i % 9 for i in range(11)]  # uniform over the 9 classes
        assert f["arr_0"].std() > 0
    assert not os.path.exists(str(tmp_path / "images.npz") + ".partial")
    mass_sample(checkpoints["video"], tmp_path / "clips.npz")
    with np.load(tmp_path / "clips.npz") as f:
        assert f["arr_0"].shape == (11, 3, 16, 16, 3) and f["arr_0"].dtype == np.uint8
    with pytest.raises(UserError, match="exists"):  # never over a file the user has
        mass_sample(checkpoints["image"], tmp_path / "images.npz")
    with pytest.raises(UserError, match="ending in .npz"):
        mass_sample(checkpoints["image"], tmp_path / "images.png")


def test_a_stopped_mass_sampling_run_carries_on_to_the_same_file(checkpoints, tmp_path, monkeypatch):
    mass_sample(checkpoints["image"], tmp_path / "whole.npz")
    real_generate, calls = sample.generate, []

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", dies_on_the_third_batch)
    with pytest.raises(UserError, match=r"^a batch of 4 samples does not fit in GPU memory: a smaller --batch-size "):
        mass_sample(checkpoints["image"], tmp_path / "stopped.npz")
    assert not os.path.exists(tmp_path / "stopped.npz")
    with pytest.raises(UserError, match="other settings.*seed"):  # another run may not mix into it
        mass_sample(checkpoints["image"], tmp_path / "stopped.npz", "--seed", "5")
    calls.clear()
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    mass_sample(checkpoints["image"], tmp_path / "stopped.npz", "--batch-size", "3")  # as after running out of memory
    assert len(calls) == 2  # samples 0-7 were done: the batches 6-8 and 9-10 are drawn
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "stopped.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory.")  # a grid draws its samples at once: fewer fit
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: (_ for _ in ()).throw(out_of_memory))
    with pytest.raises(UserError, match=r"^the 3 samples of a grid, drawn at once, do not fit in GPU memory: ask "):
        sample.main(sample.parse_args(["--ckpt", checkpoints["image"], "--num-samples", "3", "--out",
                                       str(tmp_path / "grid.png")]))


def test_two_ranks_write_the_file_that_one_process_writes(checkpoints, tmp_path):
    mass_sample(checkpoints["image"], tmp_path / "one.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
               os.path.join(ROOT, "sample.py"), "--ckpt", checkpoints["image"], "--num-fid-samples", "11",
               "--batch-size", "4", "--num-sampling-steps", "3", "--sampler", "ddpm", "--device", "cpu",
               "--out", str(tmp_path / "two.npz")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


#################################################################################
#                        FID and FVD with stand-in networks                     #
#################################################################################

class StandInInception(torch.nn.Module):
    """uint8 (N, 3, H, W) -> (features (N, 6), logits (N, 5)): a fixed random conv net."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(3, 6, 3), torch.nn.Linear(6, 5)

    def forward(self, x):
        pool = self.conv(x.float() / 255).relu().mean(dim=(2, 3))
        return pool, self.fc(pool)


class StandInI3D(torch.nn.Module):
    """StyleGAN-V's I3D call, (N, 3, T, H, W) in [0, 255] with its three flags, on a random Conv3d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 5, 3)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if rescale:
            x = x / 127.5 - 1
        return self.conv(x).relu().mean(dim=(2, 3, 4))


def images(count, shift=0, size=8, frames=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (count,) + ((frames,) if frames else ()) + (size, size, 3)
    return (rng.integers(0, 200, shape) + shift).clip(0, 255).astype(np.uint8)


def test_fid_is_the_frechet_distance_of_the_networks_features():
    network = StandInInception()
    samples, reference = images(40, seed=1), images(30, shift=40, seed=2)
    result = evaluate.fid(samples, dict(pixels=reference), network)
    mine, theirs = (evaluate.features(network, x)[0] for x in (samples, reference))
    assert result["fid"] == pytest.approx(evaluate.frechet_distance(*evaluate.statistics(mine),
                                                                    *evaluate.statistics(theirs)), rel=1e-9)
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert 1 <= result["inception_score"] <= 5
    assert result["num_samples"] == 40 and result["num_reference"] == 30
    # precomputed statistics (ADM's reference batches) give the same FID; the same set gives ~0
    mu, sigma = evaluate.statistics(theirs)
    assert evaluate.fid(samples, dict(mu=mu, sigma=sigma), network)["fid"] == pytest.approx(result["fid"])
    assert evaluate.fid(samples, dict(pixels=samples), network)["fid"] == pytest.approx(0, abs=1e-8)
    assert evaluate.fid(samples, dict(pixels=reference), network, num_samples=20)["num_samples"] == 20


def test_fid_command_end_to_end_with_inception_weights_from_a_file(tmp_path, monkeypatch, capsys):
    """The real torch-fidelity Inception-v3 architecture, loaded through --inception from a file of
    random weights written here (the real 2015-12-05 weights need a download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as patch:  # build it once without weights, to save a random state dict
        patch.setattr(torch, "load", lambda *a, **k: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        state = inception.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path="x").state_dict()
    torch.save(state, tmp_path / "inception.pth")
    np.savez(tmp_path / "samples.npz", arr_0=images(6, size=16, seed=3))
    np.savez(tmp_path / "reference.npz", arr_0=images(5, shift=50, size=16, seed=4))
    result = evaluate.main(evaluate.parse_args(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "reference.npz"),
                                                "--inception", str(tmp_path / "inception.pth"), "--no-progress"]))
    assert result["fid"] > 0 and "inception_score" in result and result["num_reference"] == 5
    assert "FID" in capsys.readouterr().out


def test_fvd_follows_the_protocol_and_is_the_frechet_distance(tmp_path, capsys):
    torch.jit.script(StandInI3D()).save(str(tmp_path / "i3d.pt"))
    fake, real = images(70, frames=16, seed=5), images(70, shift=30, frames=16, seed=6)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    np.savez(tmp_path / "real.npz", arr_0=real)
    args = ["fvd", str(tmp_path / "fake.npz"), str(tmp_path / "real.npz"), "--i3d", str(tmp_path / "i3d.pt"),
            "--no-progress"]
    result = evaluate.main(evaluate.parse_args(args + ["--num-clips", "64"]))
    network = StandInI3D()
    with torch.no_grad():
        a, b = (network(torch.from_numpy(x[:64]).permute(0, 4, 1, 2, 3).float(), True, True, True).double().numpy()
                for x in (fake, real))
    expected = evaluate.frechet_distance(*evaluate.statistics(a), *evaluate.statistics(b))
    assert result["fvd"] == pytest.approx(expected, rel=1e-6) and result["fvd"] > 0
    assert "FVD_64^16 (StyleGAN-V)" in capsys.readouterr().out
    with pytest.raises(UserError, match="holds 70 items; the evaluation asks for 2048"):  # the protocol's count
        evaluate.main(evaluate.parse_args(args))
    np.savez(tmp_path / "short.npz", arr_0=images(70, frames=8))
    with pytest.raises(UserError, match="16-frame clips"):
        evaluate.main(evaluate.parse_args(["fvd", str(tmp_path / "short.npz")] + args[2:] + ["--num-clips", "64"]))


def test_reference_of_a_data_set_and_judged_samples(checkpoints, tmp_path, capsys):
    evaluate.main(evaluate.parse_args(["reference", "--dataset", "shapes", "--image-size", "16", "--num", "9",
                                       "--out", str(tmp_path / "real.npz"), "--no-progress"]))
    with np.load(tmp_path / "real.npz") as f:
        real = f["arr_0"]
    assert real.shape == (9, 16, 16, 3) and real.dtype == np.uint8 and real.max() > 200
    mass_sample(checkpoints["image"], tmp_path / "s.npz")
    result = evaluate.main(evaluate.parse_args(["judge", str(tmp_path / "s.npz")]))
    assert 0 <= result["accuracy"] <= 1 and set(result) >= {"red", "green", "blue", "square", "triangle", "cross"}
    assert "colour right: red" in capsys.readouterr().out


def test_bad_evaluation_inputs_are_one_line_errors(tmp_path):
    network = StandInInception()
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32))
    np.savez(tmp_path / "nothing.npz", labels=np.zeros(3))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    cases = [(lambda: evaluate.load_pixels(str(tmp_path / "floats.npz")), "expected uint8"),
             (lambda: evaluate.load_pixels(str(tmp_path / "missing.npz")), "does not exist"),
             (lambda: evaluate.load_pixels(str(tmp_path / "broken.npz")), "not a readable .npz"),
             (lambda: evaluate.load_reference(str(tmp_path / "nothing.npz")), "neither images"),
             (lambda: evaluate.fid(images(4), dict(pixels=images(4, size=16)), network), "compare like with like"),
             (lambda: evaluate.fid(images(4), dict(pixels=images(4)), network, num_samples=10), "asks for 10"),
             (lambda: evaluate.fid(images(4, frames=16), dict(pixels=images(4)), network), "clips"),
             (lambda: evaluate.Inception(str(tmp_path / "none.pth")), "--inception .* does not exist"),
             (lambda: evaluate.Inception(str(tmp_path / "floats.npz")), "not the FID Inception-v3 weights"),
             (lambda: evaluate.I3D(str(tmp_path / "floats.npz")), "not a TorchScript file")]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()


def test_weights_without_a_network_say_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError, match="could not download .*i3d_torchscript.pt.*--i3d PATH"):
        evaluate.I3D()


def test_training_logs_fid_every_n_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "Inception", lambda path=None: StandInInception())
    args = train.parse_args(TINY + ["--results-dir", str(tmp_path), "--max-steps", "4", "--sample-every", "100",
                                    "--eval-every", "2", "--eval-samples", "5"])
    run_dir = train.main(args)["run_dir"]
    with open(os.path.join(run_dir, "log.txt")) as f:
        scores = [float(line.split("FID ")[1].split()[0]) for line in f if " FID " in line]
    assert len(scores) == 2 and all(s > 0 for s in scores)
