"""Model checkpoints in the Hugging Face GPT-2 layout: `config.json` + `model.safetensors`.

`transformers.GPT2LMHeadModel.from_pretrained(dir)` loads what `save_hf_dir` writes, and
`load_hf_dir` loads any Hugging Face GPT-2 folder (ours, one written by `save_pretrained`, or a hub
download), so a model trained here can be used, evaluated or fine-tuned anywhere. Safetensors
only: no pickle. A folder with only `pytorch_model.bin` is read with `torch.load(weights_only=True)`,
which refuses anything but tensors.

Layouts: Hugging Face's GPT-2 uses Conv1D, whose weight is [in, out]; our nn.Linear is [out, in],
so the four projection matrices of each block are transposed on the way out and in. The LM head
is tied to `transformer.wte.weight` and is not written (transformers re-ties it on load, and
safetensors refuses shared storage anyway).

Head count: `n_head` changes no tensor's shape, so a config.json with the wrong one would load and
score garbage. `write_hf_files` therefore records the architecture (n_layer, n_head, n_embd,
n_positions, vocab_size) in model.safetensors' metadata, and `load_hf_dir` refuses a config.json
that disagrees with that record. A folder without the record (transformers' save_pretrained, the
hub, files written before the record existed) gets the checks its shapes allow, n_embd a multiple
of n_head among them, and loads as before.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import atomic_dir
from gpt2ipu.model import GPT, GPTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EOS_TOKEN_ID = 50256
# Block parameters stored as Conv1D ([in, out]) by Hugging Face.
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Buffers that older transformers versions saved with each block; they hold no learned values.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# model.safetensors' metadata key holding the architecture the weights were saved with (JSON).
ARCHITECTURE_KEY = "gpt2ipu_architecture"
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def hf_config(config: GPTConfig, eos_token_id: int | None = None) -> dict:
    """The config.json of a transformers GPT2Config for `config` (written by hand so saving a
    checkpoint does not import transformers). eos_token_id defaults to GPT-2's 50256 when the
    vocabulary has it; a fresh BPE vocabulary passes its own."""
    if eos_token_id is None and config.vocab_size > EOS_TOKEN_ID:
        eos_token_id = EOS_TOKEN_ID
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.initializer_range,
        "embd_pdrop": config.embd_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "resid_pdrop": config.resid_pdrop,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside a DDP/FSDP wrapper (`.module`) or a torch.compile wrapper (`._orig_mod`)."""
    while not isinstance(model, GPT):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not a gpt2ipu GPT model: {type(model).__name__}")
        model = inner
    return model


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face GPT2LMHeadModel names and layouts: contiguous, none sharing
    memory with another (the tied LM head is left out), but CPU ones may be the live parameters
    themselves, not copies: write them out before the next optimizer step."""
    model = unwrap(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        hf_name = name if name == "lm_head.weight" else f"transformer.{name}"
        tensor = tensor.detach()
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[hf_name] = tensor.contiguous().cpu()
    return out


def write_hf_files(model: GPT, folder: str | os.PathLike, eos_token_id: int | None = None) -> None:
    """Write config.json and model.safetensors into an existing folder (the caller makes it atomic)."""
    folder = Path(folder)
    config = hf_config(unwrap(model).config, eos_token_id)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    architecture = {key: getattr(unwrap(model).config, key) for key in ARCHITECTURE_FIELDS}
    save_file(hf_state_dict(model), str(folder / WEIGHTS_NAME),
              metadata={"format": "pt", ARCHITECTURE_KEY: json.dumps(architecture, sort_keys=True)})


def save_hf_dir(model: GPT, out_dir: str | os.PathLike, *, eos_token_id: int | None = None, extra=None) -> Path:
    """Write the model to `out_dir` atomically; `extra(tmp_dir)` may add files (provenance, state)."""
    with atomic_dir(out_dir) as tmp:
        write_hf_files(model, tmp, eos_token_id)
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def config_from_hf(config_path: Path, **overrides) -> GPTConfig:
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config_path}: not a readable JSON config ({err}); point to a Hugging Face GPT-2 "
                        "folder") from err
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{config_path}: model_type is {hf.get('model_type')!r}, expected 'gpt2' (only GPT-2 "
                        "checkpoints load here)")
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": hf.get("activation_function", "gelu_new") not in SUPPORTED_ACTIVATIONS,
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        "scale_attn_weights": not hf.get("scale_attn_weights", True),
        "add_cross_attention": bool(hf.get("add_cross_attention")),
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise UserError(f"{config_path}: this GPT-2 variant is not supported here "
                        f"({', '.join(f'{k}={hf.get(k)!r}' for k in bad)})")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        n_positions=hf.get("n_positions", 1024),
        n_embd=n_embd,
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        embd_pdrop=hf.get("embd_pdrop", 0.1),
        attn_pdrop=hf.get("attn_pdrop", 0.1),
        resid_pdrop=hf.get("resid_pdrop", 0.1),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        initializer_range=hf.get("initializer_range", 0.02),
        **overrides,
    )


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, its sharded index, or pytorch_model.bin."""
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return _load_safetensors(single)
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{index}: not a readable safetensors index ({err})") from err
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors(folder / shard))
        return tensors
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling refusal or a corrupt file: both are the user's to fix
            raise UserError(f"{legacy}: cannot be read as plain tensors ({err}); convert it to "
                            "model.safetensors") from err
    raise UserError(f"{folder}: no {WEIGHTS_NAME} (or its index, or pytorch_model.bin); is it a Hugging Face model "
                    "folder?")


def saved_architecture(folder: Path) -> dict[str, int] | None:
    """The architecture recorded in `folder`'s model.safetensors when gpt2ipu wrote it, else None."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as weights:
            record = (weights.metadata() or {}).get(ARCHITECTURE_KEY)
        return None if record is None else {key: int(value) for key, value in json.loads(record).items()}
    except Exception:  # an unreadable record is no record: the tensors' own checks still apply
        return None


def check_saved_architecture(folder: Path, config: GPTConfig) -> None:
    """Refuse a config.json whose architecture differs from the one recorded with the weights."""
    record = saved_architecture(folder)
    if record is None:
        return
    differ = [key for key in ARCHITECTURE_FIELDS if key in record and record[key] != getattr(config, key)]
    if differ:
        said = ", ".join(f"{key} {getattr(config, key)} where the weights were saved with {key} {record[key]}"
                         for key in differ)
        fix = ", ".join(f'"{key}": {record[key]}' for key in differ)
        raise UserError(f"{folder}: config.json does not belong to these weights: it has {said} (recorded in "
                        f"{WEIGHTS_NAME}); loaded, they would score garbage. Set {fix} in config.json, or put "
                        "back the config.json saved with them")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt"):   # safetensors' own checks of the header and the size
            pass
        return {name: read() for name, read in tensor_readers(path)}
    except UserError:
        raise
    except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
        raise UserError(f"{path}: cannot be read as safetensors ({err}); save the model again") from err


# safetensors' dtype names (its format spec) for the dtypes a checkpoint's tensors may have.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def tensor_readers(path: Path) -> Iterator[tuple[str, Callable[..., torch.Tensor]]]:
    """(name in the file, read(rows=None) -> that tensor, or a slice of its rows) per tensor of a
    safetensors file, in file order; the file stays open while the iterator runs.

    Plain file reads into each tensor's own memory, not safetensors' memory map: every page of a
    mapped file that is touched counts in the process's resident memory until the map is gone,
    and one tensor kept from it (an untransposed matrix, a bias) keeps the whole map. Measured,
    GPT-2 small fp32 generation peaked 340 MB higher with the map (docs/measurements.md).
    The format (its spec): 8 bytes little-endian header length, a JSON header {name: {dtype,
    shape, data_offsets: [begin, end] relative to the data}, "__metadata__": {...}}, then the
    data, each tensor row-major little-endian.
    """
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        base = 8 + header_size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has dtype {entry['dtype']}, which gpt2ipu does not read; "
                                f"convert it to one of {', '.join(SAFETENSORS_DTYPES)}")

            def read(rows: slice | None = None, start=base + entry["data_offsets"][0], dtype=dtype,
                     shape=entry["shape"], name=name) -> torch.Tensor:
                first, stop = (0, shape[0] if shape else 1) if rows is None else (rows.start, min(rows.stop, shape[0]))
                row_bytes = math.prod(shape[1:]) * dtype.itemsize
                tensor = torch.empty([stop - first, *shape[1:]] if shape else [], dtype=dtype)
                f.seek(start + first * row_bytes)
                if tensor.numel() and f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != tensor.nbytes:
                    raise UserError(f"{path}: ends inside tensor {name}; the file is truncated, save the model again")
                return tensor
            yield name, read


def load_hf_dir(folder: str | os.PathLike, **config_overrides) -> GPT:
    """A GPT with the weights of a Hugging Face GPT-2 folder. `config_overrides` set GPTConfig
    fields that are ours, not the checkpoint's (e.g. recompute=True, dropout for fine-tuning)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{folder}: no {CONFIG_NAME}; point to a folder saved by gpt2ipu or transformers' "
                        "save_pretrained")
    config = config_from_hf(config_path, **config_overrides)
    tensors = read_hf_weights(folder)
    try:
        with torch.device("meta"):
            model = GPT(config)
    except UserError as err:  # e.g. n_embd not a multiple of n_head: name the file it came from
        raise UserError(f"{config_path}: {err}; fix config.json or use the one saved with these weights") from err
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = _to_our_names(tensors, expected, config, folder)
    check_saved_architecture(folder, config)  # after the shapes: what they cannot show (n_head)
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True made two Parameters; re-tie them
    return model


def _weights_source(folder: Path) -> str:
    """The name of the file(s) read_hf_weights reads in `folder`, for messages."""
    if (folder / WEIGHTS_NAME).is_file():
        return WEIGHTS_NAME
    if (folder / f"{WEIGHTS_NAME}.index.json").is_file():
        return f"the shards of {WEIGHTS_NAME}.index.json"
    return "pytorch_model.bin"


def _config_keys(name: str, config: GPTConfig) -> str:
    """The config.json keys (with their values) that decide the shape of our tensor `name`."""
    if name in ("wte.weight", "lm_head.weight"):
        keys = ("n_embd", "vocab_size")
    elif name == "wpe.weight":
        keys = ("n_embd", "n_positions")
    else:
        keys = ("n_embd",)
    return ", ".join(f"{key} {getattr(config, key)}" for key in keys)


def _shape(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _to_our_names(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], config: GPTConfig,
                  folder: Path) -> dict[str, torch.Tensor]:
    """`tensors` (Hugging Face names and layouts) under our names and layouts, checked against the
    names and shapes `expected` (our model's, as the config implies): a mismatch is the user's
    (a config.json that does not belong to the weights), so it raises a UserError, not the
    load_state_dict traceback."""
    state, file_names = {}, {}
    for file_name in list(tensors):
        tensor = tensors.pop(file_name)   # the file's copy goes as ours is made: one matrix twice, not all
        # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (e.g. the hub's gpt2) saves "h.0...".
        name = file_name.removeprefix("transformer.")
        if name.endswith(BUFFER_SUFFIXES):
            continue
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name] = tensor.contiguous()
        file_names[name] = file_name
    if config.tie_word_embeddings and "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]
        file_names["lm_head.weight"] = file_names["wte.weight"]
    source = _weights_source(folder)
    fix = ("the config does not belong to these weights: put back the config.json saved with them "
           "(or point to the folder that holds both)")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        def listed(names):
            shown = ", ".join(file_names.get(n, n if n == "lm_head.weight" else f"transformer.{n}") for n in names[:5])
            return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        found = []
        if missing:
            found.append(f"{len(missing)} tensor(s) missing ({listed(missing)})")
        if unexpected:
            found.append(f"{len(unexpected)} unexpected tensor(s) ({listed(unexpected)})")
        raise UserError(
            f"{folder}: {source} does not hold the tensors that config.json (n_layer {config.n_layer}, "
            f"tie_word_embeddings {config.tie_word_embeddings}) implies: {'; '.join(found)}; {fix}"
        )
    wrong = [name for name, shape in expected.items() if tuple(state[name].shape) != shape
             and not (name == "lm_head.weight" and config.tie_word_embeddings)]  # tied: wte's shape, said once
    if wrong:
        name = wrong[0]
        implied, found_shape = expected[name], tuple(state[name].shape)
        if name.endswith(CONV1D_SUFFIXES):  # say both in the file's [in, out] layout
            implied, found_shape = implied[::-1], found_shape[::-1]
        more = f" ({len(wrong) - 1} more tensor(s) differ too)" if len(wrong) > 1 else ""
        raise UserError(
            f"{folder}: {file_names[name]} in {source} has shape {_shape(found_shape)} but config.json "
            f"({_config_keys(name, config)}) implies {_shape(implied)}{more}; {fix}"
        )
    return state
