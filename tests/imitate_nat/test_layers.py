"""The CPU dropout (layers.Dropout): same statistics and gradient as inverted dropout."""
import pytest
import torch

from imitate_nat.layers import Dropout


def test_dropout_drops_fraction_p_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = Dropout(0.1).train()
    y = drop(torch.ones(1000, 1000))
    dropped = y.eq(0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002, dropped
    assert abs(y.mean().item() - 1.0) < 0.003          # inverted: E[y] = x
    assert torch.allclose(y[y.ne(0)], torch.tensor(1 / 0.9))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_dropout_rate_follows_p_with_odd_sizes_and_shapes(p):
    torch.manual_seed(1)
    y = Dropout(p).train()(torch.ones(37, 101, 53))   # numel not a multiple of 4
    assert abs(y.eq(0).float().mean().item() - p) < 0.01


def test_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    y = Dropout(0.2).train()(x)
    y.sum().backward()
    kept = y.detach().ne(0)
    assert torch.allclose(x.grad, kept.float() / 0.8)


def test_dropout_is_identity_in_eval_and_at_p0_and_seeded_in_training():
    x = torch.randn(8, 16)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    torch.manual_seed(3)
    a = Dropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(a, Dropout(0.5).train()(x))
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
