"""Launch plans: a warm launch goes straight to the compiled kernel's launcher.

``kernel[grid](...)`` runs Triton's JIT Python on every call: the binder, the specialisation of
every argument, the cache key, the grid function, through ``triton.autotune`` also its key and
config lookup; measured on this machine's CPU with a stub driver, 12 µs with 7 arguments, 30 µs with
33 and 69 µs through the autotuner. :func:`launch` keeps, per launch site and per specialisation of
its arguments, the compiled kernel Triton chose, its grid and its constexpr values, and from the
second call on hands the arguments to the compiled kernel's C launcher itself (what ``kernel[grid]``
ends in), so a warm launch costs a dictionary lookup on a key made of the arguments' integers,
dtypes and pointer alignments.

The key is finer than Triton's own specialisation (every integer by value, not only ``== 1`` and
``% 16``; every tensor by dtype and 16-byte alignment; floats by type), so a plan never launches a
kernel specialised for other arguments. The first call of a key, the CPU interpreter, and any run
with Triton's launch hooks set (a profiler such as proton) take the regular ``kernel[grid]`` path.
"""

from __future__ import annotations

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


_plans: dict[tuple, _Plan] = {}
_INTERPRETED = interpreter_enabled()  # read once: the kernels were defined under the same switch
# False: every launch takes ``kernel[grid]`` (a comparison of the two paths, as the host-cost
# benchmark and the call-count test make).
plans_enabled = True


def _key(kernel: Any, tensors: tuple, scalars: tuple, constants: dict) -> tuple:
    return (
        id(kernel),  # a JITFunction hashes by its source's cache key: ~1 µs
        *[(t.dtype, t.data_ptr() & 15) for t in tensors],
        *[float if s.__class__ is float else s for s in scalars],
        *constants.values(),
    )


def _plan(kernel: Any, grid: Any, tensors: tuple, scalars: tuple, constants: dict, compiled: Any):
    """The plan of a launch that ``kernel[grid]`` has just made and that returned ``compiled``."""
    function = kernel.fn if isinstance(kernel, Autotuner) else kernel
    values = dict(constants)
    if isinstance(kernel, Autotuner):
        values.update(kernel.best_config.kwargs)
    names = function.arg_names
    positional = len(tensors) + len(scalars)
    for param in function.params[positional:]:
        if param.name not in values:
            values[param.name] = param.default
    tail = tuple(values[name] for name in names[positional:])
    if callable(grid):
        grid = grid({**dict(zip(names, (*tensors, *scalars))), **values})
    grid = (*grid, 1, 1)[:3]
    return _Plan(compiled, grid, tail)


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is set: Triton 3.9 keeps a chain of hooks that is empty by default,
    earlier versions None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(
    name: str,
    declare: Callable[[], Declared],
    kernel: Any,
    grid: Any,
    tensors: tuple[Tensor, ...],
    scalars: tuple = (),
    constants: Optional[dict[str, Any]] = None,
    observed: bool = False,
) -> None:
    """``kernel[grid](*tensors, *scalars, **constants)``, from the second call of the same
    specialisation on without Triton's per-call Python. ``tensors`` are the pointer arguments and
    come first in the kernel's signature, ``scalars`` follow them; ``constants`` are the constexpr
    and launch options (num_warps, num_stages) by name. ``name`` and ``declare`` (what the launch
    reads and writes) are for an installed observer (pnnh_kernels.observer), which alone calls
    ``declare``; it is checked here, not in a frame of its own (``observed``: the observer's own
    call of the launch)."""
    constants = constants or {}
    watcher = observer.observer
    if watcher is not None and not observed:
        watcher.observe_launch(
            name,
            "triton",
            lambda: launch(name, declare, kernel, grid, tensors, scalars, constants, observed=True),
            declare(),
        )
        return
    if _INTERPRETED or not plans_enabled or _hooked(knobs.runtime.launch_enter_hook):
        kernel[grid](*tensors, *scalars, **constants)
        return
    key = _key(kernel, tensors, scalars, constants)
    plan = _plans.get(key)
    if plan is None:
        compiled = kernel[grid](*tensors, *scalars, **constants)
        _plans[key] = _plan(kernel, grid, tensors, scalars, constants, compiled)
        return
    compiled = plan.compiled
    active = driver.active
    stream = active.get_current_stream(active.get_current_device())
    grid_x, grid_y, grid_z = plan.grid
    compiled.run(
        grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, None,
        None, None, *tensors, *scalars, *plan.constants,
    )  # fmt: skip


def clear() -> None:
    """Forget every plan (tests; a plan holds no tensor)."""
    _plans.clear()
