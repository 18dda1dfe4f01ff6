"""The kvcompress hook specifications (pluggy project "kvcompress").

Each hook is a collector: every plugin returns a list of descriptors, the registry flattens them.
Implement a hook with `@kvcompress.hookimpl` in your plugin module and expose that module through the
entry point group "kvcompress" (see docs/writing-a-plugin.md). Keep plugin modules light: import torch
and Triton inside factories, not at module level.
"""

from __future__ import annotations

import pluggy

from kvcompress.methods import (
    CodebookMethod,
    EstimatorMethod,
    EvictorMethod,
    ModelAdapter,
    PrunerMethod,
    QuantizerMethod,
    ReaderMethod,
    TransformMethod,
)

PROJECT = "kvcompress"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvcompress_quantizers() -> list[QuantizerMethod]:
    """Cache quantizers this plugin provides.

    Example::

        class HalfSpec(MethodSpec):
            method: Literal["half"] = "half"

        @hookimpl
        def kvcompress_quantizers():
            return [QuantizerMethod(name="half", spec=HalfSpec, factory=make_half_quantizer)]
    """


@hookspec
def kvcompress_estimators() -> list[EstimatorMethod]:
    """Attention estimators: scores and value mixes computed from packed state.

    Example::

        @hookimpl
        def kvcompress_estimators():
            return [EstimatorMethod(name="qjl", spec=QJLEstimatorSpec, factory=make_estimator,
                                    quantizers=frozenset({"qjl"}), roles=frozenset({"keys"}))]
    """


@hookspec
def kvcompress_codebooks() -> list[CodebookMethod]:
    """Codebook sources and learners for quantizers with learned constants.

    Example::

        @hookimpl
        def kvcompress_codebooks():
            return [CodebookMethod(name="kmeans", spec=KMeansSpec, factory=load_codebook,
                                   learn=learn_codebook, quantizers=frozenset({"rvq"}))]
    """


@hookspec
def kvcompress_transforms() -> list[TransformMethod]:
    """Orthogonal transforms applied to keys/values (and queries) before quantization.

    Example::

        @hookimpl
        def kvcompress_transforms():
            return [TransformMethod(name="hadamard", spec=HadamardSpec, factory=make_hadamard)]
    """


@hookspec
def kvcompress_pruners() -> list[PrunerMethod]:
    """Channel pruners: choose which channels a role stores, from what the model showed.

    Example::

        @hookimpl
        def kvcompress_pruners():
            return [PrunerMethod(name="think", spec=ThinKSpec, factory=make_think,
                                 roles=frozenset({"keys"}), observes=frozenset({"queries"}))]
    """


@hookspec
def kvcompress_evictors() -> list[EvictorMethod]:
    """Token evictors: which tokens a layer keeps (the spec's `evict` field). The spec model subclasses
    EvictionSpec, which carries the budget (`keep` or `budget`) and when to apply it (`every`).

    Example::

        class RecentSpec(EvictionSpec):
            method: Literal["recent"] = "recent"

        @hookimpl
        def kvcompress_evictors():
            return [EvictorMethod(name="recent", spec=RecentSpec, factory=make_recent)]
    """


@hookspec
def kvcompress_readers() -> list[ReaderMethod]:
    """Layer-level readers: attention over a layer's packed keys and values read together (a fused kernel for
    a pair of quantizer methods). Layers whose pair no reader declares use the default, which goes through the
    estimators.

    Example::

        @hookimpl
        def kvcompress_readers():
            return [ReaderMethod(name="kivi-fused", factory=make_reader,
                                 keys=frozenset({"scalar"}), values=frozenset({"scalar"}))]
    """


@hookspec
def kvcompress_model_adapters() -> list[ModelAdapter]:
    """Model adapters: how kvcompress.patch finds the attention modules of an architecture, captures its keys
    before RoPE and applies its RoPE. Adapters are chosen by the model's config.model_type, never named in
    spec files. `load` is called on first use; the adapter's module imports transformers, this one must not.

    Example::

        def load_neox():
            from kvcompress_absmax.neox import GPTNeoXAdapter

            return GPTNeoXAdapter()

        @hookimpl
        def kvcompress_model_adapters():
            return [ModelAdapter(name="gpt-neox", model_types=frozenset({"gpt_neox"}), load=load_neox)]
    """
