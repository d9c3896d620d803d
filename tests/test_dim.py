"""The DiM model: shapes, adaLN-Zero, bidirectionality, DiT's size and cost, learning."""

import pytest
import torch
import torch.nn.functional as F

import scan
from dim import BiMamba, DiMConfig, DiM, build_model
from scan import selective_scan_ref


def tiny(**overrides):
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    return DiM(DiMConfig(**{**cfg, **overrides}))


def randomize(model):
    """Give the zero-initialised layers weights, so outputs depend on inputs."""
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("mixer", ["mamba", "attention"])
def test_output_shapes_images_and_videos(mixer):
    t, y = torch.tensor([1, 500]), torch.tensor([0, 4])
    images = tiny(mixer=mixer)(torch.randn(2, 3, 8, 8), t, y)
    assert images.shape == (2, 6, 8, 8)
    videos = tiny(mixer=mixer, num_frames=3)(torch.randn(2, 3, 3, 8, 8), t, y)
    assert videos.shape == (2, 3, 6, 8, 8)
    assert tiny(mixer=mixer, learn_sigma=False)(torch.randn(2, 3, 8, 8), t, y).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("mixer", ["mamba", "attention"])
def test_adaln_zero_starts_at_identity(mixer):
    model = tiny(mixer=mixer)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 5]))
    assert torch.equal(out, torch.zeros_like(out))
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


def test_bidirectional_mixer_sees_both_ways():
    torch.manual_seed(0)
    mixer = BiMamba(16, d_state=4)
    x = torch.randn(1, 12, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(mixer(x)[0, 0].sum(), x)
    assert grad[0, -1].abs().sum() > 1e-6           # the first output depends on the last input
    (grad,) = torch.autograd.grad(mixer(x, backward_branch=False)[0, 0].sum(), x)
    assert torch.equal(grad[0, 1:], torch.zeros_like(grad[0, 1:]))  # causal alone: only on the past
    (grad,) = torch.autograd.grad(mixer(x, backward_branch=False)[0, -1].sum(), x)
    assert grad[0, 0].abs().sum() > 1e-6


def plain_mixer(mixer, x):
    """The bidirectional mixer written plainly, token by token as Vim writes it: transposes, a padded
    conv1d, nn.Linear layers, and the backward branch as the forward one on flipped sequences."""
    x, z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)                # (N, E, L)
    ys = []
    for branch, flip in ((mixer.forward_branch, False), (mixer.backward_branch, True)):
        h, g = (x.flip(-1), z.flip(-1)) if flip else (x, z)
        k = branch.conv1d.kernel_size[0]
        h = F.silu(F.conv1d(F.pad(h, (k - 1, 0)), branch.conv1d.weight, branch.conv1d.bias, groups=h.shape[1]))
        dt, B, C = branch.x_proj(h.transpose(1, 2)).split([branch.dt_rank, branch.d_state, branch.d_state], dim=-1)
        delta = branch.dt_proj(dt).transpose(1, 2)                          # the bias added here
        y = selective_scan_ref(h, delta, -torch.exp(branch.A_log), B.transpose(1, 2), C.transpose(1, 2), branch.D,
                               g, delta_softplus=True)
        ys.append(y.flip(-1) if flip else y)
    return mixer.out_proj(((ys[0] + ys[1]) / 2).transpose(1, 2))


@pytest.mark.parametrize("backend", ["parallel", "triton"])
def test_mixer_computes_what_the_plain_mixer_does(backend):
    # BiMamba keeps its tensors channel-major to avoid copies; it must still be Vim's mixer.
    if backend == "triton" and scan.triton is None:
        pytest.skip("Triton is not installed (it comes with CUDA builds of torch)")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton in its interpreter
    torch.manual_seed(0)
    mixer = BiMamba(16, d_state=4, backend=backend).to(device)
    with torch.no_grad():
        for branch in (mixer.forward_branch, mixer.backward_branch):
            branch.conv1d.weight.normal_()  # an asymmetric kernel
    x = torch.randn(3, 11, 16, device=device, requires_grad=True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the two convolutions in full fp32
        y, y_plain = mixer(x), plain_mixer(mixer, x)
        torch.testing.assert_close(y, y_plain, rtol=1e-4, atol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), [x, *mixer.parameters()])
        grads_plain = torch.autograd.grad(y_plain.square().sum(), [x, *mixer.parameters()])
    for (name, _), a, b in zip([("x", x), *mixer.named_parameters()], grads, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_reverse_branch_is_forward_branch_on_flipped_sequence():
    torch.manual_seed(0)
    branch = BiMamba(16, d_state=4).backward_branch
    with torch.no_grad():
        branch.conv1d.weight.normal_()  # make the kernel asymmetric
    x, z = torch.randn(2, 32, 10), torch.randn(2, 32, 10)
    reverse = branch(x, z, reverse=True, backend="parallel")
    flipped = branch(x.flip(-1), z.flip(-1), reverse=False, backend="parallel").flip(-1)
    torch.testing.assert_close(reverse, flipped, rtol=1e-5, atol=1e-5)


def test_video_frames_come_back_in_place():
    # Without blocks every token is computed on its own: changing frame 1 must change frame 1 only,
    # and the temporal embedding must make identical frames come out different.
    model = randomize(tiny(num_frames=2, depth=0)).eval()  # eval: no label dropout
    x, t, y = torch.randn(1, 2, 3, 8, 8), torch.tensor([10]), torch.tensor([0])
    changed = x.clone()
    changed[:, 1] += 1
    with torch.no_grad():
        out, out_changed = model(x, t, y), model(changed, t, y)
        same = model(x[:, :1].repeat(1, 2, 1, 1, 1), t, y)
    assert torch.equal(out[:, 0], out_changed[:, 0]) and not torch.allclose(out[:, 1], out_changed[:, 1])
    assert not torch.allclose(same[:, 0], same[:, 1])


def test_dit_xl2_size_and_gmacs():
    with torch.device("meta"):
        model = build_model("DiM-XL/2", mixer="attention", input_size=32, in_channels=4, num_classes=1000)
    assert abs(model.num_params() / 675.13e6 - 1) < 0.005
    assert abs(model.gmacs() / 118.6 - 1) < 0.02
    with torch.device("meta"):
        dim_model = build_model("DiM-XL/2", input_size=32)
    assert dim_model.gmacs() > model.gmacs()  # at 256 tokens the mixer's projections cost more


def test_model_errors_are_clear():
    with pytest.raises(ValueError, match="image size 30 is not divisible by the patch size 4"):
        build_model("DiM-Ti/4", input_size=30)
    with pytest.raises(ValueError, match="built for 3 frames, got 2"):
        tiny(num_frames=3)(torch.randn(1, 2, 3, 8, 8), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 5\]"):
        tiny()(torch.randn(1, 3, 8, 8), torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError, match="built for 3 x 8 x 8 inputs"):
        tiny()(torch.randn(1, 3, 16, 16), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("DiM-XXL/2")


def test_weight_decay_skips_A_log_and_D():
    model = tiny()
    decay, no_decay = model.optimizer_groups(0.1)
    skipped = {id(p) for p in no_decay["params"]}
    branch = model.blocks[0].mixer.forward_branch
    assert id(branch.A_log) in skipped and id(branch.D) in skipped
    assert id(branch.x_proj.weight) not in skipped
    assert torch.allclose(-torch.exp(branch.A_log[0]), -torch.arange(1.0, 17.0))
    dt = F.softplus(branch.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("mixer", ["mamba", "attention"])
def test_tiny_model_overfits_one_batch(mixer):
    torch.manual_seed(0)
    model = tiny(mixer=mixer, learn_sigma=False, class_dropout_prob=0.0)
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 3])
    target = torch.randn(4, 3, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = F.mse_loss(model(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


@pytest.mark.parametrize("backend", ["parallel", "triton"])
def test_compiled_model_is_one_graph_and_computes_what_eager_does(backend, monkeypatch):
    """torch.compile sees each scan as one registered operator: the whole DiM (with label dropout, a
    video's frames, both scan directions) compiles with fullgraph=True, which fails at any graph
    break, and gives eager's outputs and gradients. aot_eager runs the traced graphs without Inductor's
    code generation (that is tests/test_small_gpu.py's), so it needs no C++ compiler and is exact."""
    if backend == "triton" and scan.triton is None:
        pytest.skip("Triton is not installed (it comes with CUDA builds of torch)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # Triton's interpreter pays for every program: one program for all 64 channels
        monkeypatch.setattr(scan, "TRITON_BLOCK_D", 64)
        monkeypatch.setattr(scan, "TRITON_FORWARD_BLOCK_D", 64)
    torch.manual_seed(0)
    model = randomize(tiny(num_frames=2, scan_backend=backend)).to(device)
    x = torch.randn(3, 2, 3, 8, 8, device=device)
    t, y = torch.tensor([1, 500, 999], device=device), torch.tensor([0, 4, 2], device=device)
    torch._dynamo.reset()
    results = []
    for net in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(1)  # the same labels dropped
        out = net(x, t, y)
        results.append((out, torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    (out, grads), (out_compiled, grads_compiled) = results
    torch.testing.assert_close(out_compiled, out, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), grads_compiled, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")
