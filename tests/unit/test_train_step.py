"""The training step on one process: micro-batches accumulate the plain loss's gradients, clipping, bf16 autocast.

Every parallel layout is checked against the same plain loop in tests/distributed/test_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.losses import masked_diffusion_loss
from dimoo_npu.parallel import ParallelDims, ParallelOptions, parallelize
from dimoo_npu.train.step import TrainStep
from dimoo_npu.utils.errors import InputError
from tests.unit.train_support import masked_batch, small_config


def _single_process_step(model: DiMOOModel, options: ParallelOptions) -> TrainStep:
    part = parallelize(model, ParallelDims(), None, options, torch.device("cpu"))
    assert part is model  # one process: nothing wraps the model
    return TrainStep(part, ParallelDims(), None, options, "cpu")


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_single_process_step_equals_the_plain_loss_and_gradients(recompute):
    torch.manual_seed(0)
    plain = DiMOOModel(small_config())
    model = DiMOOModel(small_config())
    model.load_state_dict(plain.state_dict())
    ids, labels = masked_batch()
    expected = masked_diffusion_loss(plain(ids), labels)
    expected.backward()
    step = _single_process_step(model, ParallelOptions(microbatches=2, recompute=recompute))
    loss = step.forward_backward(ids, labels)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()}
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7)
    norm = step.clip_grad_norm(1e-3)
    assert norm > 1e-3
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_batch_that_does_not_split_into_microbatches_is_refused():
    step = _single_process_step(DiMOOModel(small_config()), ParallelOptions(microbatches=3))
    with pytest.raises(InputError, match="micro-batches"):
        step.forward_backward(*masked_batch(rows=4))


def test_single_process_bf16_computes_in_bf16_and_keeps_fp32_master_weights():
    torch.manual_seed(0)
    model = DiMOOModel(small_config())
    ids, labels = masked_batch()
    expected = float(masked_diffusion_loss(model(ids), labels).detach())
    seen = []
    model.transformer.blocks["0"].q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    step = _single_process_step(model, ParallelOptions(param_dtype=torch.bfloat16))
    loss = float(step.forward_backward(ids, labels))
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert loss != expected and abs(loss - expected) < 1e-2 * expected
