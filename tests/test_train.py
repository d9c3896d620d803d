"""train.py and sample.py end to end on the CPU (and the GPU where there is one): run folders, exact
resume, torchrun, CUDA graphs, a step that never waits for the device, errors."""

import copy
import math
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
import train
from data import ShapesDataset, UserError, judge
from diffusion import Diffusion, guided
from dim import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "DiM-Ti/8", "--image-size", "16", "--global-batch-size", "8", "--no-progress"]


def run(tmp_path, *flags):
    args = train.parse_args(TINY + ["--results-dir", str(tmp_path / "results")] + list(flags))
    return train.main(args)


def log_losses(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [line.split("loss ")[1].split()[0] for line in f if " loss " in line]


def test_short_run_writes_folder_checkpoint_and_samples(tmp_path):
    out = run(tmp_path, "--max-steps", "4", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "4")
    run_dir = out["run_dir"]
    assert os.path.basename(run_dir) == "000-DiM-Ti-8-shapes"
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0000002.pt", "0000004.pt"]
    assert os.path.isfile(os.path.join(run_dir, "samples", "0000004.png"))
    assert len(log_losses(run_dir)) == 2
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "0000004.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["args"]["model"] == "DiM-Ti/8" and set(ckpt["rng"][0]) >= {"torch"}
    assert ckpt["opt"]["param_groups"][0]["lr"] == train.learning_rate(train.parse_args(["--max-steps", "4"]), 3)
    # a second run gets the next number
    assert os.path.basename(run(tmp_path, "--max-steps", "1", "--sample-every", "9")["run_dir"]) == "001-DiM-Ti-8-shapes"


def assert_same_run(whole, resumed):
    for a, b in zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)
    assert log_losses(whole["run_dir"]) == log_losses(resumed["run_dir"])


def test_resume_is_bit_exact(tmp_path):
    """N steps, then N more from the checkpoint, equal 2N in one go (a constant rate: DiT's recipe)."""
    flags = ["--lr-schedule", "constant", "--log-every", "1", "--ckpt-every", "3", "--sample-every", "100"]
    whole = run(tmp_path / "a", *flags, "--max-steps", "6")
    half = run(tmp_path / "b", *flags, "--max-steps", "3")
    resumed = run(tmp_path / "b", *flags, "--max-steps", "6", "--resume", "auto")
    assert resumed["run_dir"] == half["run_dir"] and resumed["step"] == 6
    assert_same_run(whole, resumed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_cuda_graphs_train_as_eager_and_resume(tmp_path):
    """Replaying the recorded step gives the eager step's numbers, and a graphed run resumes where it
    stopped. On a GPU some backward kernels add in no fixed order, so two eager runs already differ in
    the last bits: equal logged losses and weights to 1e-5, not bit for bit."""
    def assert_close_runs(a, b):
        for x, y in zip(a["model"].state_dict().values(), b["model"].state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
        assert log_losses(a["run_dir"]) == log_losses(b["run_dir"])

    flags = ["--lr-schedule", "constant", "--log-every", "1", "--ckpt-every", "3", "--sample-every", "100",
             "--scan", "parallel", "--precision", "fp32"]
    eager = run(tmp_path / "a", *flags, "--max-steps", "6")
    whole = run(tmp_path / "b", *flags, "--max-steps", "6", "--cuda-graphs")
    assert_close_runs(eager, whole)
    run(tmp_path / "c", *flags, "--max-steps", "3", "--cuda-graphs")  # ends with a sample grid: draws noise
    resumed = run(tmp_path / "c", *flags, "--max-steps", "6", "--resume", "auto", "--cuda-graphs")
    assert_close_runs(whole, resumed)


def test_killed_run_resumes_bit_exact(tmp_path, monkeypatch):
    """The default cosine rate depends on --max-steps: a run killed after its step-3 checkpoint and
    resumed with the same flags ends exactly where one that was never stopped ends."""
    flags = ["--max-steps", "6", "--warmup-steps", "2", "--log-every", "1", "--ckpt-every", "3", "--sample-every", "100"]
    whole = run(tmp_path / "a", *flags)
    real, calls = train.update_ema, []

    def killed_in_step_4(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "update_ema", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *flags)
    monkeypatch.setattr(train, "update_ema", real)
    resumed = run(tmp_path / "b", *flags, "--resume", "auto")
    assert resumed["step"] == 6
    assert_same_run(whole, resumed)


def test_learning_rate_schedule():
    args = train.parse_args(["--lr", "1e-3", "--max-steps", "110", "--warmup-steps", "10"])
    assert args.lr_schedule == "cosine"  # the default
    rates = [train.learning_rate(args, step) for step in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3) and rates[10] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx(5e-4)  # half way through the decay
    assert rates[109] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))
    args = train.parse_args(["--lr", "1e-3", "--lr-schedule", "constant"])
    assert {train.learning_rate(args, step) for step in (0, 1, 500, 10**6)} == {1e-3}


@pytest.mark.parametrize("flags,port", [([], 29517), (["--compile"], 29518)])  # DDP of the compiled model too
def test_torchrun_two_ranks_on_gloo(tmp_path, flags, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")  # CPUs, also on a GPU machine
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               os.path.join(ROOT, "train.py"), *TINY, "--max-steps", "3", "--log-every", "1",
               "--sample-every", "3", "--results-dir", str(tmp_path / "results"), *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = os.listdir(tmp_path / "results")
    assert runs == ["000-DiM-Ti-8-shapes"]  # one writer
    with open(tmp_path / "results" / runs[0] / "log.txt") as f:
        log = f.read()
    assert "2 rank(s)" in log and "weights identical on all 2 ranks: True" in log
    assert log.count("loss ") == 3


def test_the_process_group_outlives_every_model_the_run_left_behind(monkeypatch):
    """A rare SIGABRT at exit under torchrun ("terminate called without an active exception", either rank):
    tensors of the run freed while the interpreter shut down, after the group was gone, on a thread that
    could no longer take the GIL. On rank 0 the DDP model outlived train(), held by a reference cycle
    (matplotlib's tight_layout keeps a frame, and through it the frames that called it). The teardown
    frees such garbage, and waits for every rank, while the group still lives."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29521")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    real_destroy, freed_before_teardown = data.dist.destroy_process_group, []
    monkeypatch.setattr(data.dist, "destroy_process_group",
                        lambda: freed_before_teardown.append(model() is None) or real_destroy())
    with data.process_group() as (rank, world, local_rank):
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        ddp(torch.ones(1, 2)).sum().backward()
        cycle = [ddp]
        cycle.append(cycle)
        model = weakref.ref(ddp)
        del ddp, cycle  # garbage, but only the cyclic collector frees it
        assert model() is not None
    assert (rank, world, local_rank) == (0, 1, 0) and freed_before_teardown == [True]


def test_torchrun_error_is_printed_once_and_named_in_torchruns_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29520",
               os.path.join(ROOT, "train.py"), *TINY, "--global-batch-size", "7", "--results-dir", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    message = "error: --global-batch-size 7 is not divisible by the 2 ranks x 1 accumulation steps"
    assert result.returncode == 1
    assert result.stderr.split("\n").count(message) == 1                  # once, by rank 0
    assert "Traceback" not in result.stderr.split("ChildFailedError")[-1]  # no rank's traceback in the report
    assert result.stderr.count(f"traceback : {message}") >= 1              # the report names the cause
    assert "To enable traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_default_sample_names_hold_every_option_and_judge_reports_colours_and_shapes(tmp_path, capsys):
    ckpt = run(tmp_path, "--max-steps", "1", "--sample-every", "100")["checkpoint"]
    paths = set()
    for flags in ([], ["--seed", "1"], ["--no-ema"], ["--num-samples", "4"], ["--cfg-scale", "2"], ["--class-labels", "1"]):
        paths.add(sample.main(sample.parse_args(["--ckpt", ckpt, "--num-sampling-steps", "2", *flags]))["path"])
    assert len(paths) == 6 and all(os.path.isfile(p) for p in paths)  # none written over another
    out = sample.main(sample.parse_args(["--ckpt", ckpt, "--num-sampling-steps", "2", "--judge", "--seed", "2"]))
    assert {"accuracy", "red", "green", "blue", "square", "triangle", "cross"} <= set(out)
    assert "colour right: red" in capsys.readouterr().out


def test_sample_png_and_gif(tmp_path):
    image_run = run(tmp_path, "--max-steps", "2", "--sample-every", "100")
    args = sample.parse_args(["--ckpt", image_run["checkpoint"], "--num-sampling-steps", "5", "--num-samples", "9",
                              "--out", str(tmp_path / "grid.png"), "--judge"])
    out = sample.main(args)
    assert out["samples"].shape == (9, 3, 16, 16) and 0 <= out["accuracy"] <= 1
    assert Image.open(tmp_path / "grid.png").size == (9 * 18, 18)  # a column per class
    video_run = run(tmp_path, "--max-steps", "2", "--num-frames", "3", "--sample-every", "2")
    assert os.path.isfile(os.path.join(video_run["run_dir"], "samples", "0000002.gif"))
    args = sample.parse_args(["--ckpt", video_run["checkpoint"], "--sampler", "ddpm", "--num-sampling-steps", "4",
                              "--class-labels", "0", "4", "--out", str(tmp_path / "clips.gif")])
    assert sample.main(args)["samples"].shape == (2, 3, 3, 16, 16)
    gif = Image.open(tmp_path / "clips.gif")
    assert gif.n_frames == 3


def tiny_model(device="cpu", scan="auto"):
    """DiM-Ti/8 for 16 x 16 RGB images of 4 classes, on `device`."""
    return build_model("DiM-Ti/8", input_size=16, in_channels=3, num_classes=4, scan_backend=scan).to(device)


def untrained_model(device="cpu", scan="auto"):
    """A tiny DiM in eval mode whose output depends on its input: the zero-initialised output layers
    (adaLN-zero) would give zeros however the model were run, so every weight is nudged at random."""
    torch.manual_seed(0)
    model = tiny_model(device, scan)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_bf16_sampling_is_autocast_and_close_to_fp32():
    """--precision bf16 runs the model under autocast (so its samples differ from fp32's, a little)
    while guidance and the sampler stay in fp32; fp32 is the CPU's default, bf16 a GPU's."""
    model = untrained_model(scan="parallel")
    labels = torch.tensor([0, 1, 2, 3])
    fp32, bf16 = (sample.generate(model, labels, "ddim", 5, cfg_scale=4.0, precision=p) for p in ("fp32", "bf16"))
    assert fp32.dtype == bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert (fp32 - bf16).abs().mean() < 0.01
    assert [sample.precision_for(None, d) for d in ("cpu", "cuda")] == ["fp32", "bf16"]
    assert sample.precision_for("fp32", "cuda") == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_cuda_graph_sampling_as_eager():
    """Replaying the recorded forward gives the eager samples, for both samplers and both precisions
    (and the labels the graph reads stay alive after recording: they are not a graph input)."""
    model = untrained_model("cuda")
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    for sampler in ("ddim", "ddpm"):
        for precision in ("fp32", "bf16"):
            eager, graphed = (sample.generate(model, labels, sampler, 6, cfg_scale=4.0, precision=precision,
                                              cuda_graph=graph) for graph in (False, True))
            assert eager.abs().lt(1).float().mean() > 0.01  # not all clamped to +-1: the model's output counts
            torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)


def write_images(folder, per_class, sizes):
    """Random images in folder/cats and folder/dogs, the i-th of each (height, width) sizes[i]."""
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        os.makedirs(folder / name)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*sizes[i], 3), dtype=np.uint8)).save(folder / name / f"{i}.png")


def test_folder_dataset_trains(tmp_path):
    write_images(tmp_path / "images", 5, [(20 + i, 24) for i in range(5)])
    out = run(tmp_path, "--dataset", "folder", "--data-path", str(tmp_path / "images"), "--max-steps", "2",
              "--sample-every", "100")
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    assert ckpt["data_info"]["class_names"] == ["cats", "dogs"] and ckpt["data_info"]["num_classes"] == 2


def test_resume_with_loader_workers_and_random_flips_is_bit_exact(tmp_path):
    """Random flips are drawn in the loader's worker processes (4 on a GPU by default); each item's
    draw must not depend on which worker read it or how far that worker had got."""
    write_images(tmp_path / "images", 24, [(16, 16)] * 24)
    flags = ["--dataset", "folder", "--data-path", str(tmp_path / "images"), "--image-size", "16", "--num-workers", "2",
             "--lr-schedule", "constant", "--log-every", "1", "--ckpt-every", "3", "--sample-every", "100"]
    whole = run(tmp_path / "a", *flags, "--max-steps", "5")
    run(tmp_path / "b", *flags, "--max-steps", "3")
    resumed = run(tmp_path / "b", *flags, "--max-steps", "5", "--resume", "auto")
    assert_same_run(whole, resumed)


def test_bad_inputs_give_clear_errors(tmp_path):
    def fails(match, *flags):
        with pytest.raises(UserError, match=match):
            run(tmp_path, "--max-steps", "1", *flags)

    fails("needs --data-path", "--dataset", "folder")
    fails("does not exist", "--dataset", "folder", "--data-path", str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    fails("no class sub-folders", "--dataset", "folder", "--data-path", str(tmp_path / "empty"))
    os.makedirs(tmp_path / "noimages" / "a")
    (tmp_path / "noimages" / "a" / "readme.txt").write_text("hello")
    fails("no images", "--dataset", "folder", "--data-path", str(tmp_path / "noimages"))
    fails("not divisible by the patch size 8", "--image-size", "20")
    fails("--resume .* does not exist", "--resume", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    fails("is not a DiM checkpoint", "--resume", str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    fails("is not a DiM checkpoint", "--resume", str(tmp_path / "other.pt"))
    good = run(tmp_path, "--max-steps", "1", "--sample-every", "100")["checkpoint"]
    fails("another model or data set: --model DiM-Ti/8 .checkpoint. vs DiM-Ti/4", "--resume", good,
          "--model", "DiM-Ti/4")
    if torch.cuda.is_available():
        fails("--cuda-graphs .*not with --grad-ckpt", "--cuda-graphs", "--grad-ckpt")
    else:
        fails("--cuda-graphs needs a CUDA GPU", "--cuda-graphs")
    with pytest.raises(UserError, match="--global-batch-size 8 is not divisible by the 3 ranks"):
        train.train(train.parse_args(TINY + ["--results-dir", str(tmp_path)]), rank=0, world=3, local_rank=0)
    with pytest.raises(UserError, match="does not exist"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "missing.pt")]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA")
def test_device_and_scan_are_checked_and_not_pinned_by_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU, without Triton's interpreter
    with pytest.raises(UserError, match="--scan triton needs a CUDA GPU and Triton .this is cpu."):
        run(tmp_path, "--max-steps", "1", "--scan", "triton")
    # a checkpoint trained with the Triton scan on a GPU samples here, with the default --scan auto
    ckpt = torch.load(run(tmp_path, "--max-steps", "1", "--sample-every", "100")["checkpoint"], weights_only=True)
    ckpt["args"]["scan"] = "triton"
    torch.save(ckpt, tmp_path / "gpu.pt")
    flags = ["--ckpt", str(tmp_path / "gpu.pt"), "--num-sampling-steps", "2", "--num-samples", "2",
             "--out", str(tmp_path / "grid.png")]
    assert sample.main(sample.parse_args(flags))["samples"].shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="--scan triton needs a CUDA GPU"):
        sample.main(sample.parse_args(flags + ["--scan", "triton"]))
    with pytest.raises(UserError, match="--device cuda: this machine has no CUDA GPU"):
        sample.main(sample.parse_args(flags + ["--device", "cuda"]))
    with pytest.raises(UserError, match="--cuda-graphs needs a CUDA GPU"):
        sample.main(sample.parse_args(flags + ["--cuda-graphs"]))
    with pytest.raises(UserError, match="--num-sampling-steps 2000: the model was trained on 1000 steps"):
        sample.main(sample.parse_args(flags + ["--num-sampling-steps", "2000"]))


def test_counts_must_be_positive(capsys):
    for flag in ("--log-every", "--ckpt-every", "--global-batch-size", "--max-steps", "--image-size", "--num-frames",
                 "--accum-steps", "--grid-samples", "--grid-steps", "--eval-every", "--eval-samples"):
        with pytest.raises(SystemExit):
            train.parse_args([flag, "0"])
        assert f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err
    for flag in ("--num-samples", "--num-sampling-steps"):
        with pytest.raises(SystemExit):
            sample.parse_args(["--ckpt", "x.pt", flag, "-1"])
        assert f"argument {flag}: must be a positive integer, got -1" in capsys.readouterr().err


def test_numbers_out_of_range_are_refused_before_any_work(capsys):
    """A negative --grad-clip once turned training into gradient ascent, --cfg-scale nan drew black images,
    and data.py extract --batch-size -2 wrote a cache of zeros marked complete."""
    for flags, message in [(["--grad-clip", "-1"], "must be a number >= 0"), (["--lr", "0"], "must be a number > 0"),
                           (["--num-workers", "-1"], "must be an integer >= 0"),
                           (["--ema-decay", "1.5"], "must be a number >= 0 and <= 1"),
                           (["--warmup-steps", "-3"], "must be an integer >= 0"), (["--lr", "nan"], "got nan"),
                           (["--weight-decay", "x"], "expected a number, got 'x'")]:
        with pytest.raises(SystemExit):
            train.parse_args(flags)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x.pt", "--cfg-scale", "nan"])
    assert "--cfg-scale: must be a number >= 0, got nan" in capsys.readouterr().err
    for flag in ("--batch-size", "--image-size", "--frame-interval"):
        with pytest.raises(SystemExit):
            data.main(["extract", "--dataset", "folder", "--data-path", "x", "--out", "y", flag, "0"])
        assert f"{flag}: must be a positive integer, got 0" in capsys.readouterr().err


def test_run_folders_are_numbered_past_999_claimed_once_and_named_by_what_resume_matches(tmp_path, monkeypatch):
    results = tmp_path / "results"
    os.makedirs(results / "999-DiM-Ti-8-shapes")
    os.makedirs(results / "1000-other")
    first = run(tmp_path, "--max-steps", "1", "--sample-every", "100")["run_dir"]
    assert os.path.basename(first) == "1001-DiM-Ti-8-shapes"
    # a run started at the same moment saw the same numbers: it takes the next free one, not the same folder
    monkeypatch.setattr(train, "numbered_runs", lambda folder, name=None: {1000: "x"})
    second = run(tmp_path, "--max-steps", "1", "--sample-every", "100")["run_dir"]
    assert os.path.basename(second) == "1002-DiM-Ti-8-shapes"
    monkeypatch.undo()
    attention = run(tmp_path, "--max-steps", "1", "--sample-every", "100", "--mixer", "attention")["run_dir"]
    assert os.path.basename(attention) == "1003-DiM-Ti-8-attention-shapes"
    os.makedirs(results / "1004-DiM-Ti-8-shapes" / "checkpoints")  # a run that saved nothing
    resumed = run(tmp_path, "--max-steps", "2", "--sample-every", "100", "--resume", "auto")
    assert resumed["run_dir"] == second and resumed["step"] == 2  # the newest of its name with a checkpoint


def test_sampling_checks_its_output_device_and_checkpoint_before_the_work(tmp_path, monkeypatch):
    ckpt = run(tmp_path, "--max-steps", "1", "--sample-every", "100")["checkpoint"]
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    for flags, message in [(["--out", str(tmp_path / "grid")], "name a file ending in .png"),
                           (["--out", str(tmp_path)], "name a file ending in .png"),
                           (["--device", "gpu"], "--device gpu: not a device torch knows"),
                           (["--num-fid-samples", "4", "--out", str(tmp_path / "s.png")], "ending in .npz")]:
        with pytest.raises(UserError, match=message):
            sample.main(sample.parse_args(["--ckpt", ckpt, *flags]))
    with pytest.raises(UserError, match="is a folder; pass a file"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path)]))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root may write anywhere)
    with pytest.raises(UserError, match="is not writable"):
        sample.main(sample.parse_args(["--ckpt", ckpt, "--out", str(tmp_path / "grid.png")]))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_one_sampling_step_works(sampler):
    samples = sample.generate(untrained_model(scan="parallel"), torch.tensor([0, 1]), sampler, 1, cfg_scale=2.0)
    assert samples.shape == (2, 3, 16, 16) and torch.isfinite(samples).all()


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    """--precision bf16 runs the whole step under autocast, the scan included (in fp32 inside)."""
    out = run(tmp_path, "--max-steps", "2", "--log-every", "1", "--precision", "bf16", "--scan", "parallel")
    assert out["step"] == 2 and all(math.isfinite(float(x)) for x in log_losses(out["run_dir"]))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = train.Diffusion.training_losses
    calls = []

    def poisoned(self, model_fn, x0, t, noise=None):
        calls.append(1)
        losses = real(self, model_fn, x0, t, noise)
        if len(calls) == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train.Diffusion, "training_losses", poisoned)
    with pytest.raises(UserError, match=r"the loss is nan at step 3.*intact: .*0000002\.pt"):
        run(tmp_path, "--max-steps", "5", "--ckpt-every", "2", "--sample-every", "100")
    path = tmp_path / "results" / "000-DiM-Ti-8-shapes" / "checkpoints" / "0000002.pt"
    assert sample.load_checkpoint(str(path))["step"] == 2
    assert os.listdir(path.parent) == ["0000002.pt"]
    with open(path.parent.parent / "log.txt") as f:
        assert f.read().splitlines()[-1].startswith("stopped: the loss is nan at step 3")  # the log says why


def test_shapes_judge_is_right_on_real_images():
    images = ShapesDataset(size=2000, image_size=32, seed=1)
    assert (judge(images.images) == images.labels).float().mean() >= 0.99
    clips = ShapesDataset(size=100, image_size=32, num_frames=6, seed=2)
    assert (judge(clips.images) == clips.labels).float().mean() >= 0.99
    assert (judge(torch.full((2, 3, 16, 16), -1.0)) == -1).all()  # nothing drawn, no class


def test_shapes_are_deterministic():
    a, b = ShapesDataset(size=20, seed=5), ShapesDataset(size=20, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, ShapesDataset(size=20, seed=6).images)
    assert len(data.SHAPE_CLASSES) == 9


class HostTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that pass values between the host and the device: reading one back (item, int,
    bool) and copying a host tensor over. On a GPU each waits for the kernels queued before it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        from_host = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
        if func is torch.ops.aten._local_scalar_dense.default or (
                from_host and isinstance(out, torch.Tensor) and out.device.type != "cpu"):
            self.ops.append(str(func))
        return out


def tiny_model_on_a_device():
    """A tiny DiM on the GPU, or on the meta device, which stands in for one on the CPU. On meta the
    scan is the loop: the parallel scan turns autocast off, which meta has no autocast for."""
    device = "cuda" if torch.cuda.is_available() else "meta"
    return tiny_model(device, "auto" if device == "cuda" else "ref"), device


def test_a_training_step_never_waits_for_the_device():
    """The forward, the hybrid loss, the backward, clipping and the EMA neither read values back nor
    copy from the host, so the host can queue the next step while the GPU runs this one. The step runs
    on the meta device, which stands in for the GPU (on a GPU it runs there, with CUDA's own check)."""
    model, device = tiny_model_on_a_device()
    ema = copy.deepcopy(model)
    diffusion = Diffusion().to(device)
    x, y = torch.randn(2, 3, 16, 16, device=device), torch.tensor([0, 4], device=device)  # 4: the null class
    t = torch.tensor([0, 999], device=device)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with HostTraffic() as traffic:
            loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x, t)["loss"].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            train.update_ema(ema, model, 0.99)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert traffic.ops == []
    assert loss.shape == () and all(p.grad is not None for p in model.parameters())


def test_sampling_never_waits_for_the_device():
    """Each sampling step, with guidance, neither reads values back nor copies from the host (on meta)."""
    model, device = tiny_model_on_a_device()
    model.eval()
    diffusion = Diffusion().respaced(3).to(device)
    labels, noise = torch.tensor([0, 3], device=device), torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad(), HostTraffic() as traffic:
        for run in (diffusion.ddim_sample, diffusion.ddpm_sample):
            samples = run(guided(model, labels, 4.0, null_class=4), noise, clip_x0=True)
    assert traffic.ops == [] and samples.shape == noise.shape
