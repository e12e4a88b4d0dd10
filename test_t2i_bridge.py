"""Tests of t2i_bridge on tiny random diffusers models (CPU, nothing downloaded, under a minute
on 2 cores). Skipped as a whole where diffusers is not installed (pip install -r
requirements-t2i.txt)."""
import os

import pytest

diffusers = pytest.importorskip("diffusers")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import apex_min  # noqa: E402
import t2i_bridge  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = list(t2i_bridge.KINDS)
PROMPTS = 4

# ==================================================================================================
# Tiny random models of each kind (built from a config in milliseconds), prompts, latents
# ==================================================================================================
TEXT_WIDTH, POOLED_WIDTH, LATENT_CHANNELS = 24, 12, 4   # the tiny models' text and latents


def tiny_model(kind: str, zero_output: bool = False) -> nn.Module:
    """One block of `kind` (40-70k weights) on (4, 8, 8) latents. zero_output: the untrained
    velocity is 0, as apex_min.DiT's, so APEX's first one-step samples are the noise itself."""
    shared = dict(num_attention_heads=2, attention_head_dim=16, num_layers=1)
    text, c = dict(joint_attention_dim=TEXT_WIDTH), LATENT_CHANNELS
    build = {
        "sd3": lambda: diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=c, out_channels=c, pos_embed_max_size=8,
            caption_projection_dim=32, pooled_projection_dim=POOLED_WIDTH, **shared, **text),
        "flux": lambda: diffusers.FluxTransformer2DModel(
            in_channels=4 * c, num_single_layers=1, axes_dims_rope=(4, 6, 6),
            pooled_projection_dim=POOLED_WIDTH, **shared, **text),
        "sana": lambda: diffusers.SanaTransformer2DModel(
            in_channels=c, out_channels=c, sample_size=8, patch_size=2, cross_attention_dim=32,
            num_cross_attention_heads=2, cross_attention_head_dim=16, caption_channels=TEXT_WIDTH,
            **shared),
        "qwen-image": lambda: diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * c, out_channels=c, axes_dims_rope=(4, 6, 6),
            **shared, **text),
    }
    model = build[kind]()
    if zero_output:
        nn.init.zeros_(model.proj_out.weight)
        nn.init.zeros_(model.proj_out.bias)
    return model


@pytest.fixture(autouse=True)
def one_thread():  # tiny models: a second thread costs more than it gives, and a neighbour may
    before = torch.get_num_threads()  # hold the other core
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def table(seed: int = 0) -> t2i_bridge.PromptTable:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(PROMPTS + 1, 5, TEXT_WIDTH, generator=g)    # the last: "" prompt
    return t2i_bridge.PromptTable(features, torch.randn(PROMPTS + 1, POOLED_WIDTH, generator=g))


def bridge(kind: str, zero_output: bool = False, seed: int = 0) -> t2i_bridge.T2IBridge:
    torch.manual_seed(seed)
    return t2i_bridge.T2IBridge(tiny_model(kind, zero_output), table(seed))


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, LATENT_CHANNELS, 8, 8, generator=g)
    y = torch.arange(n) % (PROMPTS + 1)          # every prompt and the null class
    return x, y, torch.rand(n, generator=g)


def stock(net: t2i_bridge.T2IBridge, x, t, y):
    """The diffusers model called as its pipeline calls it: raw text features, pooled features,
    timestep in the model's unit, latents packed by hand for Flux and Qwen-Image."""
    B, C, H, W = x.shape
    kind = net.kind_name
    inputs = dict(encoder_hidden_states=net.table.features[y], return_dict=False,
                  timestep=t * (1000.0 if kind in ("sd3", "sana") else 1.0))
    if kind in ("sd3", "flux"):
        inputs["pooled_projections"] = net.table.pooled[y]
    if kind in ("flux", "qwen-image"):   # the pipelines' 2x2 packing, written out
        x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, 4 * C)
    if kind == "flux":
        ids = torch.zeros(H // 2, W // 2, 3)
        ids[..., 1] += torch.arange(H // 2)[:, None]
        ids[..., 2] += torch.arange(W // 2)[None, :]
        inputs.update(img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(net.tokens, 3))
    if kind == "qwen-image":
        inputs["img_shapes"] = [(1, H // 2, W // 2)] * B
    out = net.model(x, **inputs)[0]
    if kind in ("flux", "qwen-image"):
        out = out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    return out


def one_line_value_error(excinfo) -> str:
    message = str(excinfo.value)
    assert excinfo.type is ValueError and "\n" not in message and message.count(". ") == 0
    return message


# ==================================================================================================
# The condition shift on token conditions
# ==================================================================================================


def test_condition_shift_shifts_whole_rows_of_a_token_condition():
    """B = T: a mask broadcast along the token axis instead of the rows would go unnoticed on
    shapes alone; the per-row loop is the reference."""
    B = T = 4
    c = torch.randn(B, T, 8)
    fake = torch.tensor([False, True, False, True])
    want = torch.stack([-0.5 * c[i] + 1.0 if fake[i] else c[i] for i in range(B)])
    assert torch.equal(apex_min.condition_shift(c, fake, -0.5, 1.0), want)
    wrong = torch.where(fake[:, None], -0.5 * c + 1.0, c)      # the mask on the token axis
    assert wrong.shape == want.shape and not torch.equal(wrong, want)


# ==================================================================================================
# The bridge is the stock model; the hooks
# ==================================================================================================


@pytest.mark.parametrize("kind", KINDS)
def test_tt_equal_t_is_the_stock_model_bit_for_bit(kind):
    net = bridge(kind)
    x, y, t = batch()
    with torch.no_grad():
        for p in net.tt_embed.parameters():   # a trained emb_tt: its term is still 0 at tt = t
            p.add_(torch.randn_like(p))
        out = net(x, t, t, net.embed_class(y))
        assert torch.equal(out, stock(net, x, t, y))
        assert not torch.equal(net(x, t, 0.5 * t, net.embed_class(y)), out)   # tt < t acts


@pytest.mark.parametrize("kind", KINDS)
def test_the_shift_changes_only_the_fake_rows(kind):
    net = bridge(kind)
    x, y, t = batch()
    fake = torch.arange(len(y)) >= 3
    with torch.no_grad():
        c = net.embed_class(y)
        plain = net(x, t, t, c)
        shifted = net(x, t, t, apex_min.condition_shift(c, fake, -1.0, 0.0))
    assert torch.equal(shifted[~fake], plain[~fake])
    assert (shifted[fake] - plain[fake]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_the_ema_copy_has_its_own_hooks_and_shares_the_prompt_table():
    net = bridge("flux")
    ema = apex_min.EMA(net)
    x, y, t = batch()
    with torch.no_grad():
        assert torch.equal(ema.model(x, t, 0.5 * t, ema.model.embed_class(y)),
                           net(x, t, 0.5 * t, net.embed_class(y)))
        for p in ema.model.parameters():   # a hook bound to the live bridge would ignore this
            p.add_(0.1 * torch.randn_like(p))
        assert not torch.equal(ema.model(x, t, 0.5 * t, ema.model.embed_class(y)),
                               net(x, t, 0.5 * t, net.embed_class(y)))
    hooks = ema.model.model.context_embedder._forward_hooks.values()
    assert all(hook.__self__ is ema.model for hook in hooks)
    assert ema.model.table is net.table


# ==================================================================================================
# Bad inputs: one sentence each
# ==================================================================================================


def test_an_unknown_model_kind_is_one_clear_error():
    with pytest.raises(ValueError) as excinfo:
        t2i_bridge.T2IBridge(tiny_model("sd3"), table(), kind="sdxl")
    assert "unknown model kind 'sdxl'" in one_line_value_error(excinfo)
    with pytest.raises(ValueError) as excinfo:
        t2i_bridge.T2IBridge(nn.Linear(4, 4), table())            # no kind given, none known
    assert "'Linear'" in one_line_value_error(excinfo)


def test_a_prompt_table_of_the_wrong_width_is_one_clear_error():
    narrow = t2i_bridge.PromptTable(torch.randn(PROMPTS + 1, 5, 16), table().pooled)
    with pytest.raises(ValueError) as excinfo:
        t2i_bridge.T2IBridge(tiny_model("sana"), narrow)
    assert "16 wide" in one_line_value_error(excinfo)
    no_pooled = t2i_bridge.PromptTable(table().features)
    with pytest.raises(ValueError) as excinfo:
        t2i_bridge.T2IBridge(tiny_model("sd3"), no_pooled)
    assert "pooled" in one_line_value_error(excinfo)


@pytest.mark.parametrize("kind", KINDS)
def test_a_shift_that_cannot_act_is_one_clear_error(kind):
    """b and the size of a vanish in the LayerNorm of SD3's, Flux's and Qwen-Image's text tokens;
    Sana feeds its tokens to cross-attention as they are. a = 1, b = 0 is an error everywhere."""
    net = bridge(kind)
    assert net.check_shift(-1.0, 0.0) > 1.0                  # the released shift acts
    for a, b in [(1.0, 0.5), (0.5, 1.0), (1.0, 0.0)]:
        if net.kind.layernorm or (a, b) == (1.0, 0.0):
            with pytest.raises(ValueError) as excinfo:
                net.check_shift(a, b)
            assert "fake branch would see the real condition" in one_line_value_error(excinfo)
        else:
            assert net.check_shift(a, b) > 0.1
    for a, b in [(1.0, 0.0), (0.5, 1.0)] if net.kind.layernorm else [(1.0, 0.0)]:
        with pytest.raises(ValueError):   # build_training checks the Config it is given
            t2i_bridge.build_training(net, apex_min.Config(shift_a=a, shift_b=b))
    if net.kind.layernorm:   # the same b on the real tokens: the output moves by rounding only
        x, y, t = batch()
        with torch.no_grad():
            c = net.embed_class(y)
            tokens, pooled = c[:, :net.tokens], c[:, net.tokens:]
            moved = net(x, t, t, torch.cat([tokens + 3.0, pooled], 1)) - net(x, t, t, c)
        assert moved.abs().max() < 1e-4


# ==================================================================================================
# Training: apex_min's objective through the bridge; LoRA
# ==================================================================================================


def prompt_images(n: int = 64, seed: int = 0):
    """A latent pattern per prompt, plus a little noise: (n, 4, 8, 8) latents and their prompts."""
    g = torch.Generator().manual_seed(seed)
    patterns = 0.5 * torch.randn(PROMPTS, LATENT_CHANNELS, 8, 8, generator=g)
    y = torch.arange(n) % PROMPTS
    return patterns[y] + 0.05 * torch.randn(n, LATENT_CHANNELS, 8, 8, generator=g), y


def velocity_error(net, x, y, draws: int = 4) -> float:
    """The mean squared error of F(x_t, t, t, c) against z - x on fixed draws: the real branch's
    flow error."""
    total = 0.0
    for k in range(draws):
        torch.manual_seed(100 + k)
        with torch.no_grad():
            total += apex_min.fm_loss(net, x, y)[0].item() / draws
    return total


TINY_APEX = dict(batch_size=16, lr=2e-3, shift_a=-1.0, shift_b=0.0, num_classes=PROMPTS)


@pytest.mark.parametrize("kind", KINDS)
def test_fifty_apex_steps_lower_the_velocity_error(kind):
    """apex_min's objective, unchanged, on the bridge. Its own value is no progress measure over
    50 steps (the one-step rows' clamped residual rises to about 1 and the fake rows chase a
    moving generator, on apex_min.DiT too), so the test measures the flow error of the real
    branch on fixed draws, which the flow and any-step rows train."""
    net = bridge(kind, zero_output=True)
    cfg = apex_min.Config(**TINY_APEX)
    run = t2i_bridge.build_training(net, cfg)
    x, y = prompt_images()
    before = velocity_error(net, x, y)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    for _ in range(50):
        rows = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        loss, terms = t2i_bridge.apex_step(run, x[rows], y[rows], cfg)
        assert torch.isfinite(loss) and {"fake", "gen", "gap"} <= set(terms)
    after = velocity_error(net, x, y)
    assert after < 0.95 * before, (before, after)


@pytest.mark.parametrize("use_peft", [True, False], ids=["peft", "project-lora"])
def test_lora_trains_adapters_only_and_merges_exactly(use_peft):
    if use_peft:
        pytest.importorskip("peft")
    net = t2i_bridge.add_lora(bridge("sd3"), rank=4, use_peft=use_peft)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in name or name.startswith("tt_embed") for name in trainable)
    assert not any("context_embedder" in name for name in trainable)
    cfg = apex_min.Config(**TINY_APEX)
    run = t2i_bridge.build_training(net, cfg)
    x, y = prompt_images(16)
    for _ in range(5):
        t2i_bridge.apex_step(run, x, y, cfg)
    xb, yb, t = batch()
    with torch.no_grad():
        before = net(xb, t, 0.5 * t, net.embed_class(yb))
        merged = t2i_bridge.merge_lora(net)
        after = merged(xb, t, 0.5 * t, merged.embed_class(yb))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (after - before).abs().max() <= 1e-6
    adapted = net.model.transformer_blocks[0].attn.to_q.weight   # the merge moved the weights
    assert not torch.equal(adapted, bridge("sd3").model.transformer_blocks[0].attn.to_q.weight)


def test_one_step_sampling_on_the_bridge_is_one_jump():
    net = bridge("sana")
    z, y, _ = batch()
    x = apex_min.sample_fewstep(net, z, y, nfe=1)          # the released grid: t = 0.999 -> 0
    with torch.no_grad():
        F = net(z, torch.full((len(y),), 0.999), torch.zeros(len(y)), net.embed_class(y))
    assert torch.allclose(x, z - 0.999 * F, atol=1e-6)


# ==================================================================================================
# notebooks/04 runs top to bottom (as test_apex_min.py runs notebooks 01-03)
# ==================================================================================================


NOTEBOOK = os.path.join(HERE, "notebooks", "04_apex_on_your_t2i_transformer.ipynb")


def execute_notebook(write: bool = False) -> None:
    """Run notebook 04 in a fresh kernel from notebooks/; write: save its outputs (committed)."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    if write:
        for cell in nb.cells:   # execution timestamps would change every cell on every re-run
            cell.metadata.pop("execution", None)
        nbformat.write(nb, NOTEBOOK)


def test_notebook_04_runs_top_to_bottom():
    for name in ("nbclient", "nbformat", "ipykernel"):
        pytest.importorskip(name)
    assert os.path.getsize(NOTEBOOK) < 1_000_000
    execute_notebook()


if __name__ == "__main__":   # python test_t2i_bridge.py: re-execute notebook 04, save its outputs
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    execute_notebook(write=True)
    print(f"{os.path.basename(NOTEBOOK)}: outputs written, {os.path.getsize(NOTEBOOK) // 1024} KB")
