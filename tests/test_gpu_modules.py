"""The Lightning modules on a CUDA device, as a user's ``Trainer(accelerator="gpu")`` runs them: each
technique's fit there (the Triton kernels or the PyTorch path, fused-linear where the heads allow) ends at
the weights a CPU fit on the PyTorch path reaches, and a bf16-mixed fit trains. Without a GPU they are
skipped; ``bench/gpu_check.sh`` runs them on a lent one."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import requires_cuda
from helpers import KINDS, loader, make_batch, make_module, trainer, with_teacher_signal

from lit_distill.losses import DistillationLoss

pytestmark = [
    pytest.mark.gpu,
    requires_cuda,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]


def fitted_weights(kind: str, accelerator: str, backend: str, steps: int = 3) -> dict[str, torch.Tensor]:
    """Every trained weight (the student's, and the co-distilled teacher's) after ``steps`` SGD steps."""
    pl.seed_everything(0)
    module = make_module(kind, loss=DistillationLoss(temperature=2.0, alpha=0.7, backend=backend))
    module.optimizer = lambda params: torch.optim.SGD(params, lr=0.1)
    batch = make_batch(rows=4, length=12, seed=5, padding=[(0, 5), (2, 3)])
    if kind == "offline":
        batch = with_teacher_signal(batch)
    if steps:
        trainer(accelerator=accelerator, devices=1, max_steps=steps).fit(module, loader(*[batch] * steps))
    trained = ("student", "teacher") if kind == "co" else ("student",)
    return {
        f"{name}.{key}": value.detach().cpu().double()
        for name in trained
        for key, value in getattr(module, name).state_dict().items()
    }


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", [*KINDS, "offline"])
def test_a_gpu_fit_reaches_the_cpu_fits_weights(kind, backend):
    on_gpu = fitted_weights(kind, "gpu", backend)
    on_cpu = fitted_weights(kind, "cpu", "torch")
    assert on_gpu.keys() == on_cpu.keys()
    initial = fitted_weights(kind, "cpu", "torch", steps=0)
    moved = max(float((on_cpu[k] - before).abs().max()) for k, before in initial.items())
    assert moved > 1e-3, "the fits did not train"  # so that equal weights mean something
    for key, expected in on_cpu.items():
        torch.testing.assert_close(on_gpu[key], expected, rtol=1e-4, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["soft", "on-policy", "offline"])
def test_a_bf16_mixed_gpu_fit_lowers_the_loss(kind):
    pl.seed_everything(0)
    module = make_module(kind)
    batch = make_batch(padding=[(1, 3)])
    if kind == "offline":
        batch = with_teacher_signal(batch)

    def loss_now():
        module.cuda().eval()  # the trainer's teardown moves the module back to the CPU
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = module.compute_loss({k: v.cuda() for k, v in batch.items()})
        return (out.loss / out.num_tokens).item()

    before = loss_now()
    trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=15).fit(module, loader(batch))
    after = loss_now()
    assert after < 0.8 * before, f"{kind}: loss {before:.4f} -> {after:.4f}"
