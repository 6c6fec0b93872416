"""GPT-2 model, chunked loss, Hugging Face checkpoints, optimizers: checked against transformers and
against plain PyTorch."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import plain_loss
from safetensors.torch import load_file

from gpt2ipu.errors import UserError
from gpt2ipu.model.gpt import GPT, config_for
from gpt2ipu.model.hf import load_hf_dir, save_hf_dir
from gpt2ipu.model.loss import chunked_lm_loss
from gpt2ipu.sizes import PRESETS
from gpt2ipu.train.optim import make_optimizer, parameter_groups, train_step

transformers = pytest.importorskip("transformers")

VOCAB = 1000


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_for("gpt2-test", 32, vocab_size=VOCAB, **overrides))


def tokens(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def hf_tiny_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


# ---- architecture and checkpoints ----------------------------------------------------------


def test_presets_have_gpt2_sizes():
    assert PRESETS["gpt2"] == (12, 768, 12) and PRESETS["gpt2-xl"] == (48, 1600, 25)
    config = config_for("gpt2", 256)
    assert (config.n_positions, config.vocab_size) == (256, 50257)
    with torch.device("meta"):
        assert GPT(config).num_parameters(exclude_positions=False) == 124439808 - 1024 * 768 + 256 * 768
    with pytest.raises(UserError, match="gpt2-huge"):
        config_for("gpt2-huge", 256)


def test_our_checkpoint_loads_in_transformers_with_same_logits(tmp_path):
    model = tiny_model().eval()
    save_hf_dir(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied: transformers re-ties it
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D [in, out]

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    ids = tokens(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_transformers_checkpoint_loads_here_with_same_logits(tmp_path):
    hf = hf_tiny_model()
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf_dir(tmp_path / "hf").eval()
    assert model.lm_head.weight is model.wte.weight
    ids = tokens(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [{}, {"vocab_chunks": 3}, {"token_chunks": 3}])
def test_loss_and_gradients_equal_transformers(tmp_path, chunks):
    """The whole backward (tied embedding, GELU, attention, chunked loss) against GPT2LMHeadModel."""
    hf = hf_tiny_model().train()
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf_dir(tmp_path / "hf").train()
    sample = tokens(3, 17)
    # Hugging Face shifts labels itself; its extra last position feeds no loss term.
    hf_loss = hf(sample, labels=sample).loss
    hf_loss.backward()
    loss, *_ = model(sample[:, :-1], sample[:, 1:], **chunks)
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    hf_grads = {name.removeprefix("transformer."): p.grad for name, p in hf.named_parameters()}
    for name, param in model.named_parameters():
        want = hf_grads[name]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            want = want.t()
        torch.testing.assert_close(param.grad, want, atol=1e-5, rtol=1e-4, msg=name)


def test_legacy_bin_with_buffers_and_no_prefix_loads(tmp_path):
    """Old hub checkpoints: GPT2Model names (no "transformer."), attn.bias/masked_bias buffers,
    an explicit lm_head.weight, pickled tensors only in pytorch_model.bin."""
    hf = hf_tiny_model()
    state = {k: v.clone() for k, v in hf.transformer.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    hf.config.to_json_file(folder / "config.json")
    model = load_hf_dir(folder).eval()
    ids = tokens(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_checkpoint_folders_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 2, "n_layer": 2}))
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot be read"):
        load_hf_dir(tmp_path)


def test_loaded_weights_are_read_into_memory_not_mapped_from_the_file(tmp_path):
    # A memory-mapped checkpoint keeps every page it touched resident for as long as one tensor
    # maps it (hf.tensor_readers); a model read into its own memory does not see the file change.
    torch.manual_seed(0)
    model = GPT(config_for("gpt2-test", 32))
    folder = save_hf_dir(model, tmp_path / "ckpt")
    loaded = load_hf_dir(folder)
    path = folder / "model.safetensors"
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:   # in place: a mapped file's untouched pages would show the new bytes
        f.seek(data_start)
        f.write(bytes(path.stat().st_size - data_start))
    for (name, ours), theirs in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    with open(path, "r+b") as f:   # a file cut short inside a tensor is named as truncated
        f.truncate(path.stat().st_size - 4)
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf_dir(folder)


def test_save_is_atomic_and_replaces(tmp_path):
    out = tmp_path / "ckpt"
    save_hf_dir(tiny_model(seed=0), out)
    with pytest.raises(RuntimeError):
        save_hf_dir(tiny_model(seed=1), out, extra=lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp left, old one kept
    torch.testing.assert_close(load_hf_dir(out).wte.weight, tiny_model(seed=0).wte.weight)


# ---- chunked loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [{}, {"vocab_chunks": 3}, {"vocab_chunks": 101}, {"token_chunks": 4},
                                    {"token_chunks": 1000}])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_chunked_loss_equals_plain_loss_and_gradients(chunks, batch):
    torch.manual_seed(batch)
    T, d, V = 7, 16, 101  # V is not a multiple of 3
    hidden = torch.randn(batch, T, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (batch, T))
    labels[0, ::3] = -100
    with torch.no_grad():  # make some predictions right, so accuracy is not trivially 0
        logits = hidden[0, 1:3] @ weight.t()
        labels[0, 1:3] = logits.argmax(-1)
    h, y = hidden.reshape(-1, d), labels.reshape(-1)
    ref = plain_loss(h, weight, y)
    ref_grads = torch.autograd.grad(3 * ref, (hidden, weight))
    loss, accuracy = chunked_lm_loss(h, weight, y, **chunks)
    grads = torch.autograd.grad(3 * loss, (hidden, weight))
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    valid = y != -100
    want_accuracy = ((h @ weight.t()).argmax(-1) == y)[valid].double().mean()
    torch.testing.assert_close(accuracy.double(), want_accuracy)
    assert accuracy > 0


@pytest.mark.parametrize("chunks", [{"vocab_chunks": 4}, {"token_chunks": 4}])
def test_chunked_loss_single_token_and_no_grad(chunks):
    hidden, weight = torch.randn(1, 8), torch.randn(50, 8)
    labels = torch.tensor([7])
    with torch.no_grad():
        loss, _ = chunked_lm_loss(hidden, weight, labels, **chunks)
    torch.testing.assert_close(loss, plain_loss(hidden, weight, labels))


def test_loss_refuses_chunking_both_axes():
    # The flags -> chunks translation is tested where it happens: tests/test_train.py (resolve).
    with pytest.raises(ValueError):
        chunked_lm_loss(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long),
                        vocab_chunks=2, token_chunks=2)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_model_loss_is_mean_over_all_tokens_for_any_batch_size(batch):
    model = tiny_model()
    ids, labels = tokens(batch, 16), tokens(batch, 16, seed=2)
    labels[-1, :5] = -100
    with torch.no_grad():
        want = F.cross_entropy(model.logits(ids).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
        for chunks in ({}, {"vocab_chunks": 3}, {"token_chunks": 3}):
            loss, _, n_tokens = model(ids, labels, **chunks)
            torch.testing.assert_close(loss, want)
            assert int(n_tokens) == batch * 16 - 5


@pytest.mark.parametrize("recompute_gelu", [None, True])
def test_bf16_autocast_loss_is_close_and_grads_stay_fp32(recompute_gelu):
    model = tiny_model(recompute_gelu=recompute_gelu)
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    with torch.no_grad():
        want, *_ = model(ids, labels)
    reference = gradients(model, ids, labels)
    for chunks in ({}, {"vocab_chunks": 3}, {"token_chunks": 3}):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, *_ = model(ids, labels, **chunks)
        loss.backward()
        assert abs(loss.detach().item() - want.item()) < 0.05
        for name, param in model.named_parameters():
            assert param.grad.dtype == torch.float32, name
            cosine = F.cosine_similarity(param.grad.flatten(), reference[name].flatten(), dim=0)
            assert cosine > 0.98, (name, chunks, float(cosine))


# ---- generation paths ------------------------------------------------------------------------


def test_kv_cache_incremental_logits_equal_full_forward():
    model = tiny_model().eval()
    ids = tokens(2, 20)
    with torch.no_grad():
        full = model.logits(ids)
        cache = model.new_cache()
        pieces = [model.logits(ids[:, :12], cache=cache)]
        pieces.append(model.logits(ids[:, 12:15], cache=cache))  # several new tokens
        for t in range(15, 20):
            pieces.append(model.logits(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_sample_alone():
    model = tiny_model().eval()
    long, short = tokens(1, 20), tokens(1, 13, seed=3)
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, 7:] = long, short
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        padded = model.logits(batch, attention_mask=mask)
        torch.testing.assert_close(padded[0], model.logits(long)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[1, 7:], model.logits(short)[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(padded).all()
        # and incrementally, as generate() runs it
        cache = model.new_cache()
        steps = [model.logits(batch[:, :15], attention_mask=mask[:, :15], cache=cache)]
        for t in range(15, 20):
            steps.append(model.logits(batch[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1)[1, 7:], model.logits(short)[0], atol=1e-5, rtol=1e-5)


# ---- training ---------------------------------------------------------------------------------


def gradients(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss, *_ = model(ids, labels, token_chunks=2)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_recompute_gives_the_same_gradients():
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    plain = gradients(tiny_model().train(), ids, labels)
    recomputed = gradients(tiny_model(recompute=True).train(), ids, labels)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)


def test_gelu_recompute_gives_the_same_gradients():
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    recomputed = gradients(tiny_model().train(), ids, labels)
    saved = gradients(tiny_model(recompute_gelu=False).train(), ids, labels)
    for name in saved:
        torch.testing.assert_close(recomputed[name], saved[name], msg=name)


def test_optimizer_decays_matrices_only_and_every_kind_steps():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    for kind in ("adamw", "adam", "lamb"):
        model = tiny_model()
        optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.01, kind=kind)
        first = train_step(model, optimizer, [(ids, labels)])["loss"]
        for _ in range(3):
            last = train_step(model, optimizer, [(ids, labels)])["loss"]
        assert last < first, kind
    with pytest.raises(UserError, match="sgd"):
        make_optimizer(model, lr=1e-3, kind="sgd")


def test_gradient_accumulation_equals_one_big_batch():
    ids, labels = tokens(4, 16), tokens(4, 16, seed=2)
    one, two = tiny_model(), tiny_model()
    train_step(one, torch.optim.SGD(one.parameters(), lr=0.1), [(ids, labels)])
    train_step(two, torch.optim.SGD(two.parameters(), lr=0.1), [(ids[:2], labels[:2]), (ids[2:], labels[2:])],
               loss_chunks={"token_chunks": 3})
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q)


# The optimizer step inside backward (StepInBackward): tests/test_optim.py.


@pytest.mark.parametrize("gelu", [False, True])
def test_fused_linear_gives_the_plain_layers_numbers_and_gradients(gelu, monkeypatch):
    from gpt2ipu.model import fused

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 256)
    x = torch.randn(3, 40, 64) * 2

    def plain(x):
        y = torch.nn.functional.linear(x, layer.weight, layer.bias)
        return torch.nn.functional.gelu(y, approximate="tanh") if gelu else y

    calls = []
    real_op = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(fused, "_onednn_linear_pointwise", lambda *a: calls.append(1) or real_op(*a))
    with torch.inference_mode():
        torch.testing.assert_close(fused.linear(x, layer, gelu=gelu), plain(x), rtol=1e-5, atol=1e-5)
    # On a torch whose oneDNN op fails the probe the plain calls run; this one must take the op.
    assert calls == ([1] if fused.onednn_linear_works() else [])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert fused.linear(x, layer, gelu=gelu).dtype == torch.bfloat16   # autocast's choice stands
    x.requires_grad_(True)
    ours = fused.linear(x, layer, gelu=gelu)
    ours.square().sum().backward()
    grad_ours, x.grad = x.grad, None
    plain(x).square().sum().backward()
    torch.testing.assert_close(grad_ours, x.grad)
    assert len(calls) <= 1   # gradients need autograd: the plain calls


def test_bf16_attention_linears_keep_no_weight_copy_and_match_autocast():
    from gpt2ipu.model.memory import recast_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 192)
    x = torch.randn(2, 16, 64, requires_grad=True)
    results = []
    for use_ours in (True, False):
        linear.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = recast_linear(x, linear) if use_ours else linear(x)
        saved = [t for t in y.grad_fn.saved_tensors] if use_ours else []
        y.float().square().sum().backward()
        results.append((y.detach(), x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()))
        assert all(t.dtype != torch.bfloat16 or t.shape != linear.weight.shape for t in saved)
    for ours, autocast in zip(*results):
        torch.testing.assert_close(ours, autocast, rtol=2e-2, atol=2e-2)
