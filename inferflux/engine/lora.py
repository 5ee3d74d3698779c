"""LoRA adapters at run time: PEFT folders and GGUF LoRA files read into fixed device slots, hot-loaded without
recompiling.

The step computes every slot's delta weighted by a per-sequence coefficient row (models/lora.py says why);
this module fills and empties those slots. Loading an adapter writes slot `s` of each layer's A and B arrays
(`.at[s].set`, same shapes and dtype, so every compiled program stays valid); unloading removes the name at
once, and zeroes the slot when the last running request that uses it has finished, so it never changes
under a running request. The prefix cache keys pages by `AdapterSet.key` (each adapter's load number and
scale), so differently adapted K/V is never shared, not even by a later adapter loaded under the same name.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, which safetensors needs for bf16 adapters
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from inferflux.engine.sampling_params import SamplingParamsError
from inferflux.errors import InferFluxError, ModelFormatError
from inferflux.formats.gguf_lora import AdapterFiles, is_gguf, read_gguf_lora
from inferflux.formats.model_config import ModelConfig
from inferflux.models.lora import ATTENTION_TARGETS, TARGETS, target_shapes

if TYPE_CHECKING:
    from inferflux.engine.model_runner import ModelRunner

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT module names (Hugging Face Llama/Qwen2) -> our projection names.
HF_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
              "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


class LoraError(InferFluxError, ValueError):
    """An adapter cannot be loaded or unloaded: unreadable, mismatched with the base model, or no slot."""


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """An adapter read from disk: per (layer, target) A [r, in] and B [out, r] with the scaling folded in."""

    path: str
    rank: int
    scaling: float
    tensors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def read_adapter(source: str | Path | AdapterFiles, config: ModelConfig, max_rank: int) -> LoraAdapter:
    """Read a PEFT folder or a GGUF LoRA file (llama.cpp's format), on disk or held in memory (a decrypted
    stored adapter, store/adapters.py), and check it against the base model."""
    if isinstance(source, AdapterFiles):
        data = source.gguf
        if data is None:
            return read_peft(source, config, max_rank)
        # The GGUF reader memory-maps a path: an anonymous in-memory file, so the plaintext never hits a disk.
        fd = os.memfd_create("inferflux-adapter", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            adapter = read_gguf(f"/proc/self/fd/{fd}", config, max_rank)
        finally:
            os.close(fd)
        return dataclasses.replace(adapter, path=source.label)
    if is_gguf(source):
        return read_gguf(source, config, max_rank)
    return read_peft(source, config, max_rank)


def _peft_parts(source: str | Path | AdapterFiles) -> tuple[str, Any, Any]:
    """A PEFT adapter's label, its adapter_config.json text and its tensors (name -> array), from disk or memory."""
    if isinstance(source, AdapterFiles):
        try:
            text = source.files[CONFIG_FILE].decode()
            tensors = safetensors.numpy.load(source.files[WEIGHTS_FILE])
        except (KeyError, UnicodeError, SafetensorError) as exc:
            raise LoraError(f"{source.label}: not a PEFT adapter ({exc})") from None
        return source.label, text, tensors
    folder = Path(source)
    text = (folder / CONFIG_FILE).read_text()
    return str(folder), text, None


def read_peft(path: str | Path | AdapterFiles, config: ModelConfig, max_rank: int) -> LoraAdapter:
    """Read a PEFT adapter folder and check it against the base model; a mismatch is a `LoraError`."""
    folder = Path(path.label) if isinstance(path, AdapterFiles) else Path(path)
    try:
        _, text, in_memory = _peft_parts(path)
        meta = json.loads(text)
    except (OSError, ValueError) as exc:
        raise LoraError(f"{folder}: not a PEFT adapter folder or GGUF LoRA file ({CONFIG_FILE}: {exc})") from None
    if meta.get("use_dora"):
        raise LoraError(f"{folder}: DoRA adapters are not supported")
    rank, alpha = int(meta.get("r", 0)), float(meta.get("lora_alpha", meta.get("r", 0)))
    if not 0 < rank <= max_rank:
        raise LoraError(f"{folder}: rank {rank} is outside 1..{max_rank} (runtime.max_lora_rank)")
    scaling = alpha / math.sqrt(rank) if meta.get("use_rslora") else alpha / rank
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}

    def add(name: str, tensor: np.ndarray) -> None:
        match = _KEY.match(name)
        if match is None or match.group(2) not in HF_MODULES:
            raise LoraError(f"{folder}: unsupported tensor {name!r} (only q/k/v/o/gate/up/down LoRA A/B)")
        key = (int(match.group(1)), HF_MODULES[match.group(2)])
        pairs.setdefault(key, {})[match.group(3)] = np.asarray(tensor, np.float32)

    if in_memory is not None:
        for name, tensor in in_memory.items():
            add(name, tensor)
    else:
        try:
            with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
                for name in f.keys():
                    add(name, f.get_tensor(name))
        except (OSError, SafetensorError) as exc:
            raise LoraError(f"{folder}: cannot read {WEIGHTS_FILE} ({exc})") from None
    raw = {key: (ab.get("A"), ab.get("B"), scaling) for key, ab in pairs.items()}
    return _fitted(str(folder), raw, config, rank)


def read_gguf(path: str | Path, config: ModelConfig, max_rank: int) -> LoraAdapter:
    """Read a GGUF LoRA file (formats/gguf_lora.py) with llama.cpp's per-tensor scale `alpha / r`."""
    try:
        lora = read_gguf_lora(path, config)
    except ModelFormatError as exc:
        raise LoraError(str(exc)) from None
    if lora.architecture != config.architecture:
        raise LoraError(f"{path}: the adapter is for `{lora.architecture}` models, the base model is "
                        f"`{config.architecture}`: not an adapter of this base model")
    raw = {}
    for key, (a, b) in lora.tensors.items():
        if not 0 < a.shape[0] <= max_rank:
            raise LoraError(f"{path}: rank {a.shape[0]} is outside 1..{max_rank} (runtime.max_lora_rank)")
        raw[key] = (a, b, lora.scaling(a.shape[0]))
    rank = max((a.shape[0] for a, _ in lora.tensors.values()), default=0)
    return _fitted(str(path), raw, config, rank)


def _fitted(label: str, raw: Mapping[tuple[int, str], tuple[np.ndarray | None, np.ndarray | None, float]],
            config: ModelConfig, rank: int) -> LoraAdapter:
    """The adapter with each B scaled, after checking every pair's shapes against the base model."""
    shapes = target_shapes(config)
    tensors = {}
    scaling = 0.0
    for (layer, target), (a, b, scale) in sorted(raw.items()):
        fan_in, fan_out = shapes[target]
        r = rank if a is None else a.shape[0]
        if layer >= config.num_layers:
            raise LoraError(f"{label}: layer {layer} does not exist (the base model has {config.num_layers})")
        if a is None or b is None or a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise LoraError(f"{label}: layer {layer} {target}: expected A {(r, fan_in)} and B "
                            f"{(fan_out, r)}, got {None if a is None else a.shape} and "
                            f"{None if b is None else b.shape}: not an adapter of this base model")
        tensors[layer, target] = (a, b * np.float32(scale))
        scaling = scale
    if not tensors:
        raise LoraError(f"{label}: the adapter has no LoRA tensors")
    return LoraAdapter(label, rank, scaling, tensors)


@dataclasses.dataclass
class _Slot:
    name: str
    load_id: int  # distinct for every load, so a reloaded name never reuses another's cached pages
    refs: int = 0  # requests in flight using it
    unloading: bool = False


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """A request's resolved adapters: its coefficient row, its prefix-cache key and the slots it holds."""

    coef: np.ndarray | None  # f32 [max_loras]; None: no adapter
    key: tuple[tuple[int, float], ...] | None  # ((load id, scale), ...) sorted; None: base model
    slots: tuple[int, ...]


NO_ADAPTER = AdapterSet(None, None, ())


class LoraSlots:
    """Adapter names -> device slots of one runner. Single-threaded: call on the thread that steps the engine."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.by_name: dict[str, int] = {}
        self.slots: dict[int, _Slot] = {}
        self._load_ids = itertools.count(1)

    def check(self, name: str) -> int:
        """The slot `load(name, ...)` would take now, or the `LoraError` it would raise (reads only)."""
        runner = self.runner
        if not runner.max_loras:
            raise LoraError("LoRA is off: set runtime.max_loras to the number of adapter slots")
        if not name:
            raise LoraError("an adapter needs a name")
        if name in self.by_name:
            raise LoraError(f"an adapter named {name!r} is already loaded")
        free = [s for s in range(runner.max_loras) if s not in self.slots]
        if not free:
            raise LoraError(f"all {runner.max_loras} adapter slots are in use (runtime.max_loras); unload one")
        return free[0]

    def read(self, path: str | Path | AdapterFiles) -> LoraAdapter:
        """Read and check the adapter (PEFT folder or GGUF LoRA file) at `path` against this model (no device
        work: any thread)."""
        return read_adapter(path, self.runner.config, self.runner.max_lora_rank)

    def load(self, name: str, source: str | Path | AdapterFiles | LoraAdapter) -> int:
        """Write the adapter (a PEFT folder or GGUF LoRA file, or one `read` already) into a free slot under
        `name`; returns it.

        The server reads on a worker thread and only writes here, on the engine thread, between steps.
        """
        self.check(name)  # fail fast, before reading
        adapter = source if isinstance(source, LoraAdapter) else self.read(source)
        slot = self.check(name)  # still free after the read
        write_slot(self.runner, slot, adapter)
        self.slots[slot] = _Slot(name, next(self._load_ids))
        self.by_name[name] = slot
        return slot

    def unload(self, name: str) -> None:
        """Forget `name` now (new requests cannot use it); its slot is zeroed once no running request uses it."""
        slot = self.by_name.pop(name, None)
        if slot is None:
            raise LoraError(f"no adapter named {name!r} is loaded")
        self.slots[slot].unloading = True
        self._maybe_free(slot)

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def names_for(self, key: tuple[tuple[int, float], ...] | None) -> list[str]:
        """The adapter names of an `AdapterSet.key` (a sequence's `adapter`), unloading ones included."""
        if not key:
            return []
        by_load = {slot.load_id: slot.name for slot in self.slots.values()}
        return [by_load[load_id] for load_id, _ in key if load_id in by_load]

    def request_info(self, running: Iterable[Any], waiting: Iterable[Any]) -> tuple[list[str], list[str]]:
        """The adapters of running and of waiting sequences, sorted (vLLM's `vllm:lora_requests_info`)."""
        def names(seqs: Iterable[Any]) -> list[str]:
            return sorted({name for seq in seqs for name in self.names_for(seq.adapter)})

        return names(running), names(waiting)

    def resolve(self, lora: Sequence[tuple[str, float]] | None) -> AdapterSet:
        """A request's [(name, scale)] -> its AdapterSet; an unknown name is a `SamplingParamsError` (4xx)."""
        if not lora:
            return NO_ADAPTER
        coef = np.zeros(self.runner.max_loras, np.float32)
        for name, scale in lora:
            slot = self.by_name.get(name)
            if slot is None:
                raise SamplingParamsError(f"no LoRA adapter named {name!r} is loaded")
            if not math.isfinite(float(scale)):
                raise SamplingParamsError(f"LoRA adapter {name!r}: scale must be a finite number")
            coef[slot] += float(scale)
        used = tuple(int(s) for s in np.flatnonzero(coef))
        key = tuple(sorted((self.slots[s].load_id, float(coef[s])) for s in used))
        return AdapterSet(coef, key or None, used) if used else NO_ADAPTER

    def acquire(self, adapters: AdapterSet) -> None:
        for slot in adapters.slots:
            self.slots[slot].refs += 1

    def release(self, adapters: AdapterSet) -> None:
        for slot in adapters.slots:
            self.slots[slot].refs -= 1
            self._maybe_free(slot)

    def _maybe_free(self, slot: int) -> None:
        state = self.slots[slot]
        if state.unloading and state.refs <= 0:
            write_slot(self.runner, slot, None)
            del self.slots[slot]


def write_slot(runner: ModelRunner, slot: int, adapter: LoraAdapter | None) -> None:
    """Write `adapter` (None: zeros) into `slot` of every layer's LoRA arrays, in place in the runner's state.

    Same shapes and dtypes as before, so no program recompiles; targets the adapter lacks are zeroed.
    """
    for layer in range(runner.config.num_layers):
        for target in TARGETS:
            module: Any = runner.state["layers"][layer]["attn" if target in ATTENTION_TARGETS else "mlp"]
            var_a, var_b = module[f"lora_a_{target}"], module[f"lora_b_{target}"]
            a_all, b_all = var_a.get_value(), var_b.get_value()
            a = np.zeros(a_all.shape[1:], np.float32)
            b = np.zeros(b_all.shape[1:], np.float32)
            if adapter is not None and (layer, target) in adapter.tensors:
                src_a, src_b = adapter.tensors[layer, target]
                a[:src_a.shape[0]] = src_a
                b[:, :src_b.shape[1]] = src_b
            var_a.set_value(a_all.at[slot].set(a.astype(a_all.dtype)))
            var_b.set_value(b_all.at[slot].set(b.astype(b_all.dtype)))
    runner.state_written()
