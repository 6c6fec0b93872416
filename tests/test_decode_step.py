"""The fused decode step (custom_ops/decode_step.cpp through gpt2ipu/generate/decode.py's FusedDecoder):
its logits and cache against PyTorch's modules for every weight format, with and without padding, two
threads splitting the work; its refusals; and the int8 rounding of activations it relies on."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2ipu import ops
from gpt2ipu.generate.decode import FusedDecoder, use_decode_layout
from gpt2ipu.model import GPT, config_for
from gpt2ipu.model.lowp import to_lowp
from gpt2ipu.ops.reference import QUANT_BLOCK, quantize_activations

VOCAB = 300


@pytest.fixture
def decoder_model():
    """A 2-layer model with n_embd 96 (not a multiple of 64: every kernel's tail runs), weights not near 0."""
    torch.manual_seed(0)
    model = GPT(config_for("gpt2", 64, vocab_size=VOCAB, n_layer=2, n_embd=96, n_head=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def as_format(model, weights: str):
    model = copy.deepcopy(model)
    if weights == "fp32":
        use_decode_layout(model)
        return model
    return to_lowp(model, weights)


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True)])
def test_fused_step_equals_the_modules(compiled, built_ops_dir, monkeypatch, decoder_model, weights, batch, padded):
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)   # the step's work split over a team, whatever the machine
    try:
        model = as_format(decoder_model, weights)
        fused = FusedDecoder.for_model(model)
        assert fused is not None
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, VOCAB, (batch, 7), generator=generator)
        mask = None
        if padded:   # rows 1 and 2 left-padded
            mask = torch.ones(batch, 7, dtype=torch.long)
            mask[1, :3] = 0
            mask[2, :1] = 0
        with torch.inference_mode():
            reference_cache, fused_cache = model.new_cache(), model.new_cache()
            model.hidden_states(ids, cache=reference_cache, attention_mask=mask)
            model.hidden_states(ids, cache=fused_cache, attention_mask=mask)
            next_ids = torch.randint(0, VOCAB, (batch,), generator=generator)
            for _ in range(4):   # past the cache's first growth
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
                hidden = model.hidden_states(next_ids[:, None], cache=reference_cache, attention_mask=mask)
                expected = model.lm_head(hidden[:, -1])
                got = fused.step(next_ids, fused_cache, mask)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
                next_ids = expected.argmax(dim=-1)
            assert fused_cache.length == reference_cache.length == 11
            for layer in range(len(model.h)):
                torch.testing.assert_close(fused_cache.keys[layer][:, :, :11], reference_cache.keys[layer][:, :, :11])
                torch.testing.assert_close(fused_cache.values[layer][:, :, :11],
                                           reference_cache.values[layer][:, :, :11])
    finally:
        torch.set_num_threads(threads)


def test_fused_step_refuses_what_it_cannot_do(compiled, built_ops_dir, monkeypatch, decoder_model):
    monkeypatch.setenv(ops.OPS_DIR_ENV, str(built_ops_dir[0]))
    model = as_format(decoder_model, "int8")
    fused = FusedDecoder.for_model(model)
    with torch.inference_mode():
        cache = model.new_cache()
        model.hidden_states(torch.tensor([[1, 2, 3]]), cache=cache)
        keys, values = cache.room(1)
        step = compiled.decode_step
        with pytest.raises(RuntimeError, match="parameter tensors given"):
            step(torch.tensor([4]), torch.tensor([3]), None, keys, values, 3, [*fused.params, fused.params[-1]], 4,
                 1e-5)
        with pytest.raises(RuntimeError, match="capacity > 3"):
            step(torch.tensor([4]), torch.tensor([3]), None, [k[:, :, :3].contiguous() for k in keys], values, 3,
                 fused.params, 4, 1e-5)
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            step(torch.tensor([VOCAB]), torch.tensor([3]), None, keys, values, 3, fused.params, 4, 1e-5)
        with pytest.raises(RuntimeError, match="mlp.c_fc must be a contiguous"):
            broken = list(fused.params)
            where = [t.data_ptr() for t in broken].index(model.h[0].mlp.c_fc.weight.data_ptr())
            broken[where] = model.h[0].mlp.c_fc.weight.float()
            step(torch.tensor([4]), torch.tensor([3]), None, keys, values, 3, broken, 4, 1e-5)
    model.train()
    assert FusedDecoder.for_model(model) is None   # training mode: PyTorch's modules


def test_int8_activation_rounding_is_per_block():
    # One outlier channel (as GPT-2's residual stream has) coarsens the step of its own block
    # of 64 only; every value is within half a step of its block's absmax / 127.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, generator=generator)
    x[:, 5] = 300.0
    rounded = quantize_activations(x)
    for start in range(0, 200, QUANT_BLOCK):
        block = x[:, start:start + QUANT_BLOCK]
        step = block.abs().amax(dim=-1, keepdim=True) / 127
        assert ((rounded[:, start:start + QUANT_BLOCK] - block).abs() <= step / 2 * (1 + 1e-5)).all()
    outside = slice(QUANT_BLOCK, 200)
    relative = (rounded[:, outside] - x[:, outside]).norm() / x[:, outside].norm()
    assert 0 < relative < 0.01   # the outlier's block aside, x keeps about 2 significant digits
    assert torch.equal(quantize_activations(torch.zeros(2, 70)), torch.zeros(2, 70))
