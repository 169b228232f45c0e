"""Training and prediction on a CUDA GPU (skipped where there is none).

The CPU path is tested everywhere else; these tests check what only a GPU run does:
mixed precision with channels-last, pinned non-blocking copies, and a checkpoint written
on the GPU that a CPU-only user can load and that predicts the same there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2l_core.augment import AugmentConfig
from s2l_core.checkpoint import load_checkpoint
from s2l_core.config import TrainConfig
from s2l_core.infer import predict_foreground
from s2l_core.metrics import foreground_iou
from s2l_core.predict import load_model
from s2l_core.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FAST = dict(
    epochs=40, batch_size=4, samples_per_epoch=8, warmup_epochs=10, ema_every=1, ema_start=0,
    val_every=10, optimizer="adamw", lr_encoder=3e-3, lr_decoder=1e-2,
    model={"base_channels": 8, "depth": 2}, augment=AugmentConfig(crop_size=64),
)  # fmt: skip


def test_cuda_training_learns_and_its_checkpoint_predicts_alike_on_the_cpu(
    synthetic_samples, tmp_path
):
    train = synthetic_samples(4, ratio=1.0)
    test = synthetic_samples(1, offset=20)[0]
    trainer = Trainer(train, TrainConfig(**FAST), device="cuda", verbose=False)
    assert trainer.device.type == "cuda"
    assert next(trainer.model.parameters()).is_cuda
    history = trainer.fit(progress=False)

    assert np.isfinite(history[["loss", "pce", "pseudo"]].to_numpy()).all()
    assert history["pseudo_active"].iloc[-1]
    assert history["pce"].iloc[-3:].mean() < history["pce"].iloc[:3].mean() / 5
    gpu_prob = trainer.predict(test.image)
    assert gpu_prob.dtype == np.float32 and gpu_prob.shape == test.labels.shape
    assert foreground_iou(gpu_prob > 0.5, test.labels > 0) > 0.7

    trainer.export(tmp_path / "model.pt")
    # Stored on the CPU, so that plain torch.load works where there is no GPU.
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in raw["model"].values())
    assert load_checkpoint(tmp_path / "model.pt")["model_config"] == trainer.model.to_config()
    cpu_model, _ = load_model(tmp_path / "model.pt", device="cpu")
    cpu_prob = predict_foreground(cpu_model, test.image, device="cpu", amp=False)
    # bf16/fp16 autocast on the GPU against float32 on the CPU: close, not equal.
    assert np.abs(cpu_prob - gpu_prob).max() < 0.1
    assert np.mean((cpu_prob > 0.5) == (gpu_prob > 0.5)) > 0.99


def test_cuda_resume_continues_from_a_gpu_checkpoint(synthetic_samples, tmp_path):
    train = synthetic_samples(3)
    config = TrainConfig(**{**FAST, "epochs": 4})
    first = Trainer(train, config, device="cuda", verbose=False)
    first.fit(2, checkpoint=tmp_path / "state.pt", progress=False)
    resumed = Trainer.resume(tmp_path / "state.pt", train, device="cuda", verbose=False)
    assert resumed.epoch == 2 and resumed.iteration == first.iteration
    assert resumed.ema_updates == first.ema_updates
    resumed.fit(progress=False)
    assert resumed.epoch == 4 and len(resumed.history) == 4
