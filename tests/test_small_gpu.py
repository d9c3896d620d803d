"""What a small-GPU run needs, on the CPU: gradient accumulation that is the large batch, resume with it,
learning rates by model size, flips off, cheap or no sample grids, what the log says, and --compile."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
import train
from diffusion import Diffusion

BASE = ["--model", "DiM-Ti/8", "--image-size", "16", "--no-progress", "--sample-every", "0"]


def run(tmp_path, *flags):
    return train.main(train.parse_args(BASE + ["--results-dir", str(tmp_path / "results"), *flags]))


def test_micro_batches_give_the_update_of_the_whole_batch(tmp_path, monkeypatch):
    """K micro-batches of B/K and one batch of B see the same items; with each item's noise and timestep
    fixed by the item (not by the order of random draws), one optimizer step lands in the same place,
    to fp32 rounding."""
    real = Diffusion.training_losses

    def item_noise(self, model_fn, x0, t, noise=None):
        key = (x0.flatten(1).sum(1) * 1000).long()                               # (N,) a number per item
        t = key % self.num_timesteps
        noise = torch.sin(key[:, None].double() * torch.arange(1, x0[0].numel() + 1)).float().view_as(x0)
        return real(self, model_fn, x0, t, noise)

    monkeypatch.setattr(Diffusion, "training_losses", item_noise)
    flags = ["--max-steps", "1", "--global-batch-size", "8", "--lr-schedule", "constant", "--grad-clip", "0"]
    whole = run(tmp_path / "a", *flags)
    accumulated = run(tmp_path / "b", *flags, "--accum-steps", "4")
    torch.manual_seed(0)  # the run's initial weights (--global-seed 0)
    initial = train.model_from_args(dict(vars(train.parse_args(BASE)), num_frames=1), whole_info())
    moved = 0
    for a, b, start in zip(whole["model"].parameters(), accumulated["model"].parameters(), initial.parameters()):
        # AdamW's first step is about lr * sign(grad): where a gradient is near zero its rounding shows
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
        assert ((a - b).abs() > 1e-6).float().mean() < 1e-3
        moved += int(((a - start).abs() > 1e-4).sum())
    assert moved > 1000  # the step moved the weights (adaLN-zero's first step moves its zeroed layers)


def whole_info():
    return dict(channels=3, num_classes=9, image_size=16, input_size=16, num_frames=1)


def test_resume_with_accumulation_is_bit_exact(tmp_path):
    flags = ["--lr-schedule", "constant", "--log-every", "1", "--ckpt-every", "2", "--global-batch-size", "8",
             "--accum-steps", "2"]
    whole = run(tmp_path / "a", *flags, "--max-steps", "4")
    run(tmp_path / "b", *flags, "--max-steps", "2")
    resumed = run(tmp_path / "b", *flags, "--max-steps", "4", "--resume", "auto")
    assert resumed["step"] == 4
    for a, b in zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    with open(os.path.join(whole["run_dir"], "log.txt")) as f:
        first = f.readline()
    assert "global batch 8 (2 micro-batches of 4 a rank)" in first


def test_the_learning_rate_follows_the_model_size_unless_given():
    assert train.parse_args(["--model", "DiM-Ti/2"]).lr == 5e-3
    assert train.parse_args(["--model", "DiM-S/2"]).lr == 1e-3
    assert train.parse_args(["--model", "DiM-XL/2"]).lr == 1e-4  # DiT's
    assert train.parse_args(["--model", "DiM-XL/2", "--lr", "3e-4"]).lr == 3e-4


def test_the_first_log_line_names_the_default_rate_and_the_loss_curve_is_drawn(tmp_path):
    out = run(tmp_path, "--max-steps", "2", "--log-every", "1", "--global-batch-size", "8")
    with open(os.path.join(out["run_dir"], "log.txt")) as f:
        first = f.readline()
    assert "global batch 8, lr 0.005 (the default for DiM-Ti)" in first
    assert Image.open(os.path.join(out["run_dir"], "loss.png")).size[0] > 100


def test_no_sample_grids_with_sample_every_0_and_small_ones_on_request(tmp_path):
    quiet = run(tmp_path / "a", "--max-steps", "2", "--global-batch-size", "8")
    assert not os.path.exists(os.path.join(quiet["run_dir"], "samples"))
    small = train.main(train.parse_args(BASE[:-2] + ["--results-dir", str(tmp_path / "b"), "--max-steps", "2",
                                                     "--global-batch-size", "8", "--grid-samples", "3",
                                                     "--grid-steps", "2"]))
    grid = Image.open(os.path.join(small["run_dir"], "samples", "0000002.png"))
    assert grid.size == (3 * 18, 18)  # three samples in one row


def test_flips_can_be_turned_off(tmp_path):
    os.makedirs(tmp_path / "digits" / "seven")
    left_half = np.zeros((16, 16, 3), dtype=np.uint8)
    left_half[:, :8] = 255                                                        # bright on the left only
    Image.fromarray(left_half).save(tmp_path / "digits" / "seven" / "0.png")
    flipping, _ = data.make_dataset("folder", str(tmp_path / "digits"), 16)
    fixed, _ = data.make_dataset("folder", str(tmp_path / "digits"), 16, flip=False)
    torch.manual_seed(0)
    seen = {bool(flipping[0][0][0, 0, 0] > 0) for _ in range(20)}
    assert seen == {True, False}                                                  # flipped about half the time
    assert all(fixed[0][0][0, 0, 0] > 0 for _ in range(20))


def test_compile_trains_and_samples_as_eager(tmp_path, monkeypatch, capsys):
    """--compile: Inductor's fused kernels (C++ on the CPU) with each scan one opaque operator train
    as eager does, to fp32 rounding, and sample.py --compile draws the same samples. Inductor draws
    random numbers its own way unless told to take torch's (label dropout): here it is told to, so that
    both runs see the same draws."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    flags = ["--max-steps", "3", "--log-every", "1", "--global-batch-size", "8", "--ckpt-every", "3"]
    eager = run(tmp_path / "a", *flags)
    compiled = run(tmp_path / "b", *flags, "--compile")
    with open(os.path.join(compiled["run_dir"], "log.txt")) as f:
        assert "fp32, compiled, global batch 8" in f.readline()
    for a, b in zip(eager["model"].parameters(), compiled["model"].parameters()):
        # AdamW's steps are about lr * sign(grad): where a gradient is near zero its rounding shows
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
        assert ((a - b).abs() > 1e-6).float().mean() < 0.01
    drawn = [sample.main(sample.parse_args(["--ckpt", compiled["checkpoint"], "--num-samples", "4",
                                            "--num-sampling-steps", "2", "--out", str(tmp_path / f"{i}.png")]
                                           + flags_of_run)) for i, flags_of_run in enumerate([[], ["--compile"]])]
    torch.testing.assert_close(drawn[1]["samples"], drawn[0]["samples"], rtol=0, atol=1e-4)


def test_compile_without_a_cpp_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sample.shutil, "which", lambda name: None)
    with pytest.raises(data.UserError, match="--compile on the CPU needs a C\\+\\+ compiler"):
        run(tmp_path, "--max-steps", "1", "--global-batch-size", "8", "--compile")
    assert not os.path.exists(tmp_path / "results") or not os.listdir(tmp_path / "results")  # no run folder
