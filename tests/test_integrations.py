"""Integrations with the real Lightning, transformers and accelerate packages, and AMP.

Each test trains a small model a few steps with mixed ZO/FO groups and checks that the loss falls,
that optimizer steps are neither skipped nor doubled, and that ZO probes keep no autograd graph:
autograd saves no tensor during a probe, and a probe's peak memory (measured with the torch
profiler) is within 10% of a no-grad forward on the same batch.
"""

import contextlib
import importlib.util
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from hybridzo import GroupRule, HybridZOOptimizer, build_param_groups

BATCH, FEATURES, HIDDEN = 128, 16, 128


# ------------------------------------------------------------ instrumentation


def run_with_peak_memory(fn):
    """Run ``fn()``; return its result and the peak CPU memory it allocated, in bytes.

    The profiler attributes each allocation and free to the operator that made it; the running
    sum over operators in time order is the memory in use above the start.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    in_use = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        in_use += event.self_cpu_memory_usage
        peak = max(peak, in_use)
    return result, peak


class ClosureCallRecorder:
    """Records, for each closure call of an optimizer's steps, the tensors autograd saved and the peak memory.

    It replaces ``optimizer.step`` on the instance, so it sees the steps any framework takes.
    ``calls[step][i]`` is ``(saved_tensors, peak_bytes)`` of the step's i-th closure call (the
    first is the FO pass when there are FO groups); memory is measured in the first
    ``measured_steps`` steps only (None afterwards), to keep the profiler's cost down.
    """

    def __init__(self, optimizer, measured_steps=2):
        self.optimizer = optimizer
        self.measured_steps = measured_steps
        self.calls = []
        self._step = optimizer.step
        optimizer.step = self._recording_step

    def _recording_step(self, closure=None):
        measure = len(self.calls) < self.measured_steps
        calls = []

        def recorded():
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
                if measure:
                    loss, peak = run_with_peak_memory(closure)
                else:
                    loss, peak = closure(), None
            calls.append((len(saved), peak))
            return loss

        loss = self._step(recorded)
        self.calls.append(calls)
        return loss

    def assert_probes_keep_no_graph(self, reference_peak, first_probe):
        """Every closure call from ``first_probe`` on saved nothing and peaked like a no-grad forward."""
        assert self.calls
        for calls in self.calls:
            assert len(calls) == self.optimizer.last_step_info["forwards"]
            for saved, peak in calls[first_probe:]:
                assert saved == 0
                if peak is not None:
                    assert peak == pytest.approx(reference_peak, rel=0.1)


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1)
    )


def mixed_groups(mlp):
    """ZO on the two hidden layers (sign-normalised, as MoZO), AdamW backprop on the output layer."""
    return [
        {"params": [*mlp[0].parameters(), *mlp[2].parameters()], "mode": "zo", "sign": "coordinate",
         "eps": 1e-3, "lr": 5e-4},
        {"params": mlp[4].parameters(), "mode": "fo", "rule": "adamw", "lr": 3e-2},
    ]


def regression_data(batches):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * BATCH, FEATURES, generator=g)
    y = 0.5 * x[:, :4].sum(1, keepdim=True)
    return torch.utils.data.TensorDataset(x, y)


def no_grad_forward_peak(forward, context=contextlib.nullcontext):
    """Peak memory of ``forward()`` under ``torch.no_grad()`` and ``context()`` (the probes' autocast)."""

    def measured():
        with torch.no_grad(), context():
            return forward()

    measured()  # warm-up: first calls allocate lasting caches
    return run_with_peak_memory(measured)[1]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; give each test its own."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_importing_hybridzo_imports_no_framework():
    frameworks = ["lightning", "pytorch_lightning", "transformers", "accelerate"]
    code = (
        "import sys, hybridzo, hybridzo.integrations; "
        f"print([m for m in {frameworks} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module, absent", [
    ("transformers", ["transformers"]),
    ("transformers", ["accelerate"]),
    ("accelerate", ["accelerate"]),
    ("lightning", ["lightning", "pytorch_lightning"]),
])
def test_an_integration_without_its_framework_names_the_extra_and_the_package(module, absent):
    # The other packages the integration imports must be there, or their absence is reported first.
    needs = {"transformers": ["accelerate", "transformers"], "accelerate": ["accelerate"], "lightning": []}[module]
    missing = [name for name in needs if name not in absent and importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{missing} not installed (pip install \"hybridzo[integrations]\")")
    # A fresh interpreter in which the frameworks in `absent` cannot be imported (None in sys.modules).
    code = (
        f"import sys\nsys.modules.update(dict.fromkeys({absent}))\n"
        "try:\n"
        f"    import hybridzo.integrations.{module}\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error.name, '|', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kind, name, message = result.stdout.replace(" | ", " ", 1).split(" ", 2)
    assert (kind, name) == ("ModuleNotFoundError", absent[0])
    assert f"hybridzo.integrations.{module} needs the package {absent[0]!r}" in message
    assert 'pip install "hybridzo[integrations]"' in message


# ------------------------------------------------------------------ Lightning


def lightning_regressor(pl, groups_of, use_mixin=True, **optimizer_options):
    """A LightningModule around ``make_mlp()`` that records what Lightning reports per step."""
    from hybridzo.integrations.lightning import HybridZOMixin

    bases = (HybridZOMixin, pl.LightningModule) if use_mixin else (pl.LightningModule,)

    class Regressor(*bases):
        def __init__(self):
            super().__init__()
            self.mlp = make_mlp()
            self.hooks = Counter()
            self.reported = []  # per step: (outputs["loss"], logged train_loss, optimizer's loss at theta)

        def loss(self, batch):
            x, y = batch
            return nn.functional.mse_loss(self.mlp(x), y)

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("train_loss", loss)
            return loss

        def on_before_backward(self, loss):
            self.hooks["on_before_backward"] += 1

        def on_train_batch_end(self, outputs, batch, batch_idx):
            optimizer = self.trainer.optimizers[0]
            self.reported.append((
                float(outputs["loss"]),
                float(self.trainer.callback_metrics["train_loss"]),
                optimizer.last_step_info.get("loss"),
            ))

        def configure_optimizers(self):
            optimizer = HybridZOOptimizer(groups_of(self.mlp), seed=0, **optimizer_options)
            self.recorder = ClosureCallRecorder(optimizer)
            return optimizer

    return Regressor()


def fit(pl, module, steps, batches=4, **trainer_options):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_options,
    )
    loader = torch.utils.data.DataLoader(regression_data(batches), batch_size=BATCH)
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_mixed_groups_train_and_probes_keep_no_graph(precision):
    pl = pytest.importorskip("lightning.pytorch")
    steps = 12
    module = lightning_regressor(pl, mixed_groups, conservative=True)
    trainer = fit(pl, module, steps, precision=precision, gradient_clip_val=1.0)

    optimizer = trainer.optimizers[0]
    assert trainer.global_step == steps
    assert [g["steps"] for g in optimizer.param_groups] == [steps, steps]
    assert optimizer.last_step_info["forwards"] == 5  # FO pass, +-eps, two candidates
    assert module.hooks["on_before_backward"] == steps  # Lightning's backward path: once per step
    # Lightning reports, and self.log records, the loss at theta from the FO pass, not a probe's.
    for output, logged, at_theta in module.reported:
        assert output == logged == pytest.approx(at_theta, rel=1e-6)
    losses = [at_theta for _, _, at_theta in module.reported]
    assert losses[-1] < 0.5 * losses[0]

    batch = regression_data(1).tensors
    # The probes run under the precision plugin's context (bf16 autocast, without its cast cache).
    reference = no_grad_forward_peak(lambda: module.loss(batch), trainer.precision_plugin.train_step_context)
    module.recorder.assert_probes_keep_no_graph(reference, first_probe=1)
    assert all(calls[0][0] > 0 for calls in module.recorder.calls)  # the FO pass does record a graph


def test_lightning_pure_zo_first_forward_keeps_no_graph_either():
    pl = pytest.importorskip("lightning.pytorch")
    steps = 12
    # Central estimator, no candidates: the step's first forward is already a probe.
    module = lightning_regressor(
        pl, lambda mlp: [{"params": mlp.parameters(), "mode": "zo", "sign": "coordinate"}], lr=1e-2
    )
    trainer = fit(pl, module, steps, batches=1)

    optimizer = trainer.optimizers[0]
    assert trainer.global_step == steps
    assert optimizer.last_step_info["forwards"] == 2
    reference = no_grad_forward_peak(lambda: module.loss(regression_data(1).tensors))
    module.recorder.assert_probes_keep_no_graph(reference, first_probe=0)
    losses = [at_theta for _, _, at_theta in module.reported]
    assert losses[-1] < 0.9 * losses[0]


def test_lightning_closure_without_the_mixin_records_a_graph_in_probes():
    """Why the mixin exists, and proof that the memory check can fail."""
    pl = pytest.importorskip("lightning.pytorch")
    module = lightning_regressor(pl, mixed_groups, use_mixin=False)
    fit(pl, module, 2)
    reference = no_grad_forward_peak(lambda: module.loss(regression_data(1).tensors))
    for calls in module.recorder.calls:
        for saved, peak in calls[1:]:
            assert saved > 0
            assert peak > 1.1 * reference


def test_lightning_refuses_grad_scaler_and_accumulation():
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="bf16-mixed"):
        fit(pl, lightning_regressor(pl, mixed_groups), 1, plugins=[scaler])
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        fit(pl, lightning_regressor(pl, mixed_groups), 1, accumulate_grad_batches=2)


# --------------------------------------------------------------- transformers


def training_arguments(tmp_path, **overrides):
    transformers = pytest.importorskip("transformers")
    options = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1, seed=0, data_seed=0, learning_rate=1e-2, lr_scheduler_type="linear",
    )
    return transformers.TrainingArguments(**{**options, **overrides})


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def token_classification_data(n=64, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, length), generator=g)
    labels = (ids[:, 0] < 32).long()  # the class is given by the first token
    return [{"input_ids": i, "labels": label} for i, label in zip(ids, labels)]


def test_trainer_bf16_mixed_groups_train_and_probes_keep_no_graph(tmp_path, fresh_accelerate_state):
    transformers = pytest.importorskip("transformers")
    from hybridzo.integrations.transformers import HybridZOTrainer

    steps, batch_size = 16, 16
    model = tiny_bert()
    groups = build_param_groups(
        model.named_parameters(),
        [GroupRule(branch=r"^bert\.encoder\.", options={"mode": "zo", "eps": 1e-3})],
        default={"mode": "fo", "rule": "adamw"},
    )
    data = token_classification_data()
    trainer = HybridZOTrainer(
        model=model, train_dataset=data,
        args=training_arguments(tmp_path, max_steps=steps, per_device_train_batch_size=batch_size, bf16=True),
        param_groups=groups, optimizer_options={"conservative": True, "seed": 0},
    )
    optimizer = trainer.create_optimizer()  # what train() does first
    recorder = ClosureCallRecorder(optimizer)
    logits_dtypes = set()
    model.classifier.register_forward_hook(lambda module, inputs, output: logits_dtypes.add(output.dtype))
    trainer.train()

    assert logits_dtypes == {torch.bfloat16}
    assert trainer.state.global_step == steps
    assert [g["steps"] for g in optimizer.param_groups] == [steps, steps]  # no skipped or doubled step
    assert optimizer.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0] == 0.0  # linear decay
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    assert losses[-1] < 0.5 * losses[0]

    batch = transformers.default_data_collator(data[:batch_size])
    model.train()  # the probes run in training mode (dropout masks replayed)
    reference = no_grad_forward_peak(lambda: model(**batch).loss)  # accelerate's autocast wraps forward
    recorder.assert_probes_keep_no_graph(reference, first_probe=1)


class TrainerRegressor(nn.Module):
    """``make_mlp()`` in the Trainer's convention: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.mlp = make_mlp()

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.mlp(x), labels)}


def test_trainer_gradient_accumulation_equals_the_larger_batch(tmp_path, fresh_accelerate_state):
    """The closure spans the accumulation window: 2 x 32 micro-batches take the steps of 64."""
    pytest.importorskip("transformers")
    from hybridzo.integrations.transformers import HybridZOTrainer

    dataset = regression_data(1)
    data = [{"x": x, "labels": y} for x, y in zip(*dataset.tensors)]
    results = []
    for accumulation in (1, 2):
        model = TrainerRegressor()
        trainer = HybridZOTrainer(
            model=model, train_dataset=data,
            args=training_arguments(tmp_path, max_steps=6, per_device_train_batch_size=64 // accumulation,
                                    gradient_accumulation_steps=accumulation, max_grad_norm=0.5),
            param_groups=mixed_groups(model.mlp), optimizer_options={"conservative": True, "seed": 0},
        )
        trainer.train()
        assert trainer.hybridzo_optimizer.param_groups[0]["steps"] == 6
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (losses_1, params_1), (losses_2, params_2) = results
    assert losses_2 == pytest.approx(losses_1, rel=1e-4)
    torch.testing.assert_close(params_2, params_1, rtol=1e-4, atol=1e-5)
    assert losses_1[-1] < losses_1[0]


def test_trainer_refuses_fp16_grad_scaler(tmp_path, fresh_accelerate_state):
    pytest.importorskip("transformers")
    from hybridzo.integrations.transformers import HybridZOTrainer

    model = TrainerRegressor()
    trainer = HybridZOTrainer(
        model=model, args=training_arguments(tmp_path, max_steps=1), train_dataset=[],
        param_groups=mixed_groups(model.mlp),
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16=True sets up on a GPU
    with pytest.raises(ValueError, match="bf16=True"):
        trainer.create_optimizer()


# ----------------------------------------------------------------- accelerate


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_steps_like_the_plain_loop(mixed_precision, fresh_accelerate_state):
    accelerate = pytest.importorskip("accelerate")
    from hybridzo.integrations.accelerate import accelerated_step

    dataset = regression_data(4)
    bf16 = mixed_precision == "bf16"
    runs = []
    for use_accelerate in (False, True):
        model = make_mlp()
        optimizer = HybridZOOptimizer(mixed_groups(model), conservative=True, seed=0)
        recorder = ClosureCallRecorder(optimizer, measured_steps=1)  # the accelerate run's is checked below
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
        losses = []
        if use_accelerate:
            accelerator = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision)
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        for _ in range(3):
            for x, y in loader:
                if use_accelerate:
                    def closure():  # torch style: zero_grad and backward through accelerate
                        optimizer.zero_grad()
                        loss = nn.functional.mse_loss(model(x), y)
                        accelerator.backward(loss)
                        return loss

                    losses.append(accelerated_step(optimizer, closure))
                else:
                    def closure():  # what accelerate does: autocast the forward, fp32 outputs
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                            prediction = model(x)
                        return nn.functional.mse_loss(prediction.float(), y)

                    losses.append(float(optimizer.step(closure)))
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (plain_losses, plain_params), (accelerated_losses, accelerated_params) = runs
    assert accelerated_losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(accelerated_params, plain_params))
    assert plain_losses[-1] < 0.5 * plain_losses[0]
    x, y = dataset.tensors[0][:BATCH], dataset.tensors[1][:BATCH]
    reference = no_grad_forward_peak(lambda: nn.functional.mse_loss(model(x), y))  # the prepared model
    recorder.assert_probes_keep_no_graph(reference, first_probe=1)


def test_accelerated_step_refuses_accumulation_and_grad_scaler(fresh_accelerate_state):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    from hybridzo.integrations.accelerate import accelerated_step

    model = make_mlp()
    x, y = regression_data(1).tensors
    closure = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = accelerator.prepare(HybridZOOptimizer(mixed_groups(model), seed=0))
    with accelerator.accumulate(model), pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        accelerated_step(optimizer, closure)

    scaled = AcceleratedOptimizer(HybridZOOptimizer(mixed_groups(model)), scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="bf16"):
        accelerated_step(scaled, closure)
    with pytest.raises(TypeError, match="HybridZOOptimizer"):
        accelerated_step(AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)), closure)


# ------------------------------------------------------- DDP with accumulation


def test_accumulation_closure_under_ddp_equals_the_whole_batch(tmp_path):
    """The pattern of docs/distributed.md: backward per micro-batch, no_sync on all but the last."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    x, y = regression_data(1).tensors
    whole = make_mlp()
    whole_optimizer = HybridZOOptimizer(mixed_groups(whole), conservative=True, seed=0)
    model = make_mlp()
    opt = HybridZOOptimizer(mixed_groups(model), conservative=True, seed=0)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for group in opt.param_groups:
            if group["mode"] == "zo":
                for p in group["params"]:
                    p.requires_grad_(False)  # hybridzo perturbs them anyway
        ddp = nn.parallel.DistributedDataParallel(model)
        micro_batches = list(zip(x.chunk(4), y.chunk(4)))
        for _ in range(5):
            def closure():
                opt.zero_grad()
                total = 0.0
                for i, (xb, yb) in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else ddp.no_sync():
                        loss = nn.functional.mse_loss(ddp(xb), yb) / len(micro_batches)
                        loss.backward()  # a no-op during ZO probes
                    total += loss.detach()
                return total

            loss = opt.step(closure)
            whole_loss = whole_optimizer.step(lambda: nn.functional.mse_loss(whole(x), y))
            assert float(loss) == pytest.approx(float(whole_loss), rel=1e-5)
            assert opt.last_step_info["backwards"] == 1 and opt.last_step_info["forwards"] == 5
    finally:
        dist.destroy_process_group()
    for p, q in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert not torch.equal(next(model.parameters()), next(make_mlp().parameters()))


# ------------------------------------------------------------------------ AMP


def test_bf16_autocast_inside_the_closure():
    model = make_mlp()
    optimizer = HybridZOOptimizer(mixed_groups(model), conservative=True, seed=0)
    recorder = ClosureCallRecorder(optimizer)
    x, y = regression_data(1).tensors
    seen_dtypes = set()

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(x)
        seen_dtypes.add(prediction.dtype)
        return nn.functional.mse_loss(prediction.float(), y)

    losses = [float(optimizer.step(closure)) for _ in range(12)]
    assert seen_dtypes == {torch.bfloat16}
    assert isinstance(optimizer.last_step_info["loss"], float)  # losses are compared in fp64
    assert losses[-1] < 0.5 * losses[0]
    reference = no_grad_forward_peak(closure)
    recorder.assert_probes_keep_no_graph(reference, first_probe=1)


def test_grad_scaler_is_refused_with_an_error_about_the_closure():
    model = make_mlp()
    optimizer = HybridZOOptimizer(mixed_groups(model), seed=0)
    scaler = torch.amp.GradScaler("cpu")
    x, y = regression_data(1).tensors
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    with pytest.raises(ValueError, match="closure"):
        scaler.step(optimizer)
