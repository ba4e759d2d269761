"""Host kernel variants a test run needs, named before it runs, so that conftest builds them up
front (``_host.prebuild``: several per g++ run, one run per CPU) instead of one g++ run at a time
as each test first needs one. A test module declares the variants of its parametrized cases with
``kernel_variants(item) -> [(expression, emulate_gpu, count_bytes), ...]`` (None: not declared),
the arguments of ``_host.library``; a bare expression stands for the plain build
``(expression, False, False)``. conftest fails
a declared test that launches a variant it did not declare, so the declarations cannot drift from
what the tests run."""
from __future__ import annotations

import torch

from sj_temporal_fusion import surrogate
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.variants import backward_variant, forward_variant


def call_variants(model: str, dtype: torch.dtype, options: dict, surrogate_function, param_grads: bool,
                  grad: bool = True, fold_bn: bool = False) -> list[str]:
    """The variants ``functional.neuron_multi_step(x_seq of dtype, model=model, **options)`` launches:
    its forward, and with ``grad`` the backward (``param_grads``: a learnable option takes part;
    ``fold_bn``: a BatchNorm folded in)."""
    m = REGISTRY[model]
    o = dict(m.defaults, **options)
    names = [forward_variant(m, dtype, m.forward_form(o), fold_bn)]
    if grad:
        names.append(backward_variant(m, dtype, surrogate.spec(surrogate_function).id, m.form(o), param_grads,
                                      fold_bn))
    return names


def declared(item) -> list[tuple[str, bool, bool]] | None:
    hook = getattr(item.module, "kernel_variants", None)
    variants = None if hook is None or not hasattr(item, "callspec") else hook(item)
    if variants is None:
        return None
    return [(v, False, False) if isinstance(v, str) else tuple(v) for v in variants]


def declared_by_flags(items) -> dict[tuple[bool, bool], list[str]]:
    """{(emulate_gpu, count_bytes): expressions} declared by ``items``, in test order."""
    out: dict[tuple[bool, bool], dict[str, None]] = {}
    for item in items:
        for expression, *flags in declared(item) or ():
            out.setdefault(tuple(flags), {})[expression] = None
    return {flag: list(names) for flag, names in out.items()}
