"""The optimizer step inside backward (gpt2ipu/train/optim.py, StepInBackward): bitwise equal to the
ordinary step after backward, taken only when nothing needs every gradient first, and resting on
the one behaviour of torch.optim it relies on (`_step_with_state_of`), checked here against the
installed PyTorch."""

import warnings

import pytest
import torch

from gpt2ipu.model.gpt import GPT, config_for
from gpt2ipu.train import optim
from gpt2ipu.train.optim import has_stepped_in_backward, make_optimizer, train_step

VOCAB = 1000


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_for("gpt2-test", 32, vocab_size=VOCAB))


def tokens(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def assert_same_training_state(model, optimizer, other_model, other_optimizer):
    for p, q in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == other_optimizer.state[q].keys()
        theirs = other_optimizer.state[q]
        assert all(torch.equal(optimizer.state[p][key], theirs[key]) for key in theirs)
    assert optimizer.state_dict()["param_groups"] == other_optimizer.state_dict()["param_groups"]


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_step_in_backward_equals_a_step_after_backward(kind):
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    runs = {}
    for name, max_grad_norm in (("in_backward", float("inf")), ("after_backward", 1e30)):
        model = tiny_model().train()
        optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1, kind=kind)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        norms = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # e.g. the scheduler's "lr_scheduler.step() before optimizer.step()"
            for _step in range(3):
                result = train_step(model, optimizer, [(ids, labels)], loss_chunks={"token_chunks": 2},
                                    max_grad_norm=max_grad_norm)
                scheduler.step()
                norms.append(float(result["grad_norm"]))
                assert all(p.grad is None for p in model.parameters())
        runs[name] = model, optimizer, norms
    (fused, fused_opt, fused_norms), (plain, plain_opt, plain_norms) = runs["in_backward"], runs["after_backward"]
    # Clipping at 1e30 never clips but needs every gradient first: the ordinary path.
    assert has_stepped_in_backward(fused_opt) and not has_stepped_in_backward(plain_opt)
    assert_same_training_state(fused, fused_opt, plain, plain_opt)
    torch.testing.assert_close(fused_norms, plain_norms, rtol=1e-5, atol=0)  # summed in another order


def test_step_in_backward_resumes_from_an_ordinary_checkpoint_and_back():
    """A state_dict saved by either path loads into the other and continues bitwise the same."""
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)

    def run(first_norm, second_norm):
        model = tiny_model().train()
        optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
        train_step(model, optimizer, [(ids, labels)], max_grad_norm=first_norm)
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        saved_optimizer = optimizer.state_dict()
        resumed = tiny_model(seed=1).train()
        resumed.load_state_dict(saved_model)
        resumed_optimizer = make_optimizer(resumed, lr=5e-3, weight_decay=0.1)
        train_step(resumed, resumed_optimizer, [(ids, labels)], max_grad_norm=1e30)   # state exists here
        resumed.load_state_dict(saved_model)
        resumed_optimizer.load_state_dict(saved_optimizer)   # replaces its state and group dicts
        for _ in range(2):
            train_step(resumed, resumed_optimizer, [(ids, labels)], max_grad_norm=second_norm)
        return resumed, resumed_optimizer

    reference = run(1e30, 1e30)
    assert_same_training_state(*run(float("inf"), float("inf")), *reference)
    assert_same_training_state(*run(1e30, float("inf")), *reference)


def test_accumulation_and_clipping_step_after_backward():
    model = tiny_model().train()
    optimizer = make_optimizer(model, lr=1e-2)
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    train_step(model, optimizer, [(ids, labels), (ids, labels)])
    train_step(model, optimizer, [(ids, labels)], max_grad_norm=1.0)
    assert not has_stepped_in_backward(optimizer)
    lamb = make_optimizer(model, lr=1e-2, kind="lamb")
    train_step(model, lamb, [(ids, labels)])
    assert not has_stepped_in_backward(lamb)


def test_a_disabled_grad_scaler_still_steps_in_backward():
    # `gpt2ipu train` always passes a GradScaler, enabled only for fp16.
    model = tiny_model().train()
    optimizer = make_optimizer(model, lr=1e-2)
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    result = train_step(model, optimizer, [(ids, labels)], max_grad_norm=float("inf"), scaler=scaler)
    assert has_stepped_in_backward(optimizer) and float(result["grad_norm"]) > 0


@pytest.mark.parametrize("options", [{"fused": True}, {"foreach": True}, {"foreach": False}])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_the_seam_steps_one_parameter_on_the_optimizers_own_state(cls, options):
    """What `_step_with_state_of` relies on in torch.optim: an optimizer over one parameter, built
    from the parameter's group options and given the training optimizer's `state[param]` entry,
    leaves that entry and the parameter exactly as the training optimizer's own step would, from
    empty state and from existing state. Fails if PyTorch stops keeping state that way."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    def groups(ps):
        return [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]
    ordinary = cls(groups(params), lr=1e-2, **options)
    ours = cls(groups(copies), lr=1e-2, **options)
    singles = [cls([{**optim._options(group), "params": [p]}]) for group in ours.param_groups for p in group["params"]]
    for _step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, copies, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ordinary.step()
        for single, q in zip(singles, copies):
            entry = ours.state[q]
            optim._step_with_state_of(ours, single, q)
            assert ours.state[q] is entry and not single.state   # lent by reference, taken back
        for p, q in zip(params, copies):
            assert torch.equal(p, q)
            assert all(torch.equal(ordinary.state[p][key], ours.state[q][key]) for key in ordinary.state[p])
    saved, ours_saved = ordinary.state_dict(), ours.state_dict()
    assert saved["param_groups"] == ours_saved["param_groups"]
    assert saved["state"].keys() == ours_saved["state"].keys()
