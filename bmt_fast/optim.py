"""SVGD as a torch optimizer over one particle tensor."""

from __future__ import annotations

import inspect
import types
import weakref

from typing import Any, Callable

import torch

from ._validation import as_rows, check_bandwidth, check_particles
from .backends import select
from .ops import svgd_step

Score = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

# torch optimizers whose update of an element reads other elements of the tensor (Adafactor's factored second
# moment: means over rows and columns; Muon: the whole update orthogonalised): over slices of the particles on
# several ranks each rank would see its own slice only, so they cannot move them as one process would.
_MIXING_OPTIMIZERS = tuple(getattr(torch.optim, name) for name in ("Adafactor", "Muon") if hasattr(torch.optim, name))

_MAXIMIZE = (
    "maximize=True: SVGD already moves the particles up log p (it gives the inner optimizer -phi to descend)"
)


class SVGD(torch.optim.Optimizer):
    """Stein variational gradient descent with any torch optimizer doing the update.

    `step(score)` computes phi = svgd_step(particles, score), sets particles.grad = -phi and runs the
    inner optimizer, so particles ascend along phi with the inner optimizer's step rule (Adagrad is the
    SVGD paper's choice; Adam, SGD, RMSprop... work the same way; LBFGS, whose step searches along a
    loss that phi is not the gradient of, is refused). Learning-rate schedulers, state_dict and
    load_state_dict (with their hooks), deepcopy and pickling behave as for the inner optimizer.

        particles = torch.randn(100, 2, requires_grad=True)
        opt = SVGD(particles, torch.optim.Adam, lr=1e-2)
        for _ in range(500):
            opt.step(score_fn)            # a tensor of scores, or a callable particles -> scores

    Or as torch's optimizers are driven, from a loss that is the negative log density (summed over the
    particles), whose gradient is -score: `loss.backward(); opt.step()`, or `opt.step(closure=closure)`
    with a closure that clears the gradient, computes such a loss, calls backward and returns the loss.
    For these the constructor sets particles.requires_grad = True (the tensor passed, not a copy), so the
    particles are then a leaf autograd tracks, as an nn.Parameter: edit them in place under torch.no_grad(),
    and read their values through particles.detach() (e.g. .detach().numpy()).

    With `group=` (a torch.distributed process group), each rank passes its own slice of the particles
    and the kernel couples all of them (see `bmt_fast.svgd_step`); torch's first-order optimizers (SGD,
    Adam, Adagrad, RMSprop...) act elementwise, so the ranks together move the particles as one process would
    (Adafactor and Muon, whose updates mix elements across the tensor, are refused there).
    """

    def __init__(
        self,
        particles: torch.Tensor,
        optimizer: type[torch.optim.Optimizer] = torch.optim.Adagrad,
        *,
        bandwidth: str | float | torch.Tensor = "median",
        backend: str = "auto",
        check_inputs: bool = True,
        group: "torch.distributed.ProcessGroup | None" = None,
        **optimizer_kwargs: Any,
    ):
        if not isinstance(particles, torch.Tensor):
            raise TypeError(
                f"particles must be one torch.Tensor of shape (n, *event), got {type(particles).__name__}"
            )
        if not particles.is_leaf:
            raise TypeError("particles must be a leaf tensor (e.g. torch.nn.Parameter or a tensor you created)")
        if not particles.is_floating_point():
            raise TypeError(f"particles must be floating point, got {particles.dtype}")
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer class, got {optimizer!r}")
        if issubclass(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "optimizer: LBFGS searches along a loss its closure re-evaluates; the SVGD direction phi is not "
                "the gradient of any loss: use a first-order optimizer (Adagrad, Adam, SGD, RMSprop, ...)"
            )
        if group is not None and issubclass(optimizer, _MIXING_OPTIMIZERS):
            # (each rank's update would read its own slice only: Adafactor had moved the particles 0.1 - 0.2 away
            # from one process's in 5 steps, silently)
            raise TypeError(
                f"optimizer: {optimizer.__name__}'s update mixes elements across the tensor, so ranks that hold "
                "slices of the particles (group=) cannot move them as one process would: use an elementwise "
                "optimizer (Adagrad, Adam, SGD, RMSprop, ...)"
            )
        if optimizer_kwargs.get("maximize"):
            # grad = -phi for the inner rule's descent: maximize=True had moved the particles against phi
            # (N(1, 0.5 I): their mean went to -1.46 in 30 Adam steps), silently
            raise ValueError(f"{_MAXIMIZE}; leave maximize out")
        # (a sparse or 0-dim tensor: refused here, where it had failed at the first step or inside the optimizer)
        check_particles("particles", particles, min_rows=0)
        check_bandwidth(bandwidth, particles)
        rows = as_rows(particles.detach())  # an unknown or unavailable backend, named now (no rows: a one-row probe)
        select(backend, "svgd_step", rows if rows.shape[0] else rows.new_empty((1, rows.shape[1])))
        particles.requires_grad_(True)
        self.inner = optimizer([particles], **optimizer_kwargs)
        self._refuse_maximize("the optimizer")
        self.particles = particles
        self.bandwidth = bandwidth
        self.backend = backend
        self.check_inputs = check_inputs
        self.group = group
        super().__init__([particles], dict(self.inner.defaults))
        self._share_inner_state()

    def _refuse_maximize(self, where: str) -> None:
        # (set by an optimizer subclass's defaults, or in param_groups since: the keyword check misses those)
        if any(group.get("maximize") for group in self.inner.param_groups):
            raise ValueError(f"{_MAXIMIZE}; {where} has maximize=True in its param groups: set it to False")

    def _share_inner_state(self) -> None:
        # One set of param groups and state: schedulers that edit lr here reach the inner optimizer.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, score: Score | None = None, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SVGD step. With `score` (a tensor, or a callable particles -> scores): returns phi, the ascent
        direction that was applied (before the inner rule). Without it, the score is -particles.grad: a
        `closure` (as torch optimizers take one, also positionally: a callable that takes no argument is the
        closure, one that takes the particles a score) is called first to compute it (it should clear the gradient,
        compute the negative log density summed over the particles, call backward and return it), and its
        loss is returned; with neither, the gradient a backward left on the particles is used and phi returned.

        particles.grad is set to -phi: written into the existing gradient tensor when there is one (as
        autograd accumulates into it), else a new tensor."""
        if closure is None and _takes_no_arguments(score):  # step(closure), as torch optimizers are called
            score, closure = None, score
        from_grad = score is None and closure is None
        if self.group is None:
            loss, score = self._score(score, closure)
        else:  # an error here (no gradient, a bad score, the closure's own) is raised on every rank, as
            # svgd_step's own checks are: raised on this rank alone, the others had waited in the step's
            # all-gather until the group's timeout
            from . import distributed

            with distributed.failing_together(self.group):
                loss, score = self._score(score, closure)
                self._check_state_shapes()
        if from_grad and self._initialising_state(score):
            # torch.distributed.checkpoint's state initialisation: its zero gradient goes on as it is
            phi = torch.zeros_like(self.particles)
        else:
            phi = svgd_step(
                self.particles.detach(),
                score.detach(),
                self.bandwidth,
                backend=self.backend,
                check_inputs=self.check_inputs,
                group=self.group,
            )
            grad = self.particles.grad  # torch keeps .grad to the particles' shape, dtype and device
            if grad is not None and grad.layout == torch.strided:
                # In place, as autograd accumulates into an existing .grad: no fresh n x d tensor to page in
                # (16 x 409,600 on a 2-core VM: 4,500 page faults, ~18 -> ~12 ms per step).
                torch.neg(phi, out=grad)
            else:
                self.particles.grad = -phi
        # The inner optimizer's own step, below torch's hook wrapper: this step ran the step hooks (global and
        # this optimizer's) once already; through inner.step the global ones had run a second time.
        inner_step = type(self.inner).step
        getattr(inner_step, "__wrapped__", inner_step)(self.inner)
        return phi if closure is None else loss

    def _score(self, score: Score | None, closure: Callable[[], Any] | None) -> tuple[Any, torch.Tensor]:
        """step's (loss, score): the closure's loss (None without one) and the particles' scores, read from
        `score` (a tensor or a callable) or from -particles.grad."""
        self._refuse_maximize("the optimizer")  # (before anything changes)
        loss = None
        if score is None:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            grad = self.particles.grad
            if grad is None:
                raise RuntimeError(
                    "SVGD.step needs a score: pass one (a tensor or a callable particles -> scores), or a closure "
                    "whose backward of the negative log density sets particles.grad, or call backward first"
                )
            # (a sparse gradient, e.g. of nn.Embedding(sparse=True): densified, where it had been refused as a
            # sparse `score` the caller never passed)
            score = -(grad if grad.layout == torch.strided else grad.to_dense())
        elif closure is not None:
            raise TypeError("SVGD.step takes a score or a closure, not both")
        if callable(score):
            fn = score
            with torch.enable_grad():
                score = fn(self.particles)
            if isinstance(score, torch.Tensor) and score.dim() == 0 and self.particles.dim() > 0:
                raise TypeError(
                    "SVGD.step(fn): fn(particles) returned a 0-dim tensor, a loss, not the particles' scores; for a "
                    "closure pass step(closure=fn) (fn can take an argument, so it was taken for a score)"
                )
        if not isinstance(score, torch.Tensor):
            raise TypeError(f"score must be a tensor or a callable returning one, got {type(score).__name__}")
        return loss, score

    def _check_state_shapes(self) -> None:
        """With group=: the inner optimizer's per-element state (moments, momentum, sums: the elementwise
        optimizers that a group allows keep them in the particles' shape) fits this rank's slice. A state dict
        saved on a rank with another number of rows had failed in the inner step, on that rank alone and after
        the step's collectives, so the other ranks went on and waited in the next step until the group's
        timeout; here it is raised on every rank, before anything moves."""
        for key, value in self.state.get(self.particles, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != self.particles.shape:
                raise ValueError(
                    f"the optimizer's state {key!r} has shape {tuple(value.shape)}, these particles "
                    f"{tuple(self.particles.shape)}: was its state dict saved on a rank holding another slice? "
                    "Load each rank's own state dict"
                )

    def _initialising_state(self, score: torch.Tensor) -> bool:
        """Whether this step is torch.distributed.checkpoint's initialisation of a fresh optimizer's state
        (get_optimizer_state_dict and friends): no state yet, every lr 0 and an all-zero gradient. Its
        gradient goes to the inner optimizer as it is, which then sets up its state as after its own
        zero-gradient step; taken as a zero score instead, it had put -phi(x, 0), the kernel's repulsion, into
        the momentum or the moments (SGD momentum 0.9: particles 0.04 away from an unsaved run's after 3
        steps). With group= the ranks agree (one all-gather, on such a first step only, after the ranks' own
        checks: a rank that failed there meets it with its failure's all-gather, and every rank raises that).
        (A real first step of a warm-up from lr 0 whose score is exactly zero is taken as one: its phi, the
        repulsion alone, does not enter the state.)"""
        if self.state or any(float(group.get("lr", 1.0)) != 0.0 for group in self.param_groups):
            return False
        zero = not bool(score.any())
        if self.group is not None:  # (a rank whose own checks failed meets this all-gather with its failure)
            from . import distributed

            zero = distributed.holds_on_every_rank(zero, self.group)
        return zero

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # state_dict: torch's own (Optimizer.state_dict, hooks included), of the param groups and state shared
    # with the inner optimizer, i.e. the inner optimizer's state dict.

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The inner optimizer loads it (its class's __setstate__ fills in defaults that older state dicts
        # lack), between this optimizer's own load hooks.
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = pre_hook(self, state_dict)
            if changed is not None:
                state_dict = changed
        if any(group.get("maximize") for group in state_dict.get("param_groups", ())):
            raise ValueError(  # (as in __init__: a state dict of an optimizer with maximize=True had set it here)
                "the state dict has maximize=True: SVGD already moves the particles up log p (it gives the inner "
                "optimizer -phi to descend); set its param groups' maximize to False"
            )
        self.inner.load_state_dict(state_dict)
        self._share_inner_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps defaults, state and param_groups only: a deepcopy or an unpickled SVGD had no inner
        # optimizer or particles and could not step
        state = super().__getstate__()
        state.update(
            inner=self.inner, particles=self.particles, bandwidth=self.bandwidth, backend=self.backend,
            check_inputs=self.check_inputs, group=None if self.group is None else _SharedGroup(self.group),
        )  # fmt: skip
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("group"), _SharedGroup):
            state = {**state, "group": state["group"].group}
        super().__setstate__(state)
        self._share_inner_state()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "inner", None) is None or not self.param_groups:
            super().add_param_group(param_group)  # called once by Optimizer.__init__
            return
        raise RuntimeError("SVGD optimises one particle tensor; create another SVGD for other particles")


class _SharedGroup:
    """An SVGD's process group in its pickled state: a deepcopy shares the group (a process-level handle,
    as a device is); pickling it (torch.save) is refused with what to do instead. (A ProcessGroup cannot be
    pickled: both had raised "cannot pickle ... ProcessGroup object".)"""

    def __init__(self, group: Any):
        self.group = group

    def __deepcopy__(self, memo: dict) -> "_SharedGroup":
        return self

    def __reduce__(self):
        raise TypeError(
            "an SVGD with group= cannot be pickled (torch.save): a process group is this process's own; save "
            "its state_dict() and load it into an SVGD made with the group where it is loaded"
        )


def _takes_no_arguments(fn: object) -> bool:
    """A callable that cannot take one positional argument but can take none: a closure, not a score (one
    that can take either is a score, as documented: step raises a clear error where it returns a loss).
    Read from its code where it is a plain function or bound method, or a cached reading of its signature:
    a step passes its score callable every time (inspect.signature had cost 20-40 us per step)."""
    if fn is None or isinstance(fn, torch.Tensor) or not callable(fn):
        return False
    func, bound = (fn.__func__, 1) if isinstance(fn, types.MethodType) else (fn, 0)
    if isinstance(func, types.FunctionType) and not hasattr(func, "__wrapped__"):
        code = func.__code__
        takes_one = code.co_argcount - bound >= 1 or bool(code.co_flags & inspect.CO_VARARGS)
        keyword_required = code.co_kwonlyargcount - len(func.__kwdefaults__ or {})
        return not takes_one and keyword_required == 0
    try:
        return _SIGNATURE_READINGS[fn]
    except (KeyError, TypeError):  # (TypeError: no weak reference to it, a builtin say: read every time)
        pass
    reading = _reads_as_closure(fn)
    try:
        _SIGNATURE_READINGS[fn] = reading
    except TypeError:
        pass
    return reading


_SIGNATURE_READINGS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _reads_as_closure(fn: Any) -> bool:
    if isinstance(fn, torch.jit.ScriptFunction):  # (no Python signature: its schema)
        return not fn.schema.arguments
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # (no signature to read: taken as a score, as before)
        return False
    try:
        signature.bind(None)
        return False
    except TypeError:
        pass
    try:
        signature.bind()
        return True
    except TypeError:
        return False
