"""SAE recipes on synthetic data: shapes, constraints, sparsity, AuxK, BatchTopK (incl. 2-process gloo), b_dec init,
resampling, save/load, and a toy dictionary-recovery problem against PCA."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pipeline.config.load import ConfigError, validate
from pipeline.errors import SAEFormatError
from pipeline.sae import (
    ResampleConfig,
    SAEConfig,
    SparseAutoencoder,
    batch_threshold,
    geometric_median,
    load_sae,
    make_sae,
    resample_dead_latents,
    save_sae,
    sparse_decode,
)

ARCHS = ["relu_2023", "relu_2024", "topk", "batchtopk"]
D_IN, D_SAE, K = 16, 256, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 64, d: int = D_IN, seed: int = 0, scale: float = 40.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * scale + scale * torch.linspace(-1, 1, d)


def _sae(arch: str, **overrides) -> SparseAutoencoder:
    return make_sae(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, **overrides))


def _train(sae: SparseAutoencoder, x: torch.Tensor, steps: int, lr: float = 1e-3, batch: int | None = None):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        xb = x if batch is None else x[torch.randint(0, x.shape[0], (batch,), generator=gen)]
        out = sae(xb, progress=step / max(steps, 1))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return opt


# ---- config ----------------------------------------------------------------------------------------------------

def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="arch"):
        validate(SAEConfig, {"arch": "jumprelu", "d_in": 8, "d_sae": 32}, "sae.yaml")
    with pytest.raises(ConfigError, match="unknown key"):
        validate(SAEConfig, {"arch": "topk", "d_in": 8, "d_sae": 32, "kk": 3}, "sae.yaml")
    with pytest.raises(ConfigError, match="k: 64 must be <= d_sae 32"):
        validate(SAEConfig, {"arch": "topk", "d_in": 8, "d_sae": 32, "k": 64}, "sae.yaml")
    with pytest.raises(ConfigError, match="resample"):
        validate(SAEConfig, {"arch": "topk", "d_in": 8, "d_sae": 32, "resample": {}}, "sae.yaml")
    cfg = validate(SAEConfig, {"arch": "relu_2023", "d_in": 8, "d_sae": 32, "resample": {"every_steps": 10}}, "x")
    assert isinstance(cfg.resample, ResampleConfig) and cfg.resample.every_steps == 10


def test_aux_k_defaults_to_half_of_d_in_not_d_sae():
    cfg = SAEConfig(arch="topk", d_in=3072, d_sae=65536)
    assert cfg.resolved_aux_k == 1536
    assert SAEConfig(arch="topk", d_in=3072, d_sae=65536, aux_k=100).resolved_aux_k == 100


# ---- shapes and the row-mean loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_terms(arch):
    sae = _sae(arch)
    x = _data()
    sae.init_from_sample(x)
    out = sae(x, progress=0.5, dead_mask=torch.zeros(D_SAE, dtype=torch.bool))
    assert out.x_hat.shape == x.shape and out.loss.shape == ()
    assert out.fired.shape == (D_SAE,) and out.fired.dtype == torch.bool
    assert {"recon_loss", "fvu", "l0"} <= set(out.terms)
    assert all(t.ndim == 0 and not t.requires_grad for t in out.terms.values())
    assert sae.encode(x.reshape(4, 16, D_IN)).shape == (4, 16, D_SAE)
    assert sae.decode(sae.encode(x)).shape == x.shape
    with pytest.raises(ValueError, match="d_in=16"):
        sae(torch.randn(4, D_IN + 1))


@pytest.mark.parametrize("arch", ["relu_2023", "relu_2024", "topk"])
def test_loss_is_a_mean_over_rows(arch):
    # DDP averages gradients over ranks; that equals one big batch only if the loss is a per-row mean.
    sae = _sae(arch)
    x = _data(64)
    sae.init_from_sample(x)
    dead = torch.arange(D_SAE) % 3 == 0
    full = sae(x, progress=0.02, dead_mask=dead).loss
    halves = [sae(h, progress=0.02, dead_mask=dead).loss for h in x.chunk(2)]
    torch.testing.assert_close(full, sum(halves) / 2)


# ---- ReLU recipes -----------------------------------------------------------------------------------------------

def test_relu_2023_unit_norm_decoder_and_parallel_gradient_removed():
    sae = _sae("relu_2023")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    x = _data()
    sae.init_from_sample(x)
    sae(x).loss.backward()
    grad_before = sae.W_dec.grad.clone()
    assert (grad_before * sae.W_dec).sum(dim=1).abs().max() > 1e-3  # there was a parallel part to remove
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-5 * grad_before.norm(dim=1).max()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    opt.step()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # Adam alone drifts off the sphere
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_relu_2024_init_and_lambda_warmup():
    sae = _sae("relu_2024", l1_coefficient=5.0, l1_warmup_frac=0.05)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.count_nonzero(sae.b_enc) == 0
    x = _data()
    sae.init_from_sample(x)
    for progress, lam in [(0.0, 0.0), (0.025, 2.5), (0.05, 5.0), (0.9, 5.0)]:
        out = sae(x, progress=progress)
        assert out.terms["lambda"].item() == pytest.approx(lam)
        z = sae.encode(x)
        weighted_l1 = (z * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
        torch.testing.assert_close(out.loss, out.terms["recon_loss"] + lam * weighted_l1)
    # No decoder constraint in this recipe: the hooks leave weights and gradients alone.
    sae(x).loss.backward()
    grad, w = sae.W_dec.grad.clone(), sae.W_dec.detach().clone()
    sae.before_optimizer_step()
    sae.after_optimizer_step()
    assert torch.equal(grad, sae.W_dec.grad) and torch.equal(w, sae.W_dec)


@pytest.mark.parametrize("arch", ARCHS)
def test_input_scaling_gives_sqrt_d_mean_norm(arch):
    x = _data(512, scale=300.0)
    sae = _sae(arch)
    sae.init_from_sample(x)
    scaled_norm = (x * sae.input_scale).norm(dim=1).mean().item()
    assert scaled_norm == pytest.approx(math.sqrt(D_IN), rel=1e-5)
    unscaled = _sae(arch, normalize_input=False)
    unscaled.init_from_sample(x)
    assert unscaled.input_scale.item() == 1.0


# ---- TopK / BatchTopK -------------------------------------------------------------------------------------------

def test_topk_exactly_k_active_per_row():
    sae = _sae("topk")
    x = _data(128)
    sae.init_from_sample(x)
    z = sae.encode(x)
    assert torch.equal((z != 0).sum(dim=1), torch.full((128,), K))
    assert sae(x).terms["l0"].item() == K


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_decode_equals_dense(arch):
    sae = _sae(arch)
    x = _data(64)
    sae.init_from_sample(x)
    _train(sae, x, 3)
    sae.eval()
    z = sae.encode(x)
    dense = (z @ sae.W_dec + sae.b_dec) / sae.input_scale
    torch.testing.assert_close(sae.decode(z), dense, rtol=1e-5, atol=1e-4)
    idx = torch.randint(0, D_SAE, (10, 5))
    vals = torch.rand(10, 5)
    ref = torch.zeros(10, D_SAE).scatter_add_(1, idx, vals) @ sae.W_dec
    torch.testing.assert_close(sparse_decode(idx, vals, sae.W_dec), ref)


def test_topk_forward_reconstruction_matches_dense_reference():
    sae = _sae("topk")
    x = _data(32)
    sae.init_from_sample(x)
    out = sae(x)
    z = sae.encode(x)
    torch.testing.assert_close(out.x_hat, (z @ sae.W_dec + sae.b_dec) / sae.input_scale, rtol=1e-5, atol=1e-4)


def _auxk_reference(sae, x, dead, k_aux, add_b_dec):
    xs = x * sae.input_scale
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(K, dim=1)
    x_hat_s = torch.zeros_like(pre).scatter(1, idx, vals.relu()) @ sae.W_dec + sae.b_dec
    residual = xs - x_hat_s
    a_vals, a_idx = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=1)
    aux_hat = torch.zeros_like(pre).scatter(1, a_idx, a_vals.relu()) @ sae.W_dec
    if add_b_dec:
        aux_hat = aux_hat + sae.b_dec
    return (aux_hat - residual).pow(2).sum(dim=1).mean()


@torch.no_grad()
def test_auxk_uses_half_d_in_and_adds_b_dec_once():
    sae = _sae("topk")
    x = _data(64)
    sae.init_from_sample(x)  # geometric median: b_dec far from zero, so adding it twice shows
    assert sae.b_dec.norm() > 1.0
    dead = torch.arange(D_SAE) % 2 == 0  # 128 dead latents: enough that k_aux=d_sae//2 would differ from d_in//2
    got = sae(x, dead_mask=dead).terms["aux_loss"]
    expected = _auxk_reference(sae, x, dead, D_IN // 2, add_b_dec=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for wrong in (_auxk_reference(sae, x, dead, D_SAE // 4, add_b_dec=False),
                  _auxk_reference(sae, x, dead, D_IN // 2, add_b_dec=True)):
        assert not torch.allclose(got, wrong, rtol=1e-3)
    assert sae(x, dead_mask=None).terms["aux_loss"].item() == 0.0
    assert sae(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool)).terms["aux_loss"].item() == 0.0


def test_auxk_gradient_reaches_only_dead_latents():
    sae = _sae("topk", aux_coefficient=1.0)
    x = _data(64)
    sae.init_from_sample(x)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:40] = True
    with_aux = sae(x, dead_mask=dead).loss
    without = sae(x).loss
    (with_aux - without).backward()  # the AuxK term alone
    live_rows = sae.W_dec.grad[~dead]
    assert live_rows.abs().max() == 0 and sae.W_dec.grad[dead].abs().max() > 0


def test_batchtopk_selects_k_times_batch_and_uses_threshold_at_inference():
    sae = _sae("batchtopk", threshold_momentum=0.9)
    x = _data(32)
    sae.init_from_sample(x)
    sae.train()
    out = sae(x)
    assert out.terms["l0"].item() * 32 == K * 32
    pre = ((x * sae.input_scale - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    vals, flat = pre.flatten().topk(K * 32)
    z = torch.zeros(pre.numel()).scatter(0, flat, vals).view_as(pre)
    rows_used = (z != 0).sum(dim=1)
    assert rows_used.min() != rows_used.max()  # rows share the budget unevenly: batch-level, not per-row
    torch.testing.assert_close(out.x_hat, (z @ sae.W_dec + sae.b_dec) / sae.input_scale, rtol=1e-5, atol=1e-4)
    first_cut = vals.min()
    torch.testing.assert_close(sae.threshold, first_cut)
    second = _data(32, seed=5)
    sae(second)
    pre2 = ((second * sae.input_scale - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    second_cut = pre2.flatten().topk(K * 32).values.min()
    torch.testing.assert_close(sae.threshold, 0.9 * first_cut + 0.1 * second_cut)
    # Inference: the learned threshold, not the batch, decides.
    sae.eval()
    theta = sae.threshold.item()
    z_inf = sae.encode(x)
    torch.testing.assert_close(z_inf, torch.where(pre > theta, pre, torch.zeros_like(pre)))
    assert not torch.equal(z_inf, z)
    assert torch.equal(sae.encode(x[:5]), z_inf[:5])  # row-independent at inference
    eval_out = sae(x)
    torch.testing.assert_close(eval_out.x_hat, sae.decode(z_inf), rtol=1e-5, atol=1e-4)


def test_batchtopk_calibration_gives_k_latents_per_row_at_inference():
    sae = _sae("batchtopk")
    x = _data(1024, seed=3)
    sae.init_from_sample(x)
    _train(sae, x, 30, batch=128)
    sae.threshold.fill_(10 * sae.threshold.item() + 1.0)  # a badly lagging EMA: far too few latents fire
    sae.eval()
    assert (sae.encode(x) > 0).sum(dim=1).float().mean() < K / 2
    theta = sae.calibrate_threshold(x, batch_size=256)
    assert theta == sae.threshold.item() > 0
    assert sae.calibrate_threshold(x, batch_size=256) == theta  # a function of the weights and rows only
    for rows in (x, _data(1024, seed=4)):  # the calibration rows, and fresh rows of the same distribution
        l0 = (sae.encode(rows) > 0).sum(dim=1).float().mean().item()
        assert 0.8 * K <= l0 <= 1.25 * K, l0
    with pytest.raises(ValueError, match="at least one batch"):
        sae.calibrate_threshold(x[:100], batch_size=256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batchtopk_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        sae = _sae("batchtopk")
        x = _data(64)
        sae.init_from_sample(x)
        local = x.chunk(world)[rank]
        pre = sae._pre_activation(local * sae.input_scale).relu().detach()
        cut = batch_threshold(pre, K)
        out = sae(local)
        out.loss.backward()
        for p in sae.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        grads = {f"grad_{n}": p.grad for n, p in sae.named_parameters()}
        save_file({"cut": cut.reshape(1), "x_hat": out.x_hat.detach(), "threshold": sae.threshold.reshape(1),
                   **grads}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_batchtopk_two_gloo_ranks_select_like_one_process(tmp_path):
    mp.spawn(_batchtopk_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    sae = _sae("batchtopk")
    x = _data(64)
    sae.init_from_sample(x)
    pre = sae._pre_activation(x * sae.input_scale).relu().detach()
    cut = batch_threshold(pre, K)
    out = sae(x)
    out.loss.backward()
    for r in ranks:
        assert r["cut"].item() == cut.item()  # same global threshold, hence the same latents selected
        assert r["threshold"].item() == sae.threshold.item()
    torch.testing.assert_close(torch.cat([r["x_hat"] for r in ranks]), out.x_hat.detach())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ranks[0][f"grad_{name}"], p.grad, rtol=1e-4, atol=1e-6)


# ---- b_dec init ------------------------------------------------------------------------------------------------

def test_geometric_median_beats_mean_with_outliers():
    gen = torch.Generator().manual_seed(0)
    center = torch.full((8,), 3.0)
    inliers = center + torch.randn(900, 8, generator=gen)
    outliers = center + 500.0 + torch.randn(100, 8, generator=gen)
    data = torch.cat([inliers, outliers])
    gm_err = (geometric_median(data) - center).norm()
    mean_err = (data.mean(dim=0) - center).norm()
    assert gm_err < 0.5 and mean_err > 100 * gm_err


@pytest.mark.parametrize("method", ["geometric_median", "mean", "zeros"])
def test_b_dec_init_methods_are_deterministic(method):
    x = _data(256)
    a, b = _sae("topk", b_dec_init=method), _sae("topk", b_dec_init=method)
    a.init_from_sample(x)
    b.init_from_sample(x.clone())
    assert torch.equal(a.b_dec, b.b_dec) and torch.equal(a.W_enc, b.W_enc)
    if method == "mean":
        torch.testing.assert_close(a.b_dec, (x * a.input_scale).mean(dim=0))
    if method == "zeros":
        assert torch.count_nonzero(a.b_dec) == 0


# ---- resampling ------------------------------------------------------------------------------------------------

def test_resampling_changes_only_dead_latents_and_zeroes_their_adam_state():
    sae = _sae("relu_2023")
    x = _data(512)
    sae.init_from_sample(x)
    opt = _train(sae, x, 2, lr=1e-2)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[3, 17, 100, 255]] = True
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}
    live_enc_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()

    assert resample_dead_latents(sae, opt, dead, x, seed=3) == 4

    slices = {"W_enc": lambda t, m: t[:, m], "W_dec": lambda t, m: t[m], "b_enc": lambda t, m: t[m]}
    for name, p in sae.named_parameters():
        if name == "b_dec":
            assert torch.equal(p, before[name])
            continue
        take = slices[name]
        assert torch.equal(take(p, ~dead), take(before[name], ~dead))
        assert not torch.equal(take(p, dead), take(before[name], dead)) or name == "b_enc"
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][key]
            assert torch.count_nonzero(take(state, dead)) == 0
            assert torch.equal(take(state, ~dead), take(state_before[name][key], ~dead))
            assert torch.count_nonzero(take(state_before[name][key], dead)) > 0
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(sae.W_enc[:, dead].norm(dim=0), torch.full((4,), 0.2 * live_enc_norm.item()))
    assert torch.count_nonzero(sae.b_enc[dead]) == 0
    # Encoder and decoder point along the same (input - b_dec) direction.
    cos = torch.nn.functional.cosine_similarity(sae.W_enc[:, dead].T, sae.W_dec[dead], dim=1)
    torch.testing.assert_close(cos, torch.ones(4))
    assert resample_dead_latents(sae, opt, torch.zeros(D_SAE, dtype=torch.bool), x) == 0


def test_resampling_prefers_badly_reconstructed_inputs():
    sae = _sae("relu_2023")
    x = _data(200)
    sae.init_from_sample(x)
    outlier = torch.zeros(D_IN)
    outlier[0] = 1e4  # far worse reconstructed than anything else: p ∝ loss² makes it the pick
    data = torch.cat([x, outlier[None]])
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:3] = True
    resample_dead_latents(sae, None, dead, data)
    direction = outlier * sae.input_scale - sae.b_dec
    direction = direction / direction.norm()
    torch.testing.assert_close(sae.W_dec[:3], direction.expand(3, -1))


# ---- persistence ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_identical(arch, tmp_path):
    sae = _sae(arch, seed=7)
    x = _data(128)
    sae.init_from_sample(x)
    _train(sae, x, 3)
    assert save_sae(sae, tmp_path / "sae") == tmp_path / "sae"
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    sae.eval()
    loaded.eval()
    assert torch.equal(sae.encode(x), loaded.encode(x))
    assert torch.equal(sae(x).x_hat, loaded(x).x_hat)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SAEFormatError, match="sae_config.json: cannot read"):
        load_sae(tmp_path)
    sae = _sae("topk")
    save_sae(sae, tmp_path)
    other = make_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE // 2, k=K))
    save_file({n: t.contiguous() for n, t in other.state_dict().items()}, str(tmp_path / "sae_state.safetensors"))
    with pytest.raises(SAEFormatError, match=r"sae_state.safetensors: W_enc has shape"):
        load_sae(tmp_path)
    (tmp_path / "sae_state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SAEFormatError, match=r"sae_state.safetensors: cannot read tensors"):
        load_sae(tmp_path)
    config = tmp_path / "sae_config.json"
    config.write_text(config.read_text().replace('"topk"', '"gated"'))
    with pytest.raises(SAEFormatError, match=r"sae_config.json: invalid config: arch"):
        load_sae(tmp_path)
    config.write_text("[]")
    with pytest.raises(SAEFormatError, match=r"sae_config.json: not a saepipe-sae/1 config"):
        load_sae(tmp_path)


def test_save_replaces_the_old_save_whole_and_never_a_foreign_directory(tmp_path, monkeypatch):
    a, b = _sae("topk", seed=1), _sae("relu_2023", seed=2)
    save_sae(a, tmp_path / "sae")
    # A save that dies half-way leaves the previous one readable, and no temp directory behind.
    monkeypatch.setattr("pipeline.sae.persist.save_file", _fail_after_writing_part)
    with pytest.raises(OSError, match="disk full"):
        save_sae(b, tmp_path / "sae")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert torch.equal(load_sae(tmp_path / "sae").W_dec, a.W_dec)
    save_sae(b, tmp_path / "sae")
    assert type(load_sae(tmp_path / "sae")) is type(b)
    # Replacing a directory deletes what it held: a run directory with other files in it is refused.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SAEFormatError, match=r"run: holds metrics.jsonl"):
        save_sae(a, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def _fail_after_writing_part(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError("disk full")


def test_different_seeds_give_different_init_same_seed_same_init():
    a, b, c = _sae("topk", seed=1), _sae("topk", seed=1), _sae("topk", seed=2)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)


# ---- toy dictionary recovery -----------------------------------------------------------------------------------

def test_topk_beats_pca_on_a_toy_sparse_dictionary():
    """Data built from 64 unit-norm features in 32 dimensions, 3 active per sample. PCA with 3 components can only
    capture a 3-dimensional subspace; a TopK SAE with k=3 can learn the features themselves."""
    torch.manual_seed(0)
    d, n_feat, active = 32, 64, 3
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(n_feat, d, generator=gen)
    features /= features.norm(dim=1, keepdim=True)

    def sample(n):
        idx = torch.rand(n, n_feat, generator=gen).argsort(dim=1)[:, :active]
        coef = 1 + torch.rand(n, active, generator=gen)
        return torch.einsum("nk,nkd->nd", coef, features[idx])

    train, test = sample(8192), sample(2048)
    centered = test - train.mean(dim=0)
    basis = torch.linalg.eigh(torch.cov((train - train.mean(dim=0)).T)).eigenvectors[:, -active:]
    pca_fvu = ((centered - centered @ basis @ basis.T).pow(2).sum() / centered.pow(2).sum()).item()
    assert pca_fvu > 0.6  # the data is not close to low-rank

    sae = make_sae(SAEConfig(arch="topk", d_in=d, d_sae=128, k=active, normalize_input=False))
    sae.init_from_sample(train[:2048])
    _train(sae, train, 800, lr=4e-3, batch=256)
    sae.eval()
    with torch.no_grad():
        recon = sae.decode(sae.encode(test))
    sae_fvu = ((recon - test).pow(2).sum() / (test - test.mean(dim=0)).pow(2).sum()).item()
    print(f"toy dictionary: TopK FVU {sae_fvu:.3f} vs PCA-{active} FVU {pca_fvu:.3f}")
    assert sae_fvu < 0.5 * pca_fvu
