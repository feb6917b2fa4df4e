"""Calibration engine: per-input-channel activation statistics of a causal LM's Linear layers.

Runs a causal language model over a calibration set and accumulates, for every selected
``nn.Linear`` of the decoder layers, statistics of its **input** channels over the chosen
tokens (response tokens only, or every non-padding token):

* ``sum_sq[j] = Σ_t x_tj²`` — Wanda's ‖X_j‖₂² (Antidote scores |W_ij|·‖X_j‖₂);
* ``mean[j]``, ``m2[j]`` — streaming mean and sum of squared deviations (Chan et al.'s
  parallel merge of per-batch moments, in float64), so ``variance = m2 / count`` is exact to
  float64 rounding whatever the number of tokens (FLAP / SSAH score Var(X_j)·‖W_:j‖²);
* ``count`` — the number of tokens seen.

Statistics are accumulated in float64 whatever the model dtype; the forward pass runs in
``dtype`` (float32 by default — the right choice on CPUs). Nothing is random: the same
inputs give the same statistics.

Two execution modes, which give the same numbers (tests check it):

* **streaming** (default): the model is never materialised whole. A skeleton of the model is
  built on the ``meta`` device from its config with transformers' own classes; only the
  modules before the decoder layers (embeddings, rotary embedding) are loaded. One forward
  pass of the real model code with every decoder layer replaced by a pass-through "catcher"
  records exactly what the model hands each layer (hidden states, attention mask as the model
  builds it for that layer type, position embeddings, position ids). Then the layers are run
  one at a time: layer ``i`` is materialised from its tensors alone (``safe_open``), all
  calibration batches are pushed through it with hooks on its Linear modules, and it is freed
  before layer ``i + 1`` is loaded. Peak memory ≈ embeddings + one layer + the calibration
  activations.
* **in-memory** (``streaming=False``): the whole HF model, hooks on its Linear modules, one
  ordinary forward per batch. Used to cross-check the streaming mode and for architectures the
  streaming mode refuses.

The weights may come from a checkpoint directory or from any :class:`WeightSource` — e.g.
:class:`mergekit_safety.fusion.sources.FusedSource`, the plain fusion of an aligned model and
experts computed tensor by tensor, so statistics of a fused model never need the fused
checkpoint on disk.

Modules are chosen with the package's one ``modules`` grammar (:mod:`mergekit_safety.engine.modules`)
among the Linear weights of the decoder layers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_safety.engine.checkpoint import Checkpoint, CheckpointError
from mergekit_safety.engine.tokenizer import pad_id

logger = logging.getLogger(__name__)

TokenScope = Literal["response", "all"]
DEFAULT_MODULES = "linear"


class CalibrationError(ValueError):
    """The model, its weights or the calibration data cannot be used (message says why)."""


# --------------------------------------------------------------------------- statistics

BlockMoments = Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def block_moments(x: torch.Tensor) -> BlockMoments:
    """(n, ‖X_j‖², mean, n·var) of a block of tokens ``x`` (tokens, channels), float64.

    The moments come from ``torch.var_mean`` (Welford, so no cancellation) in float32 —
    float64 for float64 input; ‖X_j‖² of the block is n·(var + mean²), a sum of non-negative
    terms. They merge into running totals with Chan's update (:meth:`ChannelStats._merge`).
    """
    n = int(x.shape[0])
    if n == 0:
        zeros = torch.zeros(x.shape[1], dtype=torch.float64)
        return 0, zeros, zeros, zeros
    # reduced where the activations are (an accelerator's memory); only the vectors come back
    x = x.detach().to(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    variance, mean = torch.var_mean(x, dim=0, correction=0)
    variance, mean = variance.to("cpu", torch.float64), mean.to("cpu", torch.float64)
    return n, n * (variance + mean * mean), mean, n * variance


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one Linear module (float64, on CPU)."""

    count: int
    sum_sq: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, channels: int) -> "ChannelStats":
        zeros = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        return cls(0, zeros(), zeros(), zeros())

    @property
    def channels(self) -> int:
        return int(self.sum_sq.numel())

    @property
    def norm_sq(self) -> torch.Tensor:
        """‖X_j‖₂² over every token seen (Wanda's statistic)."""
        return self.sum_sq

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over every token seen."""
        return self.sum_sq.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of x_j over the tokens seen (0 if none)."""
        if self.count == 0:
            return torch.zeros_like(self.m2)
        return self.m2 / self.count

    def update(self, x: torch.Tensor) -> None:
        """Add a block of tokens ``x`` of shape (tokens, channels).

        The block's moments come from ``torch.var_mean`` (Welford, so no cancellation) in
        float32 — float64 for float64 input — and are merged into the float64 totals with
        Chan's update; ‖X_j‖² of the block is n·(var + mean²), a sum of non-negative terms.
        """
        if x.dim() != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected (tokens, {self.channels}) activations, got {tuple(x.shape)}")
        self.add_moments(block_moments(x))

    def add_moments(self, moments: "BlockMoments") -> None:
        """Add a block summarised by :func:`block_moments` (shared by modules that read the
        same input, e.g. q/k/v_proj or gate/up_proj, so it is computed once per block)."""
        n, sum_sq, mean, m2 = moments
        if n and mean.numel() != self.channels:
            raise ValueError(f"expected {self.channels} channels, got moments of {mean.numel()}")
        self._merge(n, sum_sq, mean, m2)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Statistics of the union of both token sets (Chan's parallel update); returns a new object."""
        result = ChannelStats(self.count, self.sum_sq.clone(), self.mean.clone(), self.m2.clone())
        result._merge(other.count, other.sum_sq, other.mean, other.m2)
        return result

    def _merge(self, n: int, sum_sq: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.sum_sq = self.sum_sq + sum_sq
        self.count = total

    def to_tensors(self, prefix: str) -> Dict[str, torch.Tensor]:
        return {
            f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64),
            f"{prefix}.sum_sq": self.sum_sq,
            f"{prefix}.mean": self.mean,
            f"{prefix}.m2": self.m2,
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> "ChannelStats":
        return cls(
            int(tensors[f"{prefix}.count"][0]),
            tensors[f"{prefix}.sum_sq"].to(torch.float64),
            tensors[f"{prefix}.mean"].to(torch.float64),
            tensors[f"{prefix}.m2"].to(torch.float64),
        )


# --------------------------------------------------------------------------- weight sources


class WeightSource:
    """Tensors of a model by checkpoint name, read on demand."""

    def names(self) -> List[str]:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of tensor ``name``; sources that can read rows alone override this."""
        return self.get(name)[index]

    def describe(self) -> str:
        return type(self).__name__

    def release(self) -> None:
        """Drop cached file handles (their memory maps), e.g. after a layer has been read."""


class SafetensorsSource(Checkpoint, WeightSource):
    """The safetensors shards of a model directory, as a :class:`WeightSource`."""

    def __init__(self, directory: str, check_finite: bool = True):
        try:
            super().__init__(directory, check_finite=check_finite)
        except CheckpointError as error:
            raise CalibrationError(str(error)) from None

    def get(self, name: str) -> torch.Tensor:
        try:
            return super().get(name)
        except CheckpointError as error:
            raise CalibrationError(str(error)) from None

    def get_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        try:
            return super().get_rows(name, index)
        except CheckpointError as error:
            raise CalibrationError(str(error)) from None


# --------------------------------------------------------------------------- data


def load_examples(path: str, max_samples: int = 0, prompt_key: str = "prompt", response_key: str = "response") -> List[Dict[str, str]]:
    """Read a calibration JSONL (``prompt``, ``response`` per line); the first ``max_samples``
    records (0 = all)."""
    from mergekit_safety.engine.data import read_jsonl_lines

    # an empty prompt or response gives no signal to calibrate on: refused, with its line
    records = read_jsonl_lines(path, [prompt_key, response_key], nonempty=[prompt_key, response_key])
    if max_samples and max_samples > 0:
        records = records[:max_samples]
    return [{"prompt": r[prompt_key], "response": r[response_key], "where": f"{path}:{line}"} for line, r in records]


def encode_examples(tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: Optional[int] = None) -> List[Dict[str, List[int]]]:
    """Examples as ``{input_ids, response_mask}``: pre-encoded ones pass through, (prompt,
    response) ones are encoded with :func:`mergekit_safety.data.encode_example` (chat template
    when the tokenizer has one)."""
    from mergekit_safety.engine.data import TruncationWarning, encode_example

    encoded = []
    for index, example in enumerate(examples):
        if "input_ids" in example:
            ids = list(example["input_ids"])
            mask = list(example.get("response_mask", [1] * len(ids)))
            if len(mask) != len(ids):
                raise CalibrationError(f"calibration example {index}: response_mask and input_ids differ in length")
            encoded.append({"input_ids": ids, "response_mask": mask})
            continue
        if tokenizer is None:
            raise CalibrationError("calibration examples are text but the model has no tokenizer")
        if "prompt" not in example:
            raise CalibrationError(f"calibration example {index}: no 'prompt' (nor 'input_ids')")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            encoded.append(encode_example(tokenizer, example["prompt"], example.get("response"), max_length=max_length))
        for warning in caught:  # name the record that was cut
            where = example.get("where") or f"calibration example {index}"
            message = f"{where}: {warning.message}" if issubclass(warning.category, TruncationWarning) else warning.message
            warnings.warn(message, warning.category, stacklevel=2)
    if not encoded:
        raise CalibrationError("the calibration set is empty")
    return encoded


def _batches(encoded, batch_size: int, pad_id: int, token_scope: str):
    from mergekit_safety.engine.data import batches

    if token_scope not in ("response", "all"):
        raise CalibrationError(f"token_scope must be 'response' or 'all', not {token_scope!r}")
    result = []
    for batch in batches(encoded, batch_size, pad_id, padding_side="right"):
        tokens = batch["response_mask"] if token_scope == "response" else batch["attention_mask"]
        result.append((batch["input_ids"], batch["attention_mask"], tokens.bool()))
    return result


# --------------------------------------------------------------------------- module selection


def _find_layers(model) -> Tuple[str, torch.nn.ModuleList]:
    """The decoder-layer ModuleList of a causal LM and its qualified name."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    count = getattr(model.config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            classes = {type(child).__name__ for child in module}
            if classes & layer_classes or (not layer_classes and len(module) == count):
                candidates.append((name, module))
    if len(candidates) != 1:
        raise CalibrationError(
            f"{type(model).__name__}: cannot identify the decoder layers "
            f"({len(candidates)} candidate module lists); use streaming=False"
        )
    return candidates[0]


def _linear_modules(layers_name: str, layers: torch.nn.ModuleList, modules: Any) -> Dict[int, Dict[str, torch.nn.Linear]]:
    """The decoder-layer Linear modules whose weights ``modules`` selects, by layer index."""
    from mergekit_safety.engine.modules import ModuleSelectionError, select

    candidates: Dict[str, Tuple[int, str, torch.nn.Linear]] = {}
    for index, layer in enumerate(layers):
        for relative, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and relative:
                full = f"{layers_name}.{index}.{relative}"
                candidates[f"{full}.weight"] = (index, full, module)
    shapes = {name: tuple(module.weight.shape) for name, (_, _, module) in candidates.items()}
    try:
        names = select(candidates, modules, is_linear=lambda _name: True, shapes=shapes)
    except ModuleSelectionError as error:
        raise CalibrationError(f"no Linear module of the decoder layers matches modules={modules!r} ({error})") from None
    chosen = set(names)
    selected: Dict[int, Dict[str, torch.nn.Linear]] = {}
    for name, (index, full, module) in candidates.items():  # the model's module order
        if name in chosen:
            selected.setdefault(index, {})[full] = module
    return selected


# --------------------------------------------------------------------------- hooks


class _Accumulator:
    """Forward pre-hooks that add the selected tokens of each module's input to its stats."""

    def __init__(self):
        self.stats: Dict[str, ChannelStats] = {}
        self.tokens: Optional[torch.Tensor] = None  # (batch, time) bool of the current batch
        self._handles = []
        self._shared_input: Optional[torch.Tensor] = None
        self._shared_moments: Optional[BlockMoments] = None

    def attach(self, name: str, module: torch.nn.Linear) -> None:
        if name not in self.stats:
            self.stats[name] = ChannelStats.empty(module.in_features)

        def hook(_module, args, kwargs=None):
            x = args[0] if args else kwargs["input"]
            mask = self.tokens
            if mask is None or x.shape[:2] != mask.shape:
                raise CalibrationError(f"{name}: unexpected input shape {tuple(x.shape)} for the token mask")
            # q/k/v_proj (and gate/up_proj) receive the very same input tensor: summarise it
            # once per forward and give every reader the same moments
            if self._shared_input is not x:
                self._shared_input, self._shared_moments = x, block_moments(x[mask])
            self.stats[name].add_moments(self._shared_moments)

        self._handles.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._shared_input = self._shared_moments = None


# --------------------------------------------------------------------------- public API


def collect_statistics(
    model_path: str,
    examples: Sequence[Mapping[str, Any]],
    modules: Any = DEFAULT_MODULES,
    token_scope: TokenScope = "response",
    batch_size: int = 8,
    streaming: bool = True,
    weights: Optional[WeightSource] = None,
    tokenizer: Any = None,
    max_length: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    description: str = "calibration",
    device: str = "cpu",
) -> Dict[str, ChannelStats]:
    """Per-input-channel statistics of the selected decoder-layer Linear modules.

    ``model_path``: model directory (config, tokenizer; weights unless ``weights`` is given).
    ``examples``: dicts with ``prompt`` and ``response`` (encoded with the model's tokenizer /
    chat template), or pre-encoded dicts with ``input_ids`` (+ optional ``response_mask``).
    ``token_scope``: ``"response"`` (response tokens only) or ``"all"`` (every non-padding
    token). ``device``: where the forward passes run (``cpu``, ``cuda``, ``cuda:1``, ...); in
    streaming mode one decoder layer at a time is moved there. The statistics always end up on
    the CPU in float64. Returns ``{weight name: ChannelStats}``, weight names as in the
    checkpoint (e.g. ``model.layers.0.mlp.down_proj.weight``).
    """
    from transformers import AutoConfig

    if batch_size < 1:
        raise CalibrationError("batch_size must be >= 1")
    device = resolve_device(device)
    config = AutoConfig.from_pretrained(model_path)
    if tokenizer is None and any("input_ids" not in e for e in examples):
        tokenizer = load_tokenizer(model_path)
    if not max_length:
        max_length = default_max_length(config)
    encoded = encode_examples(tokenizer, examples, max_length=max_length)
    batches = [tuple(t.to(device) for t in batch)
               for batch in _batches(encoded, batch_size, pad_id(tokenizer, config), token_scope)]
    if weights is None:
        weights = SafetensorsSource(model_path) if streaming else None
    with torch.inference_mode():
        if streaming:
            stats = _collect_streaming(config, weights, batches, modules, dtype, progress, description, device)
        else:
            stats = _collect_in_memory(model_path, config, weights, batches, modules, dtype, progress, description,
                                       device)
    return {f"{name}.weight": value for name, value in stats.items()}


#: cap of the default token limit: a record longer than the model's context (or than this) is
#: cut, with a warning naming it, instead of asking for an unbounded allocation
MAX_DEFAULT_LENGTH = 2048


def default_max_length(config: Any) -> int:
    """The model's context length (``max_position_embeddings``), at most 2048 tokens."""
    context = getattr(config, "max_position_embeddings", None) or getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    return min(int(context), MAX_DEFAULT_LENGTH) if context else MAX_DEFAULT_LENGTH


def load_tokenizer(model_path: str, fallbacks: Sequence[str] = ()):
    from mergekit_safety.engine.tokenizer import TokenizerError
    from mergekit_safety.engine.tokenizer import load_tokenizer as load

    try:
        return load(model_path, fallbacks)
    except TokenizerError as error:
        raise CalibrationError(f"{model_path}: cannot load its tokenizer ({error})") from None


def _skeleton(config, dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _load_embedding_rows(embedding: torch.nn.Embedding, name: str, source: WeightSource, used: torch.Tensor, dtype) -> None:
    """``embedding`` (on meta) with the rows ``used`` of checkpoint tensor ``name`` only; the
    caller maps token ids to positions in ``used``."""
    rows = source.get_rows(name, used)
    source.release()
    if rows.dim() != 2 or rows.shape[1] != embedding.embedding_dim or int(used.max()) >= embedding.num_embeddings:
        raise CalibrationError(
            f"{source.describe()}: tensor {name} gives rows of shape {list(rows.shape)}, the model config "
            f"expects {embedding.num_embeddings} × {embedding.embedding_dim}"
        )
    embedding.weight = torch.nn.Parameter(rows.to(dtype), requires_grad=False)
    embedding.num_embeddings = rows.shape[0]
    if embedding.padding_idx is not None:  # only a gradient matters here; keep it a valid row or none
        where = (used == embedding.padding_idx).nonzero()
        embedding.padding_idx = int(where[0]) if len(where) else None


def _load_module(module: torch.nn.Module, prefix: str, source: WeightSource, dtype, what: str) -> None:
    """Materialise ``module`` (on meta) on CPU with its tensors from ``source``: the loaded
    tensors become the parameters (``assign``), so a layer is never held twice."""
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        full = f"{prefix}{name}"
        try:
            tensor = source.get(full)
        except CalibrationError:
            raise
        except Exception as error:  # noqa: BLE001
            raise CalibrationError(f"{source.describe()}: cannot read tensor {full} ({error})") from error
        if tuple(tensor.shape) != tuple(value.shape):
            raise CalibrationError(
                f"{source.describe()}: tensor {full} has shape {list(tensor.shape)}, the model "
                f"config expects {list(value.shape)}"
            )
        state[name] = tensor.to(dtype if value.is_floating_point() else value.dtype)
    source.release()
    module.load_state_dict(state, strict=True, assign=True)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_meta:
            raise CalibrationError(
                f"{what}: {prefix}{name} cannot be loaded from the checkpoint (a non-persistent "
                "buffer?); this architecture is not supported by streaming calibration "
                "(use streaming=False)"
            )


def _rebuild_buffers(module: torch.nn.Module, config, skip: Sequence[str] = ()) -> None:
    """Re-create submodules whose non-persistent buffers (rotary inv_freq) sit on meta."""
    for name, child in list(module.named_modules()):
        if name.split(".")[0] in skip:
            continue
        own = [b for _, b in child.named_buffers(recurse=False)]
        if own and any(b.is_meta for b in own) and not any(True for _ in child.parameters(recurse=False)):
            try:
                with torch.device("cpu"):
                    fresh = type(child)(config=getattr(child, "config", config))
            except Exception as error:  # noqa: BLE001
                raise CalibrationError(
                    f"cannot re-create {type(child).__name__} ({name}) with its buffers for "
                    f"streaming calibration ({error}); use streaming=False"
                ) from error
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attribute, fresh)


def _quiet(progress: bool) -> Dict[str, Any]:
    """tqdm arguments: progress=False silences the bar; otherwise tqdm's own default (and its
    TQDM_DISABLE environment switch) applies."""
    return {} if progress else {"disable": True}


def _release_memory() -> None:
    """Give freed layer memory back to the OS. glibc's malloc raises its mmap threshold after
    large frees and then keeps freed layer-sized blocks in its heap, so without a trim the
    resident size grows by about one layer per layer although nothing is referenced."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class _StopForward(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer: records its inputs, passes the hidden states through."""

    def __init__(self, layer: torch.nn.Module, index: int, record: Dict[int, Any], last: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self._index = index
        object.__setattr__(self, "_record", record)
        self._last = last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self._record[self._index] = (hidden_states, args, kwargs)
        if self._last:
            raise _StopForward
        return hidden_states


def resolve_device(device: Any) -> torch.device:
    """``device`` as a torch device that exists on this machine, or a CalibrationError that says
    which device was asked for and why it cannot be used."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise CalibrationError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...): {error}") from None
    if resolved.type == "meta":
        raise CalibrationError("device 'meta' holds no data: choose cpu or an accelerator")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CalibrationError(f"device {device!r}: no CUDA device is available on this machine (torch "
                                   f"{torch.__version__}); use device: cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise CalibrationError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CalibrationError(f"device {device!r}: MPS is not available on this machine; use device: cpu")
    backend = getattr(torch, resolved.type, None) if resolved.type not in ("cpu", "cuda", "mps") else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise CalibrationError(f"device {device!r}: no {resolved.type.upper()} device is available on this machine; use device: cpu")
    return resolved


def _collect_streaming(config, source: WeightSource, batches, modules, dtype, progress: bool, description: str,
                       device: torch.device = torch.device("cpu")):
    from tqdm.auto import tqdm

    model = _skeleton(config, dtype)
    model.eval()
    layers_name, layers = _find_layers(model)
    selected = _linear_modules(layers_name, layers, modules)
    last_needed = max(selected)
    originals = list(layers)

    # Everything outside the decoder layers and the output head: embeddings, norms, rotary.
    base_name = getattr(model, "base_model_prefix", "model")
    backbone = getattr(model, base_name, None)
    if backbone is None or not layers_name.startswith(base_name + "."):
        raise CalibrationError(f"{type(model).__name__}: unexpected module layout; use streaming=False")
    layers_attribute = layers_name[len(base_name) + 1:]
    # The input embedding holds only the rows of the tokens in the batches (ids remapped to
    # them): a vocabulary-sized matrix is the largest tensor of a small model, and its whole
    # (or, for a fused model, its inputs') pages would set the pass's peak memory.
    embedding = model.get_input_embeddings()
    compact = isinstance(embedding, torch.nn.Embedding)
    used = torch.unique(torch.cat([batch[0].reshape(-1).cpu() for batch in batches])) if compact else None
    remapped = False  # only an embedding that is the backbone's own child is read by rows
    for name, child in backbone.named_children():
        if name == layers_attribute:
            continue
        if compact and child is embedding:
            _load_embedding_rows(child, f"{base_name}.{name}.weight", source, used, dtype)
            remapped = True
        elif any(True for _ in child.parameters()):
            _load_module(child, f"{base_name}.{name}.", source, dtype, type(model).__name__)
    _rebuild_buffers(backbone, config, skip=(layers_attribute.split(".")[0],))
    for name, child in backbone.named_children():
        if name != layers_attribute:
            child.to(device)
    if remapped:
        used_on = used.to(device)
        batches = [(torch.searchsorted(used_on, ids), attention, tokens) for ids, attention, tokens in batches]

    # One pass of the model's own code with catchers: what each layer receives, per batch.
    carried: List[torch.Tensor] = []
    layer_inputs: List[Dict[int, Any]] = []
    for batch_index, (input_ids, attention_mask, _tokens) in enumerate(batches):
        record: Dict[int, Any] = {}
        for index, layer in enumerate(originals):
            layers[index] = _Catcher(layer, index, record, last=index == len(originals) - 1)
        try:
            backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for index, layer in enumerate(originals):
                layers[index] = layer
        if len(record) != len(originals):
            raise CalibrationError(f"{type(model).__name__}: the forward pass skipped decoder layers; use streaming=False")
        first = record[0][0]
        for index in range(len(originals)):
            if record[index][0].shape != first.shape:
                raise CalibrationError(
                    f"{type(model).__name__}: decoder layers do not return bare hidden states; "
                    "use streaming=False"
                )
        carried.append(first.clone())
        layer_inputs.append({index: (args, kwargs) for index, (_h, args, kwargs) in record.items()})
    for name, child in backbone.named_children():
        if name != layers_attribute:
            child.to("meta")

    accumulator = _Accumulator()
    for index in range(last_needed + 1):
        layer = originals[index]
        _load_module(layer, f"{layers_name}.{index}.", source, dtype, f"layer {index}")
        layer.to(device)
        for name, module in selected.get(index, {}).items():
            accumulator.attach(name, module)
        bar = tqdm(batches, desc=f"{description}: layer {index + 1}/{last_needed + 1}", leave=False, **_quiet(progress))
        for batch_index, (_ids, _attention, tokens) in enumerate(bar):
            accumulator.tokens = tokens
            args, kwargs = layer_inputs[batch_index][index]
            output = layer(carried[batch_index], *args, **kwargs)
            if isinstance(output, (tuple, list)):
                output = output[0]
            carried[batch_index] = output
        bar.close()
        accumulator.detach()
        accumulator.tokens = None
        layer.to("meta")  # free the layer before the next one is loaded
        _release_memory()
    return accumulator.stats


def _collect_in_memory(model_path: str, config, source: Optional[WeightSource], batches, modules, dtype, progress: bool,
                       description: str, device: torch.device = torch.device("cpu")):
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    if source is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = {}
        for name in model.state_dict():
            if source.has(name) if hasattr(source, "has") else name in source.names():
                state[name] = source.get(name).to(dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [m for m in missing if m not in tied]
        if missing:
            raise CalibrationError(f"{source.describe()}: missing tensors {missing[:5]}")
    model.to(device)
    model.eval()
    layers_name, layers = _find_layers(model)
    selected = _linear_modules(layers_name, layers, modules)
    accumulator = _Accumulator()
    for modules in selected.values():
        for name, module in modules.items():
            accumulator.attach(name, module)
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"))
    for input_ids, attention_mask, tokens in tqdm(batches, desc=description, leave=False, **_quiet(progress)):
        accumulator.tokens = tokens
        backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    accumulator.detach()
    return accumulator.stats


def direct_statistics(activations: Iterable[torch.Tensor]) -> ChannelStats:
    """Reference computation from whole (tokens, channels) blocks (tests, sanity checks)."""
    x = torch.cat([a.reshape(-1, a.shape[-1]).to(torch.float64) for a in activations])
    stats = ChannelStats.empty(x.shape[1])
    stats.count = int(x.shape[0])
    stats.sum_sq = (x * x).sum(0)
    stats.mean = x.mean(0)
    stats.m2 = ((x - stats.mean) ** 2).sum(0)
    return stats


def linear_weight_names(model_path: str, modules: Any = DEFAULT_MODULES) -> List[str]:
    """Checkpoint names of the selected decoder-layer Linear weights (no weights are read)."""
    from transformers import AutoConfig

    model = _skeleton(AutoConfig.from_pretrained(model_path), torch.float32)
    layers_name, layers = _find_layers(model)
    selected = _linear_modules(layers_name, layers, modules)
    return [f"{name}.weight" for index in sorted(selected) for name in selected[index]]
