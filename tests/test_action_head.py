import json
import os
import time

import numpy as np
import pytest
import torch

import model
from model import ActionHead, VLA

F_DIM, S_DIM, H, D = 16, 8, 8, 7


def make_head(**kw):
    torch.manual_seed(0)
    cfg = dict(feature_dim=F_DIM, action_dim=D, state_dim=S_DIM, horizon=H, width=32, depth=4, heads=4,
               num_future_tokens=4, num_vl_self_attn_layers=1)
    cfg.update(kw)
    return ActionHead(**cfg)


def make_batch(B=3, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, L, F_DIM, generator=g)
    fmask = torch.ones(B, L, dtype=torch.bool)
    fmask[0, -2:] = False  # padded VL tokens
    state = torch.randn(B, S_DIM, generator=g)
    actions = torch.rand(B, H, D, generator=g) * 2 - 1
    amask = torch.ones(B, H, dtype=torch.bool)
    amask[1, -3:] = False  # padded steps past the episode end
    return feats, fmask, state, actions, amask


NO_SELF_ATTENTION = dict(self_attention=False, num_future_tokens=0)  # train_vla's tiny default


@pytest.mark.parametrize("kw", [{}, NO_SELF_ATTENTION], ids=["gr00t", "no_self_attention"])
def test_shapes_dtypes_and_config_rebuild(kw):
    head = make_head(**kw)
    feats, fmask, state, actions, amask = make_batch()
    v = head(feats, fmask, state, actions, torch.tensor([0.0, 0.5, 0.9]))
    assert v.shape == (3, H, D) and v.dtype == torch.float32
    loss = head.loss(feats, fmask, state, actions, amask)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in head.named_parameters()), "every parameter takes part"
    out = head.sample(feats, fmask, state, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, H, D) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # config rebuilds the same architecture; same weights -> same samples for the same generator
    rebuilt = ActionHead(**json.loads(json.dumps(head.config)))
    rebuilt.load_state_dict(head.state_dict())
    out2 = rebuilt.sample(feats, fmask, state, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out2)
    # bf16: autocast (training on GPU) and a bf16-cast head with bf16 features (the backbone's dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l_bf16 = head.loss(feats, fmask, state, actions, amask)
    assert torch.isfinite(l_bf16) and l_bf16.dtype == torch.float32
    head_bf16 = make_head(**kw).to(torch.bfloat16)
    out_bf16 = head_bf16.sample(feats.bfloat16(), fmask, state, generator=torch.Generator().manual_seed(0))
    assert out_bf16.shape == (3, H, D) and torch.isfinite(out_bf16).all()


def test_input_errors_are_clear():
    head = make_head()
    feats, fmask, state, actions, amask = make_batch()
    with pytest.raises(ValueError, match="state has 9 dims, the head expects state_dim=8"):
        head.loss(feats, fmask, torch.zeros(3, 9), actions, amask)
    with pytest.raises(ValueError, match="feature_dim=16"):
        head.sample(torch.zeros(3, 5, 12), fmask, state)
    with pytest.raises(ValueError, match=r"actions must be \[B, horizon, action_dim\]"):
        head.loss(feats, fmask, state, actions[:, :4], amask)
    with pytest.raises(ValueError, match="feature_mask must be"):
        head.loss(feats, fmask[:, :3], state, actions, amask)
    with pytest.raises(ValueError, match="no valid feature"):
        head.loss(feats, torch.zeros_like(fmask), state, actions, amask)
    with pytest.raises(ValueError, match="divisible"):
        ActionHead(F_DIM, width=30, heads=4)
    with pytest.raises(ValueError, match="num_future_tokens=4 needs self_attention=True"):
        make_head(self_attention=False)


def test_without_self_attention_each_step_sees_only_its_own_noisy_action():
    """self_attention=False: no action token attends to another, so changing step k's noisy action changes the
    velocity at step k only; the state still reaches every step. With GR00T's blocks every step changes."""
    feats, fmask, state, actions, amask = make_batch()
    t = torch.tensor([0.2, 0.5, 0.8])
    x2 = actions.clone()
    x2[:, 3] += 1.0
    for kw, only_step_3 in ((NO_SELF_ATTENTION, True), ({}, False)):
        head = make_head(**kw)
        with torch.no_grad():
            changed = (head(feats, fmask, state, x2, t) - head(feats, fmask, state, actions, t)).abs().amax(dim=(0, 2)) > 1e-6
            state_changed = (head(feats, fmask, state + 1.0, actions, t) - head(feats, fmask, state, actions, t)).abs().amax(dim=(0, 2)) > 1e-6
        assert changed.tolist() == ([h == 3 for h in range(H)] if only_step_3 else [True] * H), kw
        assert state_changed.all(), kw


def test_loss_equals_hand_computation_for_fixed_noise_and_t():
    head = make_head()
    feats, fmask, state, actions, amask = make_batch()
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.1, 0.5, 0.95])
    loss = head.loss(feats, fmask, state, actions, amask, noise=noise, t=t)
    # GR00T convention: t=0 noise, t=1 data; x_t = t a + (1-t) n; target velocity a - n
    x_t = t[:, None, None] * actions + (1 - t[:, None, None]) * noise
    pred = head(feats, fmask, state, x_t, t, amask)
    sq = (pred - (actions - noise)) ** 2
    n_valid = amask.sum().item() * D  # 3*8 - 3 = 21 valid steps, 7 dims each
    assert n_valid == 21 * 7
    hand = sum(sq[b, h, d].item() for b in range(3) for h in range(H) for d in range(D) if amask[b, h]) / n_valid
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    # the opposite (pi0) convention gives a different number: the test can tell them apart
    x_pi0 = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    pred_pi0 = head(feats, fmask, state, x_pi0, t, amask)
    wrong = (((pred_pi0 - (noise - actions)) ** 2) * amask[:, :, None]).sum().item() / n_valid
    assert abs(wrong - hand) > 1e-3


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """train_vla's gradient_checkpointing recomputes each DiT block in backward: same numbers (dropout included:
    torch.utils.checkpoint replays the RNG state)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        head = make_head(dropout=0.2)
        head.gradient_checkpointing = checkpointing
        feats, fmask, state, actions, amask = make_batch()
        loss = head.loss(feats, fmask, state, actions, amask, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in head.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kw", [{}, NO_SELF_ATTENTION], ids=["gr00t", "no_self_attention"])
def test_masked_steps_and_padded_features_do_not_change_the_loss(kw):
    head = make_head(**kw)
    feats, fmask, state, actions, amask = make_batch()
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.3, 0.6, 0.2])
    base = head.loss(feats, fmask, state, actions, amask, noise=noise, t=t)
    a2, n2 = actions.clone(), noise.clone()
    a2[1, -3:] += 7.0  # masked steps of sample 1: both their value and their noise
    n2[1, -3:] -= 3.0
    assert torch.equal(head.loss(feats, fmask, state, a2, amask, noise=n2, t=t), base)
    a3 = actions.clone()
    a3[1, 0] += 1.0  # a valid step does matter
    assert not torch.allclose(head.loss(feats, fmask, state, a3, amask, noise=noise, t=t), base)
    f2 = feats.clone()
    f2[0, -2:] += 10 * torch.randn(2, F_DIM)  # padded VL tokens of sample 0 (feature_mask False)
    assert torch.allclose(head.loss(f2, fmask, state, actions, amask, noise=noise, t=t), base, atol=1e-6)
    f3 = feats.clone()
    f3[0, 0] += torch.randn(F_DIM)  # a valid VL token does matter (not a constant: LayerNorm removes it)
    assert not torch.allclose(head.loss(f3, fmask, state, actions, amask, noise=noise, t=t), base)


def test_flow_time_distribution():
    t = model.sample_flow_time(100_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 0.999
    # s ~ Beta(1.5, 1): E[s] = 1.5 / 2.5 = 0.6 -> E[t] = 0.999 * 0.4 = 0.3996; std(t) ~ 0.26, SE ~ 0.0008
    assert t.mean().item() == pytest.approx(0.3996, abs=0.004)
    # CDF: P(t < 0.999 * 0.5) = P(s > 0.5) = 1 - 0.5 ** 1.5 = 0.6464
    assert (t < 0.4995).float().mean().item() == pytest.approx(1 - 0.5 ** 1.5, abs=0.005)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_euler_sampling_matches_closed_form_with_stub_velocity(num_steps):
    head = make_head()
    feats, fmask, state, _, _ = make_batch()
    calls = []

    def stub_velocity(context, x, t, action_mask=None):  # v(x, t) = x + t
        calls.append(t.clone())
        return x + t[:, None, None]

    head.velocity = stub_velocity
    out = head.sample(feats, fmask, state, num_steps=num_steps, generator=torch.Generator().manual_seed(3))
    x0 = torch.randn((3, H, D), generator=torch.Generator().manual_seed(3))
    # Euler x_{k+1} = (1 + dt) x_k + t_k dt, t_k = k dt, from t=0 (noise) to t=1:
    # x_N = (1 + dt)^N x_0 + sum_k t_k dt (1 + dt)^(N-1-k)
    dt = 1.0 / num_steps
    expected = (1 + dt) ** num_steps * x0 + sum(k * dt * dt * (1 + dt) ** (num_steps - 1 - k) for k in range(num_steps))
    assert torch.allclose(out, expected, atol=1e-5)
    assert [c[0].item() for c in calls] == pytest.approx([k * dt for k in range(num_steps)])


def test_acceptance_overfit_64_chunks():
    """Training on 64 fixed chunks drives the loss down >= 10x and sample() reproduces them (MAE < 0.1)."""
    torch.manual_seed(0)
    B, L, F = 64, 6, 32
    feats = torch.randn(B, L, F)
    fmask = torch.ones(B, L, dtype=torch.bool)
    fmask[:, -2:] = torch.rand(B, 2) > 0.5
    state = torch.randn(B, S_DIM)
    actions = torch.rand(B, H, D) * 2 - 1
    amask = torch.ones(B, H, dtype=torch.bool)
    head = ActionHead(F, D, S_DIM, H, width=64, depth=4, heads=4, num_future_tokens=4)
    steps, lr = 300, 3e-3
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)

    def eval_loss():  # fixed noise / t draws, so the two numbers are comparable
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(head.loss(feats, fmask, state, actions, amask, generator=g).item() for _ in range(4)) / 4

    loss_start, t0 = eval_loss(), time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)  # linear decay to 0
        loss = head.loss(feats, fmask, state, actions, amask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_time = time.time() - t0
    loss_end = eval_loss()
    pred = head.sample(feats, fmask, state, num_steps=4, generator=torch.Generator().manual_seed(0))
    mae = (pred - actions).abs().mean().item()
    print(f"loss {loss_start:.4f} -> {loss_end:.4f} (x{loss_start / loss_end:.1f}), sample MAE {mae:.4f}, "
          f"{steps} steps in {train_time:.1f} s")
    assert loss_start / loss_end >= 10
    assert mae < 0.1


# --- VLA with the tiny backbone ----------------------------------------------------------------------

@pytest.fixture
def norm_stats_cls():
    from data import NormStats
    return NormStats


def robot_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    actions = np.concatenate([rng.uniform(-0.8, 0.8, (n, 3)), rng.uniform(-0.2, 0.2, (n, 3)),
                              rng.choice([-1.0, 1.0], (n, 1))], axis=1).astype(np.float32)
    states = np.concatenate([rng.uniform(-0.3, 0.5, (n, 6)), rng.uniform(0.0, 0.04, (n, 2))], axis=1).astype(np.float32)
    return actions, states


@pytest.fixture
def tiny_vla(tmp_path, norm_stats_cls):
    torch.manual_seed(0)
    backbone_dir = str(tmp_path / "sft")
    model.Backbone.tiny(seed=0).save_pretrained(backbone_dir)  # a stage checkpoint, as on disk
    backbone = model.Backbone.from_pretrained(backbone_dir)
    head = ActionHead(backbone.hidden_size, action_dim=7, state_dim=8, horizon=H, width=32, depth=2, heads=4,
                      num_future_tokens=4)
    actions, states = robot_data()
    vla = VLA(backbone, head, backbone.default_layer, norm_stats_cls.compute(actions, states), backbone_path=backbone_dir)
    return vla.eval()


def camera_images(seed=0, n=2):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(n)]


def test_vla_predict_action_in_robot_units(tiny_vla):
    vla, images = tiny_vla, camera_images()
    state = robot_data()[1][0]
    out = vla.predict_action(images, "pick up the red block", state, generator=torch.Generator().manual_seed(0))
    assert out.shape == (H, 7) and out.dtype == np.float32 and np.isfinite(out).all()  # latency: bench/vla_latency.py
    # robot units = unnormalize(head sample) for the same features, normalized state and noise
    feats, mask = vla.features([images], ["pick up the red block"])
    norm_state = torch.as_tensor(vla.norm_stats.normalize_state(state[None]))
    sample = vla.head.sample(feats, mask, norm_state, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out, vla.norm_stats.unnormalize_actions(sample.numpy())[0], rtol=1e-5, atol=1e-6)
    batch = vla.predict_action_batch([images, camera_images(1)], ["a", "b"], robot_data()[1][:2])
    assert batch.shape == (2, H, 7) and batch.dtype == np.float32
    assert (vla.action_dim, vla.state_dim, vla.horizon) == (7, 8, H)


def test_vla_frozen_backbone_gets_no_gradient_and_cached_features_match(tiny_vla):
    vla = tiny_vla.train()
    assert not vla.backbone.training, "a frozen backbone stays in eval mode"
    assert all(not p.requires_grad for p in vla.backbone.parameters())
    actions, states = robot_data()
    ns = vla.norm_stats
    batch = dict(images=[camera_images(0), camera_images(1)], instructions=["pick up the red block", "open the drawer"],
                 state=torch.as_tensor(ns.normalize_state(states[:2])),
                 actions=torch.as_tensor(ns.normalize_actions(actions[:16].reshape(2, H, 7))),
                 action_mask=torch.tensor([[True] * H, [True] * 5 + [False] * 3]))
    torch.manual_seed(1)
    loss = vla.loss(batch)
    loss.backward()
    assert all(p.grad is None for p in vla.backbone.parameters())
    assert all(p.grad is not None for p in vla.head.parameters())
    # train_vla.py caches backbone features: the same batch from cached features gives the same loss
    feats, mask = vla.features(batch["images"], batch["instructions"])
    cached = {k: v for k, v in batch.items() if k not in ("images", "instructions")}
    torch.manual_seed(1)
    assert vla.loss(dict(cached, features=feats, feature_mask=mask)).item() == pytest.approx(loss.item(), rel=1e-6)
    # an unfrozen backbone does receive gradient (so the check above can fail)
    unfrozen = VLA(vla.backbone, vla.head, vla.layer, ns, freeze_backbone=False).train()
    unfrozen.backbone.requires_grad_(True)
    unfrozen.loss(batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unfrozen.backbone.parameters())


def test_vla_save_load_round_trip(tiny_vla, tmp_path):
    vla, images, state = tiny_vla, camera_images(), robot_data()[1][3]
    out_dir = str(tmp_path / "vla")
    vla.save(out_dir)
    assert sorted(os.listdir(out_dir)) == ["action_head.safetensors", "norm_stats.json", "vla.json"]
    meta = json.load(open(os.path.join(out_dir, "vla.json")))
    assert meta["layer"] == vla.layer and meta["head"] == vla.head.config
    assert os.path.samefile(meta["backbone"], vla.backbone_path)  # a reference, not a copy
    loaded = VLA.load(out_dir).eval()
    g = lambda: torch.Generator().manual_seed(7)
    a = vla.predict_action(images, "put the bowl on the plate", state, generator=g())
    b = loaded.predict_action(images, "put the bowl on the plate", state, generator=g())
    np.testing.assert_array_equal(a, b)
    assert loaded.prompt_template == vla.prompt_template and loaded.layer == vla.layer


def test_head_dropout_in_training_mode_only():
    feats, fmask, state, actions, amask = make_batch()
    noise, t = torch.randn(3, H, D, generator=torch.Generator().manual_seed(1)), torch.full((3,), 0.3)
    plain, dropped = make_head(), make_head(dropout=0.2)
    dropped.load_state_dict(plain.state_dict())
    loss = lambda head, seed: (torch.manual_seed(seed), head.loss(feats, fmask, state, actions, amask, noise=noise, t=t))[1].item()
    plain.train(), dropped.train()
    assert loss(dropped, 0) != loss(dropped, 1)  # dropout masks differ per call in training
    assert loss(dropped, 0) != pytest.approx(loss(plain, 0), rel=1e-4)
    plain.eval(), dropped.eval()
    assert loss(dropped, 0) == loss(dropped, 1) == pytest.approx(loss(plain, 0), rel=1e-6)  # eval: no dropout
    assert dropped.config["dropout"] == 0.2


def test_vla_saves_image_size_final_norm_and_clip(tiny_vla, tmp_path):
    vla = VLA(tiny_vla.backbone, tiny_vla.head, tiny_vla.layer, tiny_vla.norm_stats, backbone_path=tiny_vla.backbone_path,
              final_norm=True, clip_actions=True)
    vla.backbone.set_image_size(40)
    vla.save(str(tmp_path / "vla"))
    meta = json.load(open(tmp_path / "vla" / "vla.json"))
    assert (meta["image_size"], meta["final_norm"], meta["clip_actions"]) == (40, True, True)
    loaded = VLA.load(str(tmp_path / "vla"))
    assert not loaded.training and not loaded.head.training  # loaded for inference: no dropout
    assert (loaded.backbone.image_size, loaded.final_norm, loaded.clip_actions) == (40, True, True)
    images = [camera_images()]
    inputs = vla.backbone.build_inputs(images, [vla.prompt_template.format(instruction="go")])
    with torch.no_grad():
        normed = vla.backbone.hidden_states(inputs, vla.layer, final_norm=True)[0]
        torch.testing.assert_close(loaded.features(images, ["go"])[0], normed)
        assert not torch.allclose(normed, vla.backbone.hidden_states(inputs, vla.layer)[0], atol=1e-3)


def test_vla_errors_are_clear(tiny_vla, tmp_path):
    vla, images = tiny_vla, camera_images()
    with pytest.raises(ValueError, match="state has 9 dims, the head expects state_dim=8"):
        vla.predict_action(images, "x", np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="images must be a list"):
        vla.predict_action(images[0], "x", np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"must be a uint8 \[H, W, 3\] array, got float32"):
        vla.predict_action([images[0].astype(np.float32)], "x", np.zeros(8, np.float32))
    with pytest.raises(FileNotFoundError, match="vla.json not found"):
        VLA.load(str(tmp_path))
    out_dir = str(tmp_path / "vla")
    vla.save(out_dir)
    meta_path = os.path.join(out_dir, "vla.json")
    meta = json.load(open(meta_path))
    meta["backbone"], meta["backbone_relative"] = str(tmp_path / "missing"), "../missing"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(FileNotFoundError, match="backbone checkpoint not found"):
        VLA.load(out_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLA.load(out_dir, backbone_path=str(tmp_path / "nowhere"))


def test_vla_checkpoint_names_its_own_backbone_after_the_atomic_save(tiny_vla, tmp_path):
    """train_vla writes through data.save_checkpoint (a temporary directory one level down). vla.json's relative
    path must be taken from the final directory: taken from the temporary one it read '../../sft', which named
    the out/sft of another run (here a decoy backbone) and loaded it silently."""
    import shutil
    from data import save_checkpoint
    vla = tiny_vla
    run = tmp_path / "work" / "out"  # out/sft (the backbone), out/vla (the head)
    shutil.copytree(tmp_path / "sft", run / "sft")
    model.Backbone.tiny(seed=1).save_pretrained(str(tmp_path / "work" / "sft"))  # what '../../sft' would reach
    vla.backbone_path = str(run / "sft")
    out_dir = str(run / "vla")
    os.makedirs(out_dir)
    save_checkpoint(out_dir, lambda tmp: vla.save(tmp, final_dir=out_dir))
    meta = json.load(open(os.path.join(out_dir, "vla.json")))
    assert (meta["backbone"], meta["backbone_relative"]) == (str(run / "sft"), os.path.join(os.pardir, "sft"))
    images = [camera_images()]
    torch.testing.assert_close(VLA.load(out_dir).features(images, ["go"])[0], vla.features(images, ["go"])[0])
    # a copied tree whose relative and absolute backbones both exist and differ is an error, never a guess
    copy = tmp_path / "copy" / "out"
    shutil.copytree(run / "vla", copy / "vla")
    model.Backbone.tiny(seed=2).save_pretrained(str(copy / "sft"))
    with pytest.raises(ValueError, match=r"two different directories; pass the one this head was trained on: "
                                         r"VLA.load\(..., backbone_path=...\), eval_\*.py --backbone="):
        VLA.load(str(copy / "vla"))
    torch.testing.assert_close(VLA.load(str(copy / "vla"), backbone_path=str(run / "sft")).features(images, ["go"])[0],
                               vla.features(images, ["go"])[0])
    shutil.rmtree(run / "sft")  # the original gone: the copy's own backbone is the one
    assert os.path.samefile(VLA.load(str(copy / "vla")).backbone_path, copy / "sft")


def test_vla_with_a_backbone_inside_its_checkpoint_moves_with_it(tiny_vla, tmp_path):
    """An unfrozen backbone is saved inside the checkpoint: vla.json names it where the checkpoint ends up."""
    import shutil
    from data import save_checkpoint
    vla = tiny_vla
    vla.freeze_backbone = False
    out_dir = str(tmp_path / "vla")
    os.makedirs(out_dir)
    save_checkpoint(out_dir, lambda tmp: vla.save(tmp, final_dir=out_dir))
    meta = json.load(open(os.path.join(out_dir, "vla.json")))
    assert (meta["backbone"], meta["backbone_relative"]) == (os.path.join(out_dir, "backbone"), "backbone")
    shutil.move(out_dir, tmp_path / "moved")
    assert os.path.samefile(VLA.load(str(tmp_path / "moved")).backbone_path, tmp_path / "moved" / "backbone")
