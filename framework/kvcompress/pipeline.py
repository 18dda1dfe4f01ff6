"""Spec -> per-layer codecs: the registry's factories assembled into one object per layer and role."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kvcompress.errors import KVCompressError, PluginError, SpecError
from kvcompress.methods import EVICTION, ROLES, LayerContext, Role
from kvcompress.plugins import Registry, get_registry
from kvcompress.runtime import ChannelPruner, Estimator, Evictor, Observation, Quantizer, Reader, Transform
from kvcompress.spec import AUTO_CENTER, CacheSpec, PipelineSpec, parse_layer_selection
from kvcompress.spec_base import EvictionSpec, MethodSpec
from kvcompress.state import PackedState
from kvcompress_kernels.partial import scores_partial

# The names under which a state holds its per-sequence tensors (PackedState.shared): a pruned state's channel
# selection, a centered state's center (per-channel median).
CHANNELS = "channels"
CENTER = "center"


@dataclass
class RoleCodec:
    """The stages of one role of one layer: pruner -> transform -> quantizer, read back through the estimator.

    observes: what the pruner reads from an Observation (empty without a pruner).
    method: the quantizer's method name (what layer-level readers match on).
    center: each sequence's per-channel median (float32 [batch, kv_heads, head_dim], taken from the first tokens
    encoded and held in the state's shared tensors) is subtracted before the stages and added back when read
    (True); "auto": only where it holds most of the energy (kvcompress.spec.AUTO_CENTER), zero elsewhere.
    """

    name: str
    quantizer: Quantizer
    estimator: Estimator
    transform: Transform | None = None
    pruner: ChannelPruner | None = None
    observes: frozenset[str] = frozenset()
    method: str = ""
    center: bool | str = False

    @property
    def token_block(self) -> int:
        return self.quantizer.token_block

    def encode(
        self, x: torch.Tensor, observation: Observation | None = None, shared: dict[str, torch.Tensor] | None = None
    ) -> PackedState:
        """Pack x [batch, kv_heads, tokens, head_dim]. shared: the per-sequence tensors of the state these tokens
        will be appended to, whose channel selection a pruner keeps; without them the pruner selects from x and
        `observation`."""
        _check_finite(x, self.name)
        if x.shape[2] % self.token_block:
            raise ValueError(f"{self.name}: encode needs a multiple of {self.token_block} tokens, got {x.shape[2]}")
        held: dict[str, torch.Tensor] = {}
        if self.center:
            held[CENTER] = shared[CENTER] if shared else self._center(x)
            x = (x.float() - held[CENTER][:, :, None]).to(x.dtype)
        if self.pruner is not None:
            held[CHANNELS] = shared[CHANNELS] if shared else self._select(x, observation)
            x = _gather_channels(x, held[CHANNELS])
        if self.transform is not None:
            x = self.transform.forward(x)
        state = self.quantizer.encode(x)
        if held:
            state.shared = {**state.shared, **held}
        return state

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        """Each (sequence, head)'s per-channel median over x's tokens, float32 [batch, kv_heads, head_dim]; under
        `auto`, zero where centering would leave AUTO_CENTER or more of the energy (no large offset to take)."""
        x = x.float()
        center = x.median(2).values
        if self.center == "auto":
            left = (x - center[:, :, None]).square().sum((2, 3)) / x.square().sum((2, 3)).clamp_min(torch.finfo(x.dtype).tiny)
            center = torch.where((left < AUTO_CENTER)[..., None], center, 0.0)
        return center

    def _select(self, x: torch.Tensor, observation: Observation | None) -> torch.Tensor:
        """The pruner's channel choice, checked and stored in the smallest integer type that holds it."""
        missing = [name for name in sorted(self.observes) if getattr(observation, name, None) is None]
        if missing:
            raise KVCompressError(
                f"{self.name}: the pruner needs the {' and '.join(missing)} the model's attention saw, and none were "
                "captured. Run the model patched by kvcompress (kvcompress.cache_for / kvcompress.patch)"
            )
        channels = self.pruner.select(x, observation or Observation())
        expected = (x.shape[0], x.shape[1], self.pruner.kept)
        if tuple(channels.shape) != expected or channels.min() < 0 or channels.max() >= x.shape[3]:
            raise KVCompressError(
                f"{self.name}: the pruner returned channel indices of shape {tuple(channels.shape)} in "
                f"[{channels.min().item()}, {channels.max().item()}]; expected {expected} in [0, {x.shape[3]})"
            )
        return channels.to(torch.uint8 if x.shape[3] <= 256 else torch.int16)

    def decode(self, state: PackedState) -> torch.Tensor:
        x = self.quantizer.decode(state)
        x = self.transform.inverse(x) if self.transform is not None else x
        x = self._unprune(x, state)
        return x if not self.center else (x.float() + state.shared[CENTER][:, :, None]).to(x.dtype)

    def scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        """query grouped by KV head [batch, kv_heads, n, head_dim] -> [batch, kv_heads, n, tokens] (float32 when
        centered: the center's share is added to every token's score)."""
        scores = self.stored_scores(query, state)
        offset = self.score_offset(query, state)
        return scores if offset is None else scores.float() + offset[..., None]

    def stored_scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        """Scores against the vectors as stored: without the center's share when centered (score_offset)."""
        return self.estimator.scores(self.stored_query(query, state), state)

    def score_offset(self, query: torch.Tensor, state: PackedState) -> torch.Tensor | None:
        """What centering takes from every token's score, <query, center>: float32 [batch, kv_heads, n] (None when
        not centered). Readers add it to the partial's log-sum-exp (times the scale), where it is exact."""
        if not self.center:
            return None
        return torch.einsum("bhnd,bhd->bhn", query.float(), state.shared[CENTER])

    def mix(self, weights: torch.Tensor, state: PackedState) -> torch.Tensor:
        mix = self.restored_mix(self.estimator.mix(weights, state), state)
        if not self.center:
            return mix
        return (mix.float() + weights.float().sum(-1, keepdim=True) * state.shared[CENTER][:, :, None]).to(mix.dtype)

    def value_offset(self, state: PackedState) -> torch.Tensor | None:
        """What centering takes from every vector: float32 [batch, kv_heads, 1, head_dim] (None when not
        centered). A normalized mix gets it back whole."""
        return state.shared[CENTER][:, :, None] if self.center else None

    def stored_query(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        """A query [batch, kv_heads, n, head_dim] in the space the state's vectors are stored in: the kept
        channels, transformed (what estimators and fused readers score against)."""
        if self.pruner is not None:
            query = _gather_channels(query, state.shared[CHANNELS])
        return self.transform.forward(query) if self.transform is not None else query

    def restored_mix(self, mix: torch.Tensor, state: PackedState) -> torch.Tensor:
        """A mix of the state's stored vectors [batch, kv_heads, n, kept] back in head space: the inverse
        transform, pruned channels as zeros."""
        mix = self.transform.inverse(mix) if self.transform is not None else mix
        return self._unprune(mix, state)

    def _unprune(self, x: torch.Tensor, state: PackedState) -> torch.Tensor:
        """Kept channels back in place among zeros: the pruned channels contribute nothing."""
        if self.pruner is None:
            return x
        index = _channel_index(state.shared[CHANNELS], x.shape[2])
        return x.new_zeros(*x.shape[:-1], self.pruner.head_dim).scatter_(-1, index, x)

    def constants(self) -> dict[str, torch.Tensor]:
        found = dict(self.quantizer.constants())
        if self.transform is not None:
            found.update({f"transform.{k}": v for k, v in self.transform.constants().items()})
        return found


def _check_finite(x: torch.Tensor, name: str) -> None:
    """Refuse NaN or Inf in a tensor to compress. On CUDA the check is a device-side assertion
    (torch._assert_async): an exact check would sync the host on every encode, stalling the decode loop. It fails
    at the next synchronization with this message, and a failed device assertion ends the process's CUDA context
    (rerun with CUDA_LAUNCH_BLOCKING=1 to see the encode that raised it). Elsewhere it raises ValueError at once;
    the sum screens (a NaN or Inf makes it non-finite), the elementwise test confirms (a sum can also overflow)."""
    what = "non-finite values (NaN or Inf) in the tensor to compress; the model produced them upstream of the cache " \
        "(check its dtype and inputs)"
    if x.is_cuda:
        torch._assert_async(torch.isfinite(x).all(), f"{name}: {what}")
    elif not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # one fast pass; NaN and Inf reach the sum
        raise ValueError(f"{name}: {(~torch.isfinite(x)).sum().item()} {what}")


class EstimatorReader(Reader):
    """The default reader: the keys' estimator scores, the values' estimator mixes (each through its role's
    pruner and transform)."""

    def __init__(self, keys: RoleCodec, values: RoleCodec):
        self.keys, self.values = keys, values

    def attend(self, query, keys, values, bias, scale, softcap):
        scores = self.keys.stored_scores(query, keys).float().mul_(scale)
        # Centered keys: <q, center> is the same for every token, so it moves the log-sum-exp, not the weights
        # (added to the scores instead under softcapping, which is not shift-invariant).
        offset = self.keys.score_offset(query, keys)
        if offset is not None and softcap is not None:
            scores += scale * offset[..., None]
            offset = None
        weights, lse = scores_partial(scores, bias, softcap)
        if offset is not None:
            lse = lse + scale * offset
        return self.values.mix(weights.to(query.dtype), values).float(), lse


class FusedDecodeReader(EstimatorReader):
    """A reader with a fused kernel for decode: `fused` where kvcompress_kernels.dispatch.use_triton says (CUDA
    tensors, or KVCOMPRESS_KERNELS=triton) for decode-sized query blocks (at most MAX_DECODE_ROWS query rows per
    KV head), the estimator path, which is the kernel's reference, elsewhere. The query goes through the keys'
    codec first (kept channels, rotation) and the output through the values' codec after, once per read.

    splits: programs sharing a head's tokens (None: enough to fill the GPU)."""

    def __init__(self, keys: RoleCodec, values: RoleCodec, splits: int | None = None):
        super().__init__(keys, values)
        self.splits = splits

    def attend(self, query, keys, values, bias, scale, softcap):  # typed and documented by Reader.attend
        from kvcompress_kernels.decode import MAX_DECODE_ROWS
        from kvcompress_kernels.dispatch import use_triton

        if self.keys.center and softcap is not None:
            # the offset must enter the scores before the cap, which the kernels do not do: the estimator path,
            # in float32 as the kernels compute
            return super().attend(query.float(), keys, values, bias, scale, softcap)
        if query.shape[2] > MAX_DECODE_ROWS or keys.tokens == 0 or not use_triton(query):
            return super().attend(query, keys, values, bias, scale, softcap)
        out, lse = self.fused(self.keys.stored_query(query, keys), keys, values, bias, scale, softcap)
        out = self.values.restored_mix(out, values).float()
        offset, center = self.keys.score_offset(query, keys), self.values.value_offset(values)
        if offset is not None:
            lse = lse + scale * offset
        return (out if center is None else out + center), lse

    @abstractmethod
    def fused(self, query: torch.Tensor, keys: PackedState, values: PackedState, bias: torch.Tensor | None,
              scale: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel: Reader.attend's contract for a query already in the keys' stored space, the output in the
        values' stored space."""


@dataclass
class LayerCodecs:
    """Everything one cache layer needs: window and sinks, a codec per role, the reader of both, and the
    evictor with its spec (budget, when) and what it observes, if the layer evicts tokens."""

    layer: int
    window: int
    sinks: int
    keys: RoleCodec
    values: RoleCodec
    compress_run: int = 1
    reader: Reader | None = None
    evictor: Evictor | None = None
    eviction: EvictionSpec | None = None
    evictor_observes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.reader is None:
            self.reader = EstimatorReader(self.keys, self.values)

    @property
    def token_block(self) -> int:
        """Keys and values compress the same token range, so blocks are a multiple of both."""
        return math.lcm(self.keys.token_block, self.values.token_block)

    @property
    def run(self) -> int:
        """Tokens compressed together: compress_run rounded up to a multiple of the token block."""
        return -(-self.compress_run // self.token_block) * self.token_block

    @property
    def observes(self) -> frozenset[str]:
        """What the cache must capture for this layer's pruners and evictor (empty: nothing)."""
        return self.keys.observes | self.values.observes | self.evictor_observes


def _channel_index(channels: torch.Tensor, rows: int) -> torch.Tensor:
    """channels [batch, kv_heads, kept] as a gather/scatter index for [batch, kv_heads, rows, kept]."""
    return channels.long()[:, :, None, :].expand(-1, -1, rows, -1)


def _gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """x [batch, kv_heads, n, head_dim] restricted to channels [batch, kv_heads, kept]."""
    return x.gather(-1, _channel_index(channels, x.shape[2]))


class StageError(KVCompressError):
    """A method's factory refused its spec for this layer's shape (a group that does not divide head_dim, a
    codebook of another shape...): build_codecs turns it into a SpecError with the field path."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


def _made(made: Any, stage: str, method: str, registry: Registry) -> Any:
    """A factory's product, or PluginError naming the distribution whose factory returned nothing."""
    if made is None:
        plugin = registry.provided(stage)[method].plugin
        raise PluginError(
            f"the {stage} factory of {method!r} (plugin {plugin.name!r}, distribution {plugin.distribution}) returned "
            "None; a factory must return the object it builds"
        )
    return made


@contextmanager
def _stage(path: str) -> Iterator[None]:
    """Factories check the spec against the model's shape and raise ValueError (or their own KVCompressError):
    report it as a problem of the spec field `path`."""
    try:
        yield
    except (SpecError, PluginError, StageError):
        raise
    except (ValueError, KVCompressError) as exc:
        raise StageError(path, str(exc)) from exc


def build_pruner(
    spec: MethodSpec, ctx: LayerContext, registry: Registry
) -> tuple[ChannelPruner, frozenset[str], LayerContext]:
    """The pruner of a pipeline, what it observes, and the context of the later stages (its kept channels)."""
    method = registry.get("pruner", spec.method)
    with _stage(f"{ctx.role}.pruner"):
        pruner = _made(method.factory(spec, ctx), "pruner", method.name, registry)
        if not 0 < pruner.kept <= ctx.head_dim:
            raise ValueError(
                f"{method.name!r} keeps {pruner.kept} channels; it must keep between 1 and head_dim ({ctx.head_dim})"
            )
    return pruner, method.observes, replace(ctx, head_dim=pruner.kept)


def build_transform(spec: MethodSpec, ctx: LayerContext, registry: Registry) -> Transform:
    """The transform of a pipeline for ctx's layer and role (calibration builds it too, to learn codebooks in
    the space the quantizer sees)."""
    with _stage(f"{ctx.role}.transform"):
        return _made(registry.get("transform", spec.method).factory(spec, ctx), "transform", spec.method, registry)


def build_role_codec(
    pipeline: PipelineSpec, ctx: LayerContext, registry: Registry
) -> RoleCodec:
    pruner, observes = None, frozenset()
    if pipeline.pruner is not None:
        pruner, observes, ctx = build_pruner(pipeline.pruner, ctx, registry)
    codebook = None
    if pipeline.codebook is not None:
        with _stage(f"{ctx.role}.codebook"):
            made_for = replace(ctx, transform=pipeline.transform)
            codebook = registry.get("codebook", pipeline.codebook.method).factory(pipeline.codebook, made_for)
            _made(codebook, "codebook", pipeline.codebook.method, registry)
        ctx = replace(ctx, codebook=codebook)
    quantizer_method = registry.get("quantizer", pipeline.quantizer.method)
    with _stage(f"{ctx.role}.quantizer"):
        quantizer = _made(quantizer_method.factory(pipeline.quantizer, ctx), "quantizer", quantizer_method.name, registry)
    estimator_spec = pipeline.estimator or registry.get("estimator", quantizer_method.estimator or "decode").spec()
    with _stage(f"{ctx.role}.estimator"):
        estimator = registry.get("estimator", estimator_spec.method).factory(estimator_spec, replace(ctx, quantizer=quantizer))
        _made(estimator, "estimator", estimator_spec.method, registry)
    transform = build_transform(pipeline.transform, ctx, registry) if pipeline.transform is not None else None
    stages = "+".join(stage.method for stage in (pipeline.pruner, pipeline.quantizer) if stage is not None)
    name = f"layer {ctx.layer} {ctx.role} ({stages})"
    return RoleCodec(
        name=name, quantizer=quantizer, estimator=estimator, transform=transform, pruner=pruner, observes=observes,
        method=pipeline.quantizer.method, center=pipeline.center,
    )


def build_codecs(
    spec: CacheSpec,
    num_layers: int,
    head_dim: int,
    kv_heads: int,
    model: str | None = None,
    registry: Registry | None = None,
) -> list[LayerCodecs]:
    """One LayerCodecs per model layer, overrides applied."""
    registry = registry or get_registry()
    spec.check_layers(num_layers)
    spec_dir = str(Path(spec.source).resolve().parent) if spec.source else None
    layers = []
    for index in range(num_layers):
        try:
            layers.append(_layer_codecs(spec, index, num_layers, head_dim, kv_heads, spec_dir, model, registry))
        except StageError as exc:
            path = _field_path(spec, index, exc.path)
            raise SpecError(
                [f"{path}: {exc.problem} (layer {index} of a model with {num_layers} layers, {kv_heads} KV heads, "
                 f"head_dim {head_dim})"],
                spec.source,
            ) from exc
    return layers


def _field_path(spec: CacheSpec, index: int, path: str) -> str:
    """Where layer `index` took the stage at `path` ("keys.quantizer", "evict") from: its override, or the top."""
    for key, override in spec.layers.items():
        if any(index in r for r in parse_layer_selection(key)):
            node: object = override
            for part in path.split("."):
                node = getattr(node, part, None)
            if node is not None:
                return f"layers.{key}.{path}"
    return path


def _layer_codecs(
    spec: CacheSpec, index: int, num_layers: int, head_dim: int, kv_heads: int, spec_dir: str | None,
    model: str | None, registry: Registry,
) -> LayerCodecs:
    """The codecs, evictor and reader of layer `index`."""
    plan = spec.layer(index)
    ctx = LayerContext(
        layer=index, num_layers=num_layers, role="keys", head_dim=head_dim, kv_heads=kv_heads,
        spec_dir=spec_dir, model=model,
    )
    roles: dict[Role, RoleCodec] = {
        role: build_role_codec(getattr(plan, role), replace(ctx, role=role), registry) for role in ROLES
    }
    layer = LayerCodecs(layer=index, window=plan.window, sinks=plan.sinks, compress_run=spec.compress_run, **roles)
    if plan.evict is not None:
        method = registry.get(EVICTION.name, plan.evict.method)
        with _stage(EVICTION.name):
            layer.evictor = _made(method.factory(plan.evict, ctx), EVICTION.name, method.name, registry)
            layer.eviction = plan.evict
        layer.evictor_observes = method.observes
    reader = next((r.method for r in registry.readers() if r.method.reads(layer.keys.method, layer.values.method)), None)
    if reader is not None:
        layer.reader = reader.factory(layer, ctx)
    return layer
