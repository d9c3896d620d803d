"""What the scripts promise under bad input and faults: a one-line error before any work where the input
is wrong, and nothing lost where the machine fails (a grid, a full disk, Ctrl-C, a corrupt file)."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
import train
from data import UserError

BASE = ["--model", "DiM-Ti/8", "--image-size", "16", "--no-progress"]


def run(tmp_path, *flags, results="results"):
    return train.main(train.parse_args(BASE + ["--global-batch-size", "8", "--results-dir", str(tmp_path / results),
                                               *flags]))


def log_lines(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return f.read().splitlines()


def image_folder(root, classes=("cats", "dogs"), per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(root / name)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


#################################################################################
#                        Training: nothing lost, the log says why               #
#################################################################################

def test_a_failing_sample_grid_is_logged_and_costs_no_checkpoint(tmp_path, monkeypatch):
    def broken(*args):
        raise UserError("could not load the VAE 'gone/'")

    monkeypatch.setattr(train, "sample_grid", broken)
    out = run(tmp_path, "--max-steps", "4", "--ckpt-every", "2", "--sample-every", "2")
    assert out["step"] == 4 and sorted(os.listdir(os.path.join(out["run_dir"], "checkpoints"))) == \
        ["0000002.pt", "0000004.pt"]
    assert sum("no sample grid: UserError: could not load the VAE" in line for line in log_lines(out["run_dir"])) == 2


def test_ctrl_c_saves_the_last_whole_step_and_resume_carries_on_exactly(tmp_path, monkeypatch):
    flags = ["--lr-schedule", "constant", "--log-every", "1", "--ckpt-every", "100", "--sample-every", "100"]
    whole = run(tmp_path / "a", *flags, "--max-steps", "5")
    real_update, calls = train.update_ema, []
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started with &

    def interrupted_in_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still ends whole
        return real_update(*args)

    monkeypatch.setattr(train, "update_ema", interrupted_in_step_3)
    with pytest.raises(UserError, match="interrupted at step 3.*0000003.pt.*--resume"):
        run(tmp_path / "b", *flags, "--max-steps", "5")
    monkeypatch.setattr(train, "update_ema", real_update)
    assert signal.getsignal(signal.SIGINT) is handler  # the handler there was is put back
    run_dir = tmp_path / "b" / "results" / "000-DiM-Ti-8-shapes"
    assert log_lines(run_dir)[-1].startswith("stopped: interrupted at step 3")
    resumed = run(tmp_path / "b", *flags, "--max-steps", "5", "--resume", str(run_dir))
    for a, b in zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)


def test_ctrl_c_outside_a_step_is_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        data.run_script(interrupted)
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "update_ema", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path, "--max-steps", "3")
    assert os.listdir(tmp_path / "results") == []


def test_out_of_memory_is_one_line_that_says_what_fits_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real_update = train.update_ema

    def out_of_memory_at(failing_step):
        steps = []

        def update(*args):
            steps.append(1)
            if len(steps) == failing_step:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 MiB.")
            real_update(*args)
        return update

    monkeypatch.setattr(train, "update_ema", out_of_memory_at(3))
    with pytest.raises(UserError) as error:
        run(tmp_path, "--max-steps", "5", "--ckpt-every", "2", "--sample-every", "0")
    run_dir = str(tmp_path / "results" / os.listdir(tmp_path / "results")[0])
    checkpoint = os.path.join(run_dir, "checkpoints", "0000002.pt")
    assert str(error.value) == (
        "a training step of 8 samples a rank (DiM-Ti/8, 16 px) does not fit in memory. Each of these needs less: "
        "--accum-steps 2, 4, 8 (micro-batches of 4, 2, 1); --grad-ckpt; a smaller --global-batch-size, --image-size "
        f"or --num-frames. The last checkpoint is intact: {checkpoint}")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no CUDA traceback under it
    assert log_lines(run_dir)[-1] == f"stopped: {error.value}"
    assert torch.load(checkpoint, weights_only=True)["step"] == 2

    out_of_memory = torch.OutOfMemoryError("CUDA out of memory.")  # before the first step, as CUDA graphs record
    monkeypatch.setattr(train, "batches", lambda *args: (_ for _ in ()).throw(out_of_memory))
    with pytest.raises(UserError, match=r"step of 12 samples .* less: --accum-steps 4, 6, 8, ... \(micro-batches of "
                                        r"6, 4, 3, ...\); a smaller --global-batch-size, --image-size or --num-frames\.$"):
        run(tmp_path, "--max-steps", "5", "--global-batch-size", "24", "--accum-steps", "2", "--grad-ckpt",
            results="first")
    assert os.listdir(tmp_path / "first") == []


def test_a_full_disk_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if str(path).endswith(".pt.tmp") and "0000004" in str(path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"could not write the checkpoint .*0000004.pt \(disk full\); the earlier"):
        run(tmp_path, "--max-steps", "4", "--ckpt-every", "2", "--sample-every", "100")
    assert os.listdir(tmp_path / "results" / "000-DiM-Ti-8-shapes" / "checkpoints") == ["0000002.pt"]


def test_an_unwritable_results_folder_is_an_error_before_the_work(tmp_path, monkeypatch):
    real = os.makedirs

    def refused(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refused)
    with pytest.raises(UserError, match="--results-dir .*locked: cannot write there .Permission denied"):
        run(tmp_path, "--max-steps", "1", results="locked")


#################################################################################
#                              Resume: the same run, or say why                 #
#################################################################################

def test_resume_takes_the_runs_own_flags_and_says_what_changed(tmp_path):
    results = ["--results-dir", str(tmp_path / "results")]
    first = train.main(train.parse_args(BASE + results + ["--global-batch-size", "4", "--lr", "1e-3", "--max-steps", "2",
                                                          "--sample-every", "100"]))
    resumed = train.main(train.parse_args(BASE + results + ["--max-steps", "4", "--resume", "auto"]))
    ckpt = sample.load_checkpoint(resumed["checkpoint"])
    assert resumed["run_dir"] == first["run_dir"]
    assert (ckpt["args"]["global_batch_size"], ckpt["args"]["lr"], ckpt["args"]["sample_every"]) == (4, 1e-3, 100)
    train.main(train.parse_args(BASE + results + ["--max-steps", "5", "--lr", "2e-3", "--resume", "auto"]))
    assert "changed from the run: --lr 0.002 (the run had 0.001), --max-steps 5 (the run had 4)" in \
        log_lines(first["run_dir"])[-4]
    with pytest.raises(UserError, match="is at step 5, and --max-steps is 3: nothing to train"):
        train.main(train.parse_args(BASE + results + ["--max-steps", "3", "--resume", "auto"]))


def test_resume_from_a_checkpoint_outside_its_run_folder_starts_a_new_run(tmp_path):
    ckpt = run(tmp_path, "--max-steps", "1", "--sample-every", "100")["checkpoint"]
    os.makedirs(tmp_path / "downloads")
    shutil.copy(ckpt, tmp_path / "downloads" / "model.pt")
    out = run(tmp_path, "--max-steps", "2", "--sample-every", "100", "--resume", str(tmp_path / "downloads" / "model.pt"),
              results="elsewhere")
    assert os.path.dirname(out["run_dir"]) == str(tmp_path / "elsewhere") and out["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["downloads", "elsewhere", "results"]  # nothing beside downloads/
    assert os.listdir(tmp_path / "downloads") == ["model.pt"]
    assert "from " + str(tmp_path / "downloads" / "model.pt") in log_lines(out["run_dir"])[0]


def test_resume_on_other_data_says_what_differs(tmp_path):
    first, other = image_folder(tmp_path / "a"), image_folder(tmp_path / "b", seed=1)
    more = image_folder(tmp_path / "c", classes=("cats", "dogs", "owls"))
    flags = ["--dataset", "folder", "--max-steps", "1", "--sample-every", "100"]
    ckpt = run(tmp_path, *flags, "--data-path", first)["checkpoint"]
    flags[flags.index("--max-steps") + 1] = "2"
    with pytest.raises(UserError, match=f"the data differs from the run's .source: {first} then, {other} now"):
        run(tmp_path, *flags, "--data-path", other, "--resume", ckpt)
    with pytest.raises(UserError, match="items: 10 then, 15 now, num_classes: 2 then, 3 now"):
        run(tmp_path, *flags, "--data-path", more, "--resume", ckpt)


def test_damaged_checkpoints_are_one_line_errors(tmp_path):
    good = sample.load_checkpoint(run(tmp_path, "--max-steps", "1", "--sample-every", "100")["checkpoint"])
    cases = {"no_info": {k: v for k, v in good.items() if k != "data_info"},
             "no_model_arg": dict(good, args={k: v for k, v in good["args"].items() if k != "model"}),
             "missing_weight": dict(good, ema={k: v for i, (k, v) in enumerate(good["ema"].items()) if i}),
             "other_shape": dict(good, **{k: {n: v[..., :1] if v.dim() else v for n, v in good[k].items()}
                                          for k in ("model", "ema")})}
    messages = {"no_info": "not a DiM checkpoint of train.py .missing: data_info",
                "no_model_arg": "args / data_info lack model",
                "missing_weight": "the model weights of .* do not fit",
                "other_shape": "the model weights of .* do not fit"}
    for name, ckpt in cases.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        flags = ["--ckpt", str(tmp_path / f"{name}.pt"), "--num-samples", "1", "--num-sampling-steps", "1"]
        with pytest.raises(UserError, match=messages[name]):
            sample.main(sample.parse_args(flags))
    with pytest.raises(UserError, match="the model weights of .* do not fit"):
        run(tmp_path, "--max-steps", "3", "--resume", str(tmp_path / "other_shape.pt"))


#################################################################################
#                           Data: corrupt files are skipped                     #
#################################################################################

def test_corrupt_and_empty_images_are_skipped_and_counted(tmp_path):
    root = image_folder(tmp_path / "images")
    (tmp_path / "images" / "cats" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    dataset, info = data.make_dataset("folder", root, 16)
    items = [dataset[i] for i in range(len(dataset))] + [dataset[i] for i in range(len(dataset))]
    assert len(dataset) == 12 and dataset.skipped.count() == 2 and all(x.shape == (3, 16, 16) for x, _ in items)
    out = run(tmp_path, "--dataset", "folder", "--data-path", root, "--max-steps", "3", "--log-every", "3",
              "--sample-every", "100", "--global-batch-size", "4")
    assert out["step"] == 3 and "(2 unreadable images skipped so far, the first " in log_lines(out["run_dir"])[1]


def test_skipped_items_count_once_each_however_often_they_are_met():
    skipped, attempts = data.Skipped(6, "video"), []

    def read(j):
        attempts.append(j)
        if j in (1, 2):
            raise OSError("bad file")
        return j

    assert [skipped.first_readable(i, read, list("abcdef"), (OSError,))[1] for i in range(6)] * 2 == [0, 3, 3, 3, 4, 5] * 2
    assert skipped.count() == 2 and attempts.count(1) == 1 and attempts.count(2) == 1
    with pytest.raises(UserError, match="no video of the data set could be read"):
        data.Skipped(2, "video").first_readable(0, lambda j: read(1), ["x", "y"], (OSError,))


def test_sixteen_bit_images_use_their_whole_range(tmp_path):
    os.makedirs(tmp_path / "deep" / "scans")
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "deep" / "scans" / "ramp.png")
    assert Image.open(tmp_path / "deep" / "scans" / "ramp.png").mode.startswith("I")
    x, _ = data.make_dataset("folder", str(tmp_path / "deep"), 16)[0][0]
    assert x.min() < -0.95 and x.max() > 0.95  # not 238-255, as PIL's own convert("RGB") makes them


def test_errors_in_loader_workers_are_one_line():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise UserError("no video of the data set could be read")

    with pytest.raises(UserError) as error:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert str(error.value) == "no video of the data set could be read"


def test_damaged_latent_caches_are_one_line_errors(tmp_path):
    cache = tmp_path / "cache"
    os.makedirs(cache)
    meta = dict(dataset="imagenet", image_size=16, latent_size=2, vae="ema", class_names=["a", "b"], complete=True,
                frame_interval=1)
    (cache / "meta.json").write_text(json.dumps(meta))
    np.save(cache / "latents.npy", np.zeros((4, 2, 4, 2, 2), dtype=np.float16))
    np.save(cache / "index.npy", np.stack([np.arange(4), np.ones(4, dtype=np.int64)], axis=1))
    np.save(cache / "labels.npy", np.array([0, 1, 0, 1]))
    assert len(data.make_dataset("imagenet", str(cache))[0]) == 4
    with open(cache / "latents.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(UserError, match="the latent cache .* is damaged"):
        data.make_dataset("imagenet", str(cache))
    os.remove(cache / "latents.npy")
    with pytest.raises(UserError, match="the latent cache .* is damaged"):
        data.make_dataset("imagenet", str(cache))
    (cache / "meta.json").write_text(json.dumps(meta)[:20])
    with pytest.raises(UserError, match="meta.json is unreadable"):
        data.make_dataset("imagenet", str(cache))


def test_extract_refuses_a_file_as_its_cache_folder(tmp_path):
    root = image_folder(tmp_path / "images")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--out .*notes.txt is a file"):
        data.extract("folder", root, str(tmp_path / "notes.txt"), 16, "ema", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_hub_vae_without_a_network_fails_at_once(monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    monkeypatch.setattr(data.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    data.load_vae.cache_clear()
    start = time.time()
    with pytest.raises(UserError, match="not in the local cache and huggingface.co cannot be reached"):
        data.load_vae("ema")
    assert time.time() - start < 10
