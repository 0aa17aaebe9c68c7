"""SD-DiT's discriminative term (terms/sddit.py): the partial DiT forward, the EMA teacher, the DINO and
cosine losses, the centre, masking; end to end (marked slow) through the CLI in this process, and on 2 processes
through `accelerate launch` (one run shared with test_repa, conftest.py `repa_sddit_ddp_run`)."""

import contextlib
import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sadm_finetune.config.run import build_config
from sadm_finetune.utils.errors import ConfigError
from sadm_finetune.diffusion.process import DDPMProcess
from sadm_finetune.terms import StepContext
from sadm_finetune.terms.sddit.term import Centre, SDDiTTerm, cosine_loss, dino_loss, dit_encoder

BATCH, NUM_LAYERS = 4, 3


def _config(**sddit):
    options = {"sddit_weight": 0.1, "sddit_encoder_depth": 2, "sddit_head_dim": 16, "sddit_head_hidden_dim": 32,
               **sddit}
    return build_config({"pretrained_model_name_or_path": "p", "train_data_dir": "d", "output_dir": "o", **options})


@pytest.fixture(scope="module")
def pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        num_layers=NUM_LAYERS, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(beta_schedule="linear"))


def _setup(pipeline, lora_rank=0, **sddit):
    """A fresh copy of the tiny DiT in an adapter (prepared as training.train does), the term on it, and an
    optimizer over the trainable weights and the head (as build_run)."""
    from sadm_finetune.tuners import lora
    from sadm_finetune.families.dit import DiTAdapter

    config = _config(**sddit, **({"trainable": "lora", "lora_rank": lora_rank} if lora_rank else {}))
    pipe = copy.deepcopy(pipeline)
    adapter = DiTAdapter(pipe, config.model)
    adapter.prepare_training()  # one label dropout per sample, ours: the blocks never drop labels themselves
    if lora_rank:
        lora.attach_lora(adapter.denoiser, lora.make_lora_config(config.model, adapter.lora_target_modules))
    process = DDPMProcess(pipe.scheduler.config, "cpu")
    term = SDDiTTerm(config, adapter, process, contextlib.nullcontext)
    term.bind({}, {"head": term.student_head})
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad] + list(term.student_head.parameters())
    return adapter, process, term, torch.optim.SGD(params, lr=0.05)


def _context(adapter, process, term, step, seed=0, timesteps=None):
    gen = torch.Generator().manual_seed(seed + step)
    latents = torch.randn((BATCH, 4, 8, 8), generator=gen)
    cond = {"class_labels": torch.randint(0, 10, (BATCH,), generator=gen)}
    noise = torch.randn(latents.shape, generator=gen)
    sampled = process.sample_timesteps(BATCH, gen, "cpu")
    timesteps = sampled if timesteps is None else timesteps
    noisy = process.add_noise(latents, noise, timesteps)
    with adapter.capture_hidden(adapter.denoiser, term.feature_blocks) as hidden:
        model_pred = adapter.predict(adapter.denoiser, noisy, timesteps, cond).model_pred.float()
    return StepContext(step, {}, latents, noise, timesteps, noisy, cond, model_pred,
                       process.x0_hat(model_pred, noisy, timesteps), gen, hidden)


def _train_step(adapter, process, term, optimizer, step):
    ctx = _context(adapter, process, term, step)
    value, logs = term.loss(ctx)
    loss = torch.nn.functional.mse_loss(ctx.model_pred, ctx.noise) + term.weight(step) * value.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    term.phase(ctx, update=None)
    return ctx, value, logs


def _head_and_encoder(module_pair):
    return {name: p.detach().clone() for name, p in module_pair.named_parameters()}


@pytest.mark.parametrize("depth", [1, 2])
def test_partial_forward_equals_the_models_own_hidden_states(pipeline, depth):
    adapter, process, term, _ = _setup(pipeline, sddit_encoder_depth=depth)
    ctx = _context(adapter, process, term, step=0)
    assert term.feature_blocks == (depth - 1,)
    encoder = dit_encoder(adapter.denoiser, depth)
    labels = ctx.conditioning["class_labels"]
    assert torch.equal(encoder(ctx.noisy_latents, ctx.timesteps, labels), ctx.hidden[depth - 1])
    every_token = torch.arange(16).expand(BATCH, 16)  # 8x8 latents, patch 2
    assert torch.equal(encoder(ctx.noisy_latents, ctx.timesteps, labels, every_token), ctx.hidden[depth - 1])
    # The teacher starts as a copy: at the student's own input it reproduces the student's tokens.
    teacher_tokens = term.teacher["encoder"](ctx.noisy_latents, ctx.timesteps, labels)
    assert torch.equal(teacher_tokens, ctx.hidden[depth - 1])


def test_the_term_trains_the_encoder_and_head_but_never_the_teacher(pipeline):
    adapter, process, term, _ = _setup(pipeline, sddit_encoder_depth=1)
    ctx = _context(adapter, process, term, step=0)
    value, logs = term.loss(ctx)
    assert value.shape == (BATCH,) and value.dtype == torch.float32 and set(logs) == {
        "loss_sddit", "sddit_student_teacher_cos"}
    value.mean().backward()  # the term alone
    blocks = adapter.denoiser.transformer_blocks
    for module in (adapter.denoiser.pos_embed, blocks[0], term.student_head):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, module
    assert all(p.grad is None for p in blocks[1].parameters())  # beyond the encoder: untouched by the term
    assert all(not p.requires_grad and p.grad is None for p in term.teacher.parameters())


def test_the_teacher_is_the_ema_of_the_student(pipeline):
    decay = 0.7
    adapter, process, term, optimizer = _setup(pipeline, sddit_ema_decay=decay)
    student = torch.nn.ModuleDict({"encoder": term.student_encoder, "head": term.student_head})
    expected = _head_and_encoder(student)  # T_0 = S_0
    for step in range(3):
        _train_step(adapter, process, term, optimizer, step)
        current = _head_and_encoder(student)
        expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in expected}  # T_k = d T_{k-1} + (1-d) S_k
    teacher = _head_and_encoder(term.teacher)
    assert teacher.keys() == expected.keys()
    assert max((teacher[k] - expected[k]).abs().max().item() for k in teacher) < 1e-6
    # ... and the teacher did move, and lags the student
    moved = (teacher["encoder.blocks.0.attn1.to_q.weight"] - pipeline.transformer.transformer_blocks[0]
             .attn1.to_q.weight).abs().max().item()
    lag = (teacher["encoder.blocks.0.attn1.to_q.weight"] - current["encoder.blocks.0.attn1.to_q.weight"]).abs().max()
    assert moved > 1e-6 and lag.item() > 1e-6


def test_with_lora_the_teacher_follows_the_lora_weights_and_the_frozen_base_stays(pipeline):
    adapter, process, term, optimizer = _setup(pipeline, lora_rank=2, sddit_ema_decay=0.5)
    before = _head_and_encoder(term.teacher)
    _train_step(adapter, process, term, optimizer, 0)
    after = _head_and_encoder(term.teacher)
    lora_b = [k for k in after if "lora_B" in k and k.startswith("encoder.blocks.0.")]
    assert lora_b and all((after[k] - before[k]).abs().max() > 0 for k in lora_b)  # lora_B starts at 0 and moved
    base = "encoder.blocks.0.attn1.to_q.base_layer.weight"
    assert torch.equal(after[base], before[base])


def test_dino_loss_is_the_centred_sharpened_cross_entropy():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.2, -0.3, 0.4]])
    center = torch.tensor([0.1, 0.2, -0.1])
    tau_s, tau_t = 0.5, 0.1
    expected = []
    for s, t in zip(student.tolist(), teacher.tolist()):
        pt = [math.exp((ti - ci) / tau_t) for ti, ci in zip(t, center.tolist())]
        pt = [p / sum(pt) for p in pt]
        log_z = math.log(sum(math.exp(si / tau_s) for si in s))
        expected.append(-sum(p * (si / tau_s - log_z) for p, si in zip(pt, s)))
    got = dino_loss(student, teacher, center, tau_s, tau_t)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)
    # no gradient reaches the teacher's outputs
    teacher.requires_grad_(True)
    dino_loss(student.requires_grad_(True), teacher, center, tau_s, tau_t).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_cosine_loss():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert torch.allclose(cosine_loss(a, b), torch.tensor([0.0, 1.0, 2.0]), atol=1e-6)


def test_the_centre_moves_by_the_momentum_rule():
    centre = Centre(2, momentum=0.9)
    centre.value.copy_(torch.tensor([1.0, -1.0]))
    centre.update(torch.tensor([4.0, 2.0]), torch.tensor(2.0))  # batch mean (2, 1)
    assert torch.allclose(centre.value, torch.tensor([0.9 + 0.2, -0.9 + 0.1]))


def test_the_term_updates_the_centre_from_the_updates_teacher_outputs(pipeline):
    adapter, process, term, _ = _setup(pipeline, sddit_center_momentum=0.8)
    stale = _context(adapter, process, term, step=0, seed=5)
    term.loss(stale)  # an update that was skipped: no phase ran for step 0
    ctxs = [_context(adapter, process, term, step=1, seed=s) for s in (1, 2)]  # two micro-batches of step 1
    for ctx in ctxs:
        term.loss(ctx)
    outputs = torch.cat([term._teacher_out(ctx) for ctx in ctxs])
    assert torch.equal(term.center.value, torch.zeros(16))  # no move before the phase
    term.phase(ctxs[-1], update=None)
    assert torch.allclose(term.center.value, 0.2 * outputs.mean(dim=0), atol=1e-7)
    assert set(term.state()) == {"teacher", "center"}


def test_the_lazy_term_pushes_on_every_nth_update_at_n_times_lambda_and_the_teacher_follows_every_update(pipeline):
    adapter, process, term, optimizer = _setup(pipeline, sddit_every=3, sddit_center_momentum=0.8)
    assert [term.weight(step) for step in range(7)] == pytest.approx([0.3, 0, 0, 0.3, 0, 0, 0.3])  # mean 0.1
    assert "on one update in 3 at lambda x 3" in term.summary_lines(adapter.denoiser)[0]
    centres, teachers = [], []
    for step in range(4):  # as the loop runs it: the term's loss only where its weight is > 0
        ctx = _context(adapter, process, term, step)
        loss = torch.nn.functional.mse_loss(ctx.model_pred, ctx.noise)
        if term.weight(step) > 0:
            loss = loss + term.weight(step) * term.loss(ctx)[0].mean()
        loss.backward()
        head_pushed = all(p.grad is not None for p in term.student_head.parameters())
        assert head_pushed == (step % 3 == 0), step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        term.phase(ctx, update=None)
        centres.append(term.center.value.clone())
        teachers.append(term.teacher["encoder"].blocks[0].attn1.to_q.weight.clone())
    # the centre moves on the term's updates only (0 and 3), the teacher's EMA on every update
    assert [not torch.equal(a, b) for a, b in zip([torch.zeros(16)] + centres, centres)] == [True, False, False, True]
    assert all(not torch.equal(a, b) for a, b in zip(teachers, teachers[1:]))
    with pytest.raises(ConfigError, match="sddit_every"):
        _config(sddit_every=0)

def test_a_noise_band_masks_the_loss_outside_it_and_the_two_halves_add_up_to_the_full_term(pipeline):
    timesteps = torch.tensor([10, 499, 500, 990])
    losses, grads = {}, {}
    for name, band in {"full": {}, "low": {"sddit_t_max": 500}, "high": {"sddit_t_min": 500}}.items():
        torch.manual_seed(0)  # the same head for each
        adapter, process, term, _ = _setup(pipeline, **band)
        ctx = _context(adapter, process, term, step=0, timesteps=timesteps)
        value, logs = term.loss(ctx)
        losses[name] = value.detach()
        weight = adapter.denoiser.transformer_blocks[0].attn1.to_q.weight  # in the encoder the term trains
        grads[name] = [torch.autograd.grad(value[i], weight, retain_graph=True)[0] for i in range(BATCH)]
        if band:
            assert logs["sddit_band_share"] == pytest.approx(0.5)
            assert "on timesteps [" in term.summary_lines(adapter.denoiser)[0]
    # the same weights and batch: the full term per sample, zero outside the band, and low + high = full
    assert torch.equal(losses["low"], losses["full"] * torch.tensor([1.0, 1, 0, 0]))
    assert torch.equal(losses["high"], losses["full"] * torch.tensor([0.0, 0, 1, 1]))
    assert torch.allclose(losses["low"] + losses["high"], losses["full"])
    assert (losses["full"] > 0).all()
    for i in (2, 3):  # an out-of-band sample pushes nothing through the encoder; an in-band one does
        assert not grads["low"][i].any() and grads["high"][i].any()
        assert not grads["high"][3 - i].any() and grads["low"][3 - i].any()
    with pytest.raises(ConfigError, match="sddit_t_max"):
        _config(sddit_t_min=500, sddit_t_max=500)
    with pytest.raises(ConfigError, match="sddit_t_min"):
        _config(sddit_t_min=-1)
    with pytest.raises(ConfigError, match="sddit_t_min.*timesteps run 0..999"):  # a band past the schedule
        _setup(pipeline, sddit_t_min=1000)


def test_an_encoder_scoped_band_trains_the_head_on_every_sample_and_the_denoiser_on_the_band_only(pipeline):
    timesteps = torch.tensor([10, 499, 500, 990])
    grads = {}
    for name, band in {"full": {}, "loss": {"sddit_t_min": 500},
                       "encoder": {"sddit_t_min": 500, "sddit_band_scope": "encoder"}}.items():
        torch.manual_seed(0)  # the same head for each
        adapter, process, term, _ = _setup(pipeline, **band)
        ctx = _context(adapter, process, term, step=0, timesteps=timesteps)
        value, logs = term.loss(ctx)
        encoder = adapter.denoiser.transformer_blocks[0].attn1.to_q.weight
        head = list(term.student_head.parameters())
        grads[name] = torch.autograd.grad(value.mean(), [encoder, *head], retain_graph=True)
        if name == "encoder":
            assert logs["sddit_band_share"] == pytest.approx(0.5)
            assert "the head learns on every timestep" in term.summary_lines(adapter.denoiser)[0]
            # an out-of-band sample still pushes the head, but nothing through the encoder
            out_of_band = torch.autograd.grad(value[0], [encoder, head[0]], retain_graph=True, allow_unused=True)
            assert out_of_band[0] is None or not out_of_band[0].any()
            assert out_of_band[1].abs().sum() > 0
    # the denoiser gets the loss-masked band's push, exactly; the head the unbanded term's
    assert torch.allclose(grads["encoder"][0], grads["loss"][0], atol=1e-7) and grads["loss"][0].abs().sum() > 0
    for scoped, full in zip(grads["encoder"][1:], grads["full"][1:]):
        assert torch.allclose(scoped, full, atol=1e-7)
    assert not all(torch.allclose(f, m, atol=1e-7) for f, m in zip(grads["full"][1:], grads["loss"][1:]))
    with pytest.raises(ConfigError, match="sddit_band_scope.*no noise band"):
        _config(sddit_band_scope="encoder")


def test_the_cosine_option_has_no_centre(pipeline):
    adapter, process, term, optimizer = _setup(pipeline, sddit_loss="cosine")
    assert term.center is None and set(term.state()) == {"teacher"}
    ctx = _context(adapter, process, term, step=0)
    value, _ = term.loss(ctx)
    student = term.student_head(ctx.hidden[1].mean(dim=1))
    assert torch.allclose(value, cosine_loss(student, term._teacher_out(ctx)))


def test_the_teacher_sees_the_minimum_noise_level_with_the_same_noise(pipeline):
    adapter, process, term, _ = _setup(pipeline)
    ctx = _context(adapter, process, term, step=0)
    seen = {}
    hook = term.teacher["encoder"].pos_embed.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    block_hook = term.teacher["encoder"].blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(t=kwargs["timestep"]), with_kwargs=True)
    term.loss(ctx)
    hook.remove(), block_hook.remove()
    zero = torch.zeros_like(ctx.timesteps)
    assert torch.equal(seen["t"], zero)
    assert torch.equal(seen["x"], process.add_noise(ctx.latents, ctx.noise, zero))


@pytest.mark.parametrize("ratio, kept", [(0.5, 8), (0.3, 12)])
def test_masking_runs_the_student_encoder_on_the_kept_tokens(pipeline, ratio, kept):
    adapter, process, term, _ = _setup(pipeline, sddit_mask_ratio=ratio)
    assert term.feature_blocks == ()  # the main forward's hidden states are not used
    ctx = _context(adapter, process, term, step=0)
    shapes = []
    block = adapter.denoiser.transformer_blocks[0]
    hook = block.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    value, _ = term.loss(ctx)
    hook.remove()
    assert shapes == [torch.Size([BATCH, kept, 16])]  # the student's masked pass (the teacher has its own blocks)
    value.mean().backward()
    assert adapter.denoiser.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


def test_a_model_without_enough_blocks_is_refused_in_one_line(pipeline):
    with pytest.raises(ConfigError, match=r"^sddit_encoder_depth: is 3, but this DiT has only 3 blocks.*"
                                          r"pass --sddit_encoder_depth 1\.\.2$"):
        _setup(pipeline, sddit_encoder_depth=3)


def test_stable_diffusion_is_refused_before_loading():
    from sadm_finetune.families.sd import StableDiffusionAdapter

    with pytest.raises(ConfigError, match=r"^sddit_weight: SD-DiT needs a DiT-style transformer") as error:
        StableDiffusionAdapter.check_config(_config())
    assert "\n" not in str(error.value)
    StableDiffusionAdapter.check_config(_config(sddit_weight=0))  # off: no error


# -- end to end ------------------------------------------------------------------------------------------

SDDIT = ["--sddit_weight", "0.1", "--sddit_encoder_depth", "1", "--sddit_head_dim", "32",
         "--sddit_head_hidden_dim", "32", "--structure_weight", "0"]


def _scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_a_run_with_sddit_logs_and_exports_a_stock_pipeline(tmp_path, stock_diffusers):
    from launch import tiny_run_args, train_in_process
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2, num_layers=2)
    data = build_image_folder(tmp_path / "data")
    runs = {}
    for ratio, steps, every in (("0.5", 3, "2"), ("0", 1, "1")):
        out = tmp_path / f"mask-{ratio}"
        proc = train_in_process(tiny_run_args(base, data, out, steps=steps) + SDDIT + ["--sddit_mask_ratio", ratio,
                                                                                     "--sddit_every", every])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ratio] = _scalars(out)
    out = tmp_path / "mask-0.5"
    logged = runs["0.5"]
    assert {"loss_sddit", "sddit_student_teacher_cos", "sddit_weight", "loss_diffusion"} <= logged.keys()
    # every second update (0 and 2) at twice lambda: the loop computes, and logs, the term on those only
    assert logged["sddit_weight"] == pytest.approx([2 * float(SDDIT[1]), 0.0, 2 * float(SDDIT[1])])
    assert len(logged["loss_sddit"]) == 2 and all(math.isfinite(v) for v in logged["loss_sddit"])
    # The mask touches the term's own student pass only: step 1's diffusion loss is the unmasked run's.
    assert abs(logged["loss_diffusion"][0] - runs["0"]["loss_diffusion"][0]) < 1e-6
    assert logged["loss_sddit"][0] != runs["0"]["loss_sddit"][0]

    # The export is the base's layout: no head, no teacher; stock diffusers reloads and samples it.
    base_keys = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors")).keys()
    assert load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")).keys() == base_keys
    assert not any("sddit" in p.name or "teacher" in p.name for p in out.rglob("*") if p.is_file())
    assert stock_diffusers.load(out, class_labels=[0, 1]) == {
        "cls": "DiTPipeline", "shape": [2, 32, 32, 3], "finite": True, "labels": {"class_0": 0, "class_1": 1},
        "sadm_finetune_imported": False}


def _state_names(path):
    """state key -> tensor name in a CheckpointState safetensors file (its JSON skeleton), and its metadata."""
    from safetensors import safe_open

    from sadm_finetune.train.checkpointing import _STATE_KEY

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return {key: node["T"] for key, node in json.loads(metadata[_STATE_KEY])["d"]}, metadata


def _nudge_state(path, key, index):
    names, metadata = _state_names(path)
    tensors = load_file(str(path))
    tensors[names[key]][index] += 1.0
    save_file(tensors, str(path), metadata=metadata)


def _state_tensor(out, name, key):
    path = out / "checkpoints" / "checkpoint-4" / f"sddit_{name}.safetensors"
    return load_file(str(path))[_state_names(path)[0][key]]


@pytest.mark.slow
def test_resume_restores_the_teacher_and_the_centre(tmp_path):
    from launch import tiny_run_args, train_in_process
    from checkpoint_weights import _max_diff, _resumed_step, _weights
    from tiny_pipelines import build_image_folder, build_tiny_dit_pipeline

    base = build_tiny_dit_pipeline(tmp_path / "base", num_classes=2, num_layers=2)
    data = build_image_folder(tmp_path / "data", per_class=5)  # 10 images, batch 4: epochs of 2 steps
    extra = SDDIT + ["--checkpointing_steps", "2", "--report_to", "none", "--sddit_ema_decay", "0.5"]

    def run(name, checkpoint=None, nudge=None):
        out = tmp_path / name
        if checkpoint is not None:
            (out / "checkpoints").mkdir(parents=True)
            shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
            if nudge:
                nudge(out / "checkpoints" / checkpoint.name)
        args = tiny_run_args(base, data, out, steps=4) + extra
        proc = train_in_process(args + (["--resume_from_checkpoint", "latest"] if checkpoint else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        if checkpoint is not None:
            assert _resumed_step(proc.stdout + proc.stderr) == 2
        return out

    full = run("full")
    ckpt = full / "checkpoints" / "checkpoint-2"
    assert (ckpt / "sddit_teacher.safetensors").is_file() and (ckpt / "sddit_center.safetensors").is_file()
    centre = load_file(str(ckpt / "sddit_center.safetensors"))
    assert centre and next(iter(centre.values())).abs().sum() > 0  # the centre moved and was saved

    def state(out, name):
        return load_file(str(out / "checkpoints" / "checkpoint-4" / f"sddit_{name}.safetensors"))

    resumed = run("resumed", ckpt)
    assert _max_diff(_weights(full / "transformer"), _weights(resumed / "transformer")) <= 1e-6
    assert _max_diff(state(full, "teacher"), state(resumed, "teacher")) <= 1e-6
    assert _max_diff(state(full, "center"), state(resumed, "center")) <= 1e-6

    # The resumed run continued from the checkpoint's teacher and centre (a fresh copy of the student, or a
    # zero centre, would not carry these nudges). The teacher's nudge is in the class embedding of a class
    # the data never has, so it changes no output: two EMA steps of decay 0.5 keep exactly a quarter of it;
    # two centre updates of momentum 0.9 keep 0.81 of the centre's.
    unseen = ("encoder.blocks.0.norm1.emb.class_embedder.embedding_table.weight", (999, 0))
    nudged = run("nudged", ckpt, nudge=lambda folder: (_nudge_state(folder / "sddit_teacher.safetensors", *unseen),
                                                       _nudge_state(folder / "sddit_center.safetensors", "center", 0)))
    teacher_shift = (_state_tensor(nudged, "teacher", unseen[0]) - _state_tensor(resumed, "teacher", unseen[0]))
    centre_shift = _state_tensor(nudged, "center", "center") - _state_tensor(resumed, "center", "center")
    assert abs(teacher_shift[unseen[1]].item() - 0.25) < 1e-4, teacher_shift[unseen[1]]
    assert abs(centre_shift[0].item() - 0.81) < 1e-4, centre_shift[0]
    assert json.loads((ckpt / "train_state.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_stable_diffusion_with_sddit_fails_in_one_line(tmp_path):
    """Through the CLI: the adapter's check (test_stable_diffusion_is_refused_before_loading) reaches the user as
    sadm-train's one-line usage error, exit status 2."""
    from launch import tiny_run_args, train_in_process
    from tiny_sd import build_captioned_folder, build_tiny_sd_pipeline

    base = build_tiny_sd_pipeline(tmp_path / "base")
    data = build_captioned_folder(tmp_path / "data")
    proc = train_in_process(tiny_run_args(base, data, tmp_path / "out") + SDDIT)
    lines = [ln for ln in proc.stderr.splitlines() if "sadm-train: error:" in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "sddit_weight: SD-DiT needs a DiT-style transformer" in lines[0] and "--sddit_weight" in lines[0]


@pytest.mark.slow
def test_two_processes_keep_the_head_and_teacher_in_step(repa_sddit_ddp_run):
    """DDP with the masked student pass outside the wrapped forward, the centre all-reduced, and the lazy term's
    head idle on one update (the 2-process run is shared with test_repa: REPA and SD-DiT on together, conftest.py)."""
    assert {"denoiser", "sddit.head", "sddit_teacher"} <= set(repa_sddit_ddp_run.identical), \
        repa_sddit_ddp_run.text[-3000:]
