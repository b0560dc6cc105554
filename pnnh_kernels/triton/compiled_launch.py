"""Launch plans: a warm launch goes straight to the compiled kernel's launcher.

``kernel[grid](...)`` runs Triton's JIT Python on every call: the binder, the specialisation of
every argument, the cache key, the grid function, through ``triton.autotune`` also its key and
config lookup; measured on the development CPU with a stub driver, 12 µs with 7 arguments, 30 µs
with 33 and 69 µs through the autotuner.

A launcher describes each of its launches once per shape as a :class:`Site` (the kernel, its grid,
its integer arguments and constexprs: everything fixed by the shape, the dtype and the flags, made
by an ``lru_cache``'d function of those), and calls :func:`launch` with the site, the tensors and
any float arguments. A site keeps, per specialisation of its tensors (dtype and 16-byte alignment of
each), the compiled kernel Triton chose on the first call, its grid and its constexpr values; from
the second call on the arguments go to the compiled kernel's C launcher itself (what
``kernel[grid]`` ends in). The key is finer than Triton's own specialisation (every integer by
value: the site is made per value), so a plan never launches a kernel specialised for other
arguments. The first call of a key, the CPU interpreter and any run with Triton's launch hooks set
(a profiler such as proton) take the regular ``kernel[grid]`` path.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable
from typing import Any, Optional

from torch import Tensor
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

from pnnh_kernels import observer
from pnnh_kernels.observer import Declared
from pnnh_kernels.triton.availability import interpreter_enabled


class _Plan:
    __slots__ = ("compiled", "constants", "grid")

    def __init__(self, compiled: Any, grid: tuple[int, int, int], constants: tuple) -> None:
        self.compiled = compiled
        self.grid = grid
        self.constants = constants


class Site:
    """The fixed part of one launch: ``kernel[grid](*tensors, *scalars, *floats, **constants)``
    with ``scalars`` (integers) and ``constants`` (constexprs and launch options) fixed; the
    tensors and floats come with each call. Holds the plans of its specialisations."""

    __slots__ = ("__weakref__", "constants", "grid", "kernel", "name", "plans", "scalars")

    def __init__(
        self, name: str, kernel: Any, grid: Any, scalars: tuple[int, ...], constants: dict[str, Any]
    ) -> None:
        self.name = name
        self.kernel = kernel
        self.grid = grid
        self.scalars = scalars
        self.constants = constants
        self.plans: dict[tuple, Optional[_Plan]] = {}
        _sites.add(self)


_sites: weakref.WeakSet[Site] = weakref.WeakSet()
_DTYPE = operator.attrgetter("dtype")
_UNPLANNED: Any = object()
_POINTER = Tensor.data_ptr
_INTERPRETED = interpreter_enabled()  # read once: the kernels were defined under the same switch
# False: every launch takes ``kernel[grid]`` (a comparison of the two paths, as the host-cost
# benchmark and the call-count test make).
plans_enabled = True


def _plan(site: Site, arguments: tuple, compiled: Any) -> Optional[_Plan]:
    """The plan of a launch that ``kernel[grid]`` has just made with ``arguments`` (tensors, scalars
    and floats) and that returned ``compiled``; None where the compiled kernel does not offer the
    launcher that Triton 3.4-3.9 call (``run``, ``function``, ``packed_metadata``): such a Triton
    takes the regular path on every launch."""
    if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
        return None
    kernel = site.kernel
    function = kernel.fn if isinstance(kernel, Autotuner) else kernel
    values = dict(site.constants)
    if isinstance(kernel, Autotuner):
        values.update(kernel.best_config.kwargs)
    names = function.arg_names
    positional = len(arguments)
    for param in function.params[positional:]:
        if param.name not in values:
            values[param.name] = param.default
    tail = tuple(values[name] for name in names[positional:])
    grid = site.grid
    if callable(grid):
        grid = grid({**dict(zip(names, arguments)), **values})
    grid = (*grid, 1, 1)[:3]
    return _Plan(compiled, grid, tail)


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is set: Triton 3.9 keeps a chain of hooks that is empty by default,
    earlier versions None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(
    site: Site,
    declare: Callable[[], Declared],
    tensors: tuple[Tensor, ...],
    floats: tuple[float, ...] = (),
    observed: bool = False,
) -> None:
    """One launch of ``site`` with ``tensors`` (its pointer arguments, first in the kernel's
    signature) and ``floats`` (after its integers). ``declare`` (what the launch reads and writes)
    is for an installed observer (pnnh_kernels.observer), which alone calls it; the observer is
    checked here, not in a frame of its own (``observed``: the observer's own call of the launch)."""
    watcher = observer.observer
    if watcher is not None and not observed:
        watcher.observe_launch(
            site.name,
            "triton",
            lambda: launch(site, declare, tensors, floats, observed=True),
            declare(),
        )
        return
    if _INTERPRETED or not plans_enabled or _hooked(knobs.runtime.launch_enter_hook):
        site.kernel[site.grid](*tensors, *site.scalars, *floats, **site.constants)
        return
    # Triton specialises a pointer on its dtype and on 16-byte alignment: C-level maps, and one
    # alignment test for the common case where every pointer is aligned.
    dtypes = tuple(map(_DTYPE, tensors))
    misaligned = functools.reduce(operator.or_, map(_POINTER, tensors), 0) & 15
    key = dtypes if not misaligned else (dtypes, tuple(p & 15 for p in map(_POINTER, tensors)))
    plan = site.plans.get(key, _UNPLANNED)
    if plan is _UNPLANNED or plan is None:  # a first launch, or a Triton without the launcher
        compiled = site.kernel[site.grid](*tensors, *site.scalars, *floats, **site.constants)
        if plan is _UNPLANNED:
            site.plans[key] = _plan(site, (*tensors, *site.scalars, *floats), compiled)
        return
    compiled = plan.compiled
    active = driver.active
    stream = active.get_current_stream(active.get_current_device())
    grid_x, grid_y, grid_z = plan.grid
    compiled.run(
        grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, None,
        None, None, *tensors, *site.scalars, *floats, *plan.constants,
    )  # fmt: skip


def clear() -> None:
    """Forget every compiled plan (tests, the stub launch path; a plan holds no tensor)."""
    for site in list(_sites):
        site.plans.clear()
