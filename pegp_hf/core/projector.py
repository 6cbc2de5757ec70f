"""PEGP applied to live parameters: the bases of all protected tensors, gradient projection, update re-projection."""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.core.subspace import empty_basis, grow_axis_basis, grow_basis, project_out
from pegp_hf.utils import key_mismatch


class GradientProjector:
    """The old-feature bases of a model's protected tensors, and the projections that keep old outputs fixed.

    Invariant: ``bases[name]`` is ``(d, k)`` float32 with orthonormal columns, on the parameter's device, ``d`` the
    tensor's feature dim. A tensor whose basis is empty (``k = 0``) trains freely.

    Parameters may be FSDP2 ``DTensor``s: every operation acts on the local rows.

    Per optimizer step, in order:
      1. :meth:`project_gradients` once the gradients are final (after accumulation / all-reduce, before clipping);
      2. :meth:`snapshot` just before ``optimizer.step()``;
      3. :meth:`finish_update` right after it: optionally re-projects ``delta W`` (for Adam-like optimizers or weight
         decay, whose update is not a combination of projected gradients) and measures ``max |delta W U|``.
    """

    def __init__(self, tensors: list[ProtectedTensor]) -> None:
        self.tensors = {t.name: t for t in tensors}
        if len(self.tensors) != len(tensors):
            raise ValueError("protected tensors must have distinct names")
        self.bases: dict[str, torch.Tensor] = {
            t.name: empty_basis(t.feature_dim).to(t.parameter.device) for t in tensors
        }
        # k_ref per tensor: its basis's first k_ref columns came from a reference set (task 0), see grow()
        self.reference_dims: dict[str, int] = {}
        self._order = list(self.tensors.values())
        self._grouped: _Layout | None = None  # see _layout()
        self._snapshotted: list[_Group] | None = None  # the groups snapshot() filled, until finish_update()

    @property
    def active(self) -> bool:
        """True once any tensor has a non-empty basis."""
        return any(basis.shape[1] > 0 for basis in self.bases.values())

    def dims(self) -> dict[str, int]:
        """Protected dimensions ``k`` per tensor."""
        return {name: basis.shape[1] for name, basis in self.bases.items()}

    def saturated(self) -> list[str]:
        """Tensors whose basis spans their whole feature space (``k = d``): their gradient is projected to zero, so
        they are frozen in effect (``r x r`` spaces such as LoRA B or adapter up fill after a few tasks)."""
        return [name for name, basis in self.bases.items() if basis.shape[1] == self.tensors[name].feature_dim]

    def dims_by_kind(self) -> dict[str, tuple[int, int, int]]:
        """Per tensor kind (``lora_A``, ``prompt``, ...): protected dims ``k`` and feature dims ``d`` summed over its
        tensors, and their count."""
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for name, basis in self.bases.items():
            tensor = self.tensors[name]
            totals[tensor.kind][0] += basis.shape[1]
            totals[tensor.kind][1] += tensor.feature_dim
            totals[tensor.kind][2] += 1
        return {kind: (k, d, n) for kind, (k, d, n) in sorted(totals.items())}

    def describe(self) -> str:
        """``kind k/d (xn)`` per tensor kind, e.g. ``lora_A 410/1536 (x16)``: protected over feature dims."""
        return ", ".join(f"{kind} {k}/{d} (x{n})" for kind, (k, d, n) in self.dims_by_kind().items()) or "none"

    def grow(
        self,
        covariances: Mapping[str, torch.Tensor],
        threshold: float,
        names: Iterable[str] | None = None,
        reference: bool = False,
    ) -> list[str]:
        """Grow the bases of ``names`` (default: every tensor) with the feature covariance of the task just finished
        (GPM rule, ``threshold`` = eps); the others stay as they are.

        With ``reference``, the covariances are a reference set's ("task 0"): the columns grown are remembered as
        :attr:`reference_dims`. A task's covariance ``C`` then grows such a tensor's basis as ``P C P``, with ``P``
        the projector onto the complement of its reference columns: the weight never acts on the reference span
        (``"null"`` tensors start and stay orthogonal to it, ``"grow"`` ones keep those coordinates), so only the
        task's features outside it reach the branch, and the threshold must hold of their energy, not of the
        total (else a task whose features lie mostly in the reference span would get no direction of its own).

        Returns the names of tensors whose basis became full this time (``k = d``: the tensor is frozen from now on).
        """
        grown_names = list(self.tensors) if names is None else list(names)
        missing = sorted(set(grown_names) - set(covariances))
        if missing:
            raise RuntimeError(
                f"no features were captured for {len(missing)} protected tensors (e.g. {missing[0]}): "
                "the feature pass never ran through them"
            )
        # a sum shared by tensors with one input (q_proj / v_proj's lora_A) grows once: (id, rule) -> (old, new);
        # each tensor keeps its own copy, so no two bases share memory when saved
        newly_full, grown = [], {}
        for name in grown_names:
            tensor = self.tensors[name]
            old, covariance = self.bases[name], covariances[name]
            grow = grow_axis_basis if tensor.axis_aligned else grow_basis
            key = (id(covariance), grow)
            if key not in grown or not torch.equal(grown[key][0], old):
                reference_span = old[:, : self.reference_dims.get(name, 0)].cpu()
                task_part = _outside(covariance, reference_span)
                grown[key] = (old, grow(task_part, threshold, old.cpu()))
            new = grown[key][1].clone().to(tensor.parameter.device)
            if new.shape[1] == tensor.feature_dim and old.shape[1] < tensor.feature_dim:
                newly_full.append(name)
            self.bases[name] = new
            if reference:
                self.reference_dims[name] = new.shape[1]
        return newly_full

    def reference_tensors(self) -> list[ProtectedTensor]:
        """The tensors a reference set protects (``ProtectedTensor.reference`` set): their bases grow from it."""
        return [tensor for tensor in self.tensors.values() if tensor.reference is not None]

    @torch.no_grad()
    def null_reference_weights(self) -> None:
        """``W <- W - (W U) U^T`` for every ``reference="null"`` tensor: once its basis holds the reference features,
        ``W x_ref = W r`` with ``r`` their part outside the basis (at most ``1 - eps`` of their energy), so the PET
        branch (``B A x``, ``W_up act(W_down x)``) outputs next to nothing on them, whatever the other factor
        becomes; projected gradients keep it so. The null-space start of LoRA-Null / InfLoRA, kept by every step."""
        for _, tensor, basis in self._with_basis():
            if tensor.reference == "null":
                rows = tensor.rows(_local(tensor.parameter))
                rows.copy_(project_out(rows, basis))

    def check_bases(self, bases: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` unless ``bases`` names exactly the protected tensors with ``(d, k <= d)`` shapes."""
        mismatch = key_mismatch(self.tensors, bases)
        if mismatch:
            raise ValueError(f"subspace bases do not match the model's protected tensors: {mismatch}")
        for name, basis in bases.items():
            dim = self.tensors[name].feature_dim
            if basis.ndim != 2 or basis.shape[0] != dim or basis.shape[1] > dim:
                raise ValueError(
                    f"subspace basis {name} has shape {tuple(basis.shape)}; the model needs ({dim}, k<={dim})"
                )

    def load_bases(self, bases: Mapping[str, torch.Tensor], reference_dims: Mapping[str, int] | None = None) -> None:
        """Replace every basis after :meth:`check_bases`, and :attr:`reference_dims` (none by default)."""
        self.check_bases(bases)
        reference_dims = dict(reference_dims or {})
        for name, count in reference_dims.items():
            if name not in bases or not 0 <= count <= bases[name].shape[1]:
                raise ValueError(f"reference_dims[{name!r}] = {count} does not fit its basis")
        self.reference_dims = reference_dims
        self.bases = {  # copies: the caller's tensors may change later, and the stacked groups key on identity
            name: bases[name].to(device=t.parameter.device, dtype=torch.float32, copy=True)
            for name, t in self.tensors.items()
        }

    def project_gradient(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        """The projection of one gradient of tensor ``name``, for ``Tensor.register_hook`` (DeepSpeed): a new
        tensor, or ``gradient`` itself while the basis is empty."""
        basis, tensor = self.bases[name], self.tensors[name]
        return gradient if basis.shape[1] == 0 else tensor.rows(project_out(tensor.rows(gradient), basis))

    def _with_basis(self) -> Iterator[tuple[str, ProtectedTensor, torch.Tensor]]:
        for name, tensor in self.tensors.items():
            basis = self.bases[name]
            if basis.shape[1] > 0:
                yield name, tensor, basis

    def _layout(self) -> _Layout:
        """The tensors with a basis, grouped by the shape, dtype and device of their local rows (see :class:`_Group`),
        with the parameters as read for this call (a step reads each once: :meth:`_rows_of`).

        Rebuilt, with fresh buffers, when a basis is replaced (bases are replaced, never edited in place:
        :meth:`grow` and :meth:`load_bases` make new tensors) or a parameter is, or changes shape, dtype or device.
        The check reads each parameter once (``owner._parameters``) and compares identities: a step pays a few
        microseconds for it, not a rebuild."""
        bases = list(self.bases.values())
        parameters = [tensor.parameter for tensor in self._order]
        layout = [(p.shape, p.dtype, p.device) for p in parameters]
        cached = self._grouped
        if (
            cached is not None
            and all(map(operator.is_, cached.bases, bases))
            and all(map(operator.is_, cached.parameters, parameters))
            and cached.layout == layout
        ):
            return cached
        members: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for position, (tensor, parameter) in enumerate(zip(self._order, parameters, strict=True)):
            basis = self.bases[tensor.name]
            if basis.shape[1] > 0:
                rows = tensor.rows(_local(parameter))
                members[tuple(rows.shape), rows.dtype, rows.device].append((position, basis))
        groups = []
        for (_, dtype, device), group in members.items():
            width = max(basis.shape[1] for _, basis in group)
            stacked = torch.stack([F.pad(basis, (0, width - basis.shape[1])) for _, basis in group])
            # on the rows' device: a model moved after its bases were loaded (FSDP2 on a resume) keeps them elsewhere
            stacked = stacked.to(device=device, dtype=torch.promote_types(dtype, stacked.dtype))
            groups.append(_Group([position for position, _ in group], stacked))
        # the bases and parameters are kept alive with the groups, so that no new tensor can reuse their ids
        self._grouped = _Layout(bases, parameters, layout, groups)
        return self._grouped

    def _rows_of(self, layout: _Layout, group: _Group, gradients: bool = False) -> list[torch.Tensor | None]:
        """The local ``(..., d)`` rows of ``group``'s parameters (or of their gradients, ``None`` where missing), from
        the parameters ``layout`` read."""
        tensors = [(self._order[i], layout.parameters[i]) for i in group.positions]
        if not gradients:
            return [tensor.rows(_local(parameter)) for tensor, parameter in tensors]
        return [None if p.grad is None else tensor.rows(_local(p.grad)) for tensor, p in tensors]

    def release_buffers(self) -> None:
        """Drop the groups with their stacked bases and kept buffers (workspace, snapshot: about the size of the
        protected gradients in float32 plus the parameters); the next call makes them again. For memory accounting,
        or to free them while no step runs: a pending :meth:`snapshot` is dropped too (``finish_update`` then
        raises)."""
        self._grouped, self._snapshotted = None, None

    @torch.no_grad()
    def project_gradients(self) -> None:
        """``G <- G - (G U) U^T`` for every protected gradient, in place (fp32 math, one batched product per group of
        equally shaped tensors, in a workspace kept from step to step; inf / NaN pass through)."""
        layout = self._layout()
        for group in layout.groups:
            rows = self._rows_of(layout, group, gradients=True)
            if all(row is not None for row in rows):
                group.project_out(rows)
                continue
            present = [i for i, row in enumerate(rows) if row is not None]
            if present:  # a tensor the backward did not reach (or frozen): stacked for this step, no workspace
                rows = [rows[i] for i in present]
                torch._foreach_copy_(rows, _project_out_stacked(torch.stack(rows), group.bases[present]).unbind(0))

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the protected parameters before the optimizer step: per group, the members' rows copied with
        one ``torch._foreach_copy_`` into a stacked ``(n, ..., d)`` buffer kept from the last snapshot of the same
        groups; :meth:`finish_update` subtracts them as they are, with no stacking of its own."""
        layout = self._layout()
        for group in layout.groups:
            group.snapshot(self._rows_of(layout, group))
        self._snapshotted = layout.groups

    @torch.no_grad()
    def finish_update(self, reproject: bool, measure: bool = True) -> torch.Tensor | None:
        """After the step: ``delta W = W - W_before``; if ``reproject``, ``W = W_before + delta W - (delta W U) U^T``.

        Returns ``[max |delta W U|, max |delta W|]`` over all protected tensors as a 2-element float32 tensor on the
        parameters' device (no host sync), measured on the final parameters: the first is ~0 when the guarantee
        holds, the second gives its scale. ``None`` without ``measure`` (the re-projection still happens).

        Raises ``RuntimeError`` without a :meth:`snapshot` since the last call, or if a basis or a parameter was
        replaced, or a parameter's shape, dtype or device changed, in between (``W_before`` would not be the
        parameters' own).
        """
        if self._snapshotted is None:
            raise RuntimeError("finish_update() needs snapshot() right before the optimizer step")
        snapshotted, self._snapshotted = self._snapshotted, None
        layout = self._layout()
        groups = layout.groups
        if groups is not snapshotted:
            raise RuntimeError("the bases or the parameters' layout changed between snapshot() and finish_update()")
        measured = [group.finish_update(self._rows_of(layout, group), reproject, measure) for group in groups]
        pairs = [tensor for pair in measured if pair is not None for tensor in pair]  # (an FSDP2 rank may hold none)
        if not measure:
            return None
        if pairs:  # max |x| of every (delta W U, delta W) with one foreach kernel, then the max per kind
            return torch.stack(torch._foreach_norm(pairs, float("inf"))).view(-1, 2).amax(0).float()
        return torch.zeros(2, device=groups[0].bases.device if groups else None)


class _Group:
    """Protected tensors whose local rows share one shape ``(..., d)``, dtype and device, with their bases stacked
    as ``bases`` ``(n, d, k_max)`` in the compute dtype (float32, or float64 for float64 rows): zero columns pad the
    smaller bases (they add nothing to ``U U^T``), so one batched product projects the whole group (LoRA's A and B,
    a tuner's per-layer tensors) instead of one small product per tensor.

    It keeps, from its first use to its last, the buffers a step would otherwise allocate: a workspace ``(n, ..., d)``
    in the compute dtype and the coefficients ``R U`` ``(n, m, k_max)`` for the projection, and :attr:`before`
    ``(n, ..., d)`` in the rows' dtype for the snapshot; each with one view per member, so a step copies in and out
    with one ``torch._foreach_copy_`` and no ``stack`` / ``unbind``. They cost the memory of the group's gradients
    (in the compute dtype) and of its parameters, held while the group stays (a task, as bases grow after it).
    """

    def __init__(self, positions: list[int], bases: torch.Tensor) -> None:
        self.positions, self.bases = positions, bases  # the members' positions in the projector's tensor order
        self.before: torch.Tensor | None = None
        self._before_rows: list[torch.Tensor] = []
        self._workspace: torch.Tensor | None = None
        self._workspace_rows: list[torch.Tensor] = []
        self._flat: torch.Tensor | None = None  # the workspace as (n, m, d)
        self._coefficients: torch.Tensor | None = None

    def project_out(self, rows: list[torch.Tensor]) -> None:
        """``R <- R - (R U) U^T`` in place, for one ``(..., d)`` view per member (the group's shape and dtype)."""
        self._load(rows)
        self._project_workspace()
        torch._foreach_copy_(rows, self._workspace_rows)

    def snapshot(self, rows: list[torch.Tensor]) -> None:
        """Copy the members' ``(..., d)`` rows into :attr:`before`."""
        if self.before is None:
            self.before = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, device=rows[0].device)
            self._before_rows = list(self.before.unbind(0))
        torch._foreach_copy_(self._before_rows, rows)

    def finish_update(
        self, rows: list[torch.Tensor], reproject: bool, measure: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Given the rows after the step and :attr:`before`: with ``reproject``, ``W <- W_before + delta W -
        (delta W U) U^T`` in place; with ``measure``, ``(delta W U, delta W)`` of the final rows, views of this
        group's buffers valid until its next use (``None`` without ``measure``, or when this rank holds no rows)."""
        if reproject:
            self._load(rows).sub_(self.before)
            self._project_workspace()
            self._workspace.add_(self.before)
            torch._foreach_copy_(rows, self._workspace_rows)
        if not measure or not rows[0].numel():
            return None
        # delta W of the parameters as they now are: the workspace already holds them unless the copy rounded
        exact = reproject and rows[0].dtype == self._workspace.dtype
        delta = (self._workspace if exact else self._load(rows)).sub_(self.before)
        return torch.bmm(self._flat, self.bases, out=self._coefficients), delta

    def _load(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """The workspace, made on first use, holding ``rows`` in the compute dtype."""
        if self._workspace is None:
            shape, compute = (len(rows), *rows[0].shape), self.bases.dtype
            self._workspace = torch.empty(shape, dtype=compute, device=rows[0].device)
            self._workspace_rows = list(self._workspace.unbind(0))
            features = self.bases.shape[1]
            self._flat = self._workspace.view(len(rows), rows[0].numel() // features, features)
            coefficients = (*self._flat.shape[:2], self.bases.shape[2])
            self._coefficients = torch.empty(coefficients, dtype=compute, device=rows[0].device)
        torch._foreach_copy_(self._workspace_rows, rows)
        return self._workspace

    def _project_workspace(self) -> None:
        """``X <- X - (X U) U^T`` on the workspace ``X``: two batched products, into buffers."""
        torch.bmm(self._flat, self.bases, out=self._coefficients)
        self._flat.baddbmm_(self._coefficients, self.bases.mT, alpha=-1)


@dataclass(frozen=True)
class _Layout:
    """What :meth:`GradientProjector._layout` was built for: the bases and parameters (held, compared by
    identity), each parameter's ``(shape, dtype, device)``, and the groups."""

    bases: list[torch.Tensor]
    parameters: list[torch.Tensor]
    layout: list[tuple[torch.Size, torch.dtype, torch.device]]
    groups: list[_Group]


def _project_out_stacked(rows: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``R - (R U) U^T`` per member: ``rows`` ``(n, ..., d)`` against ``bases`` ``(n, d, k)`` (orthonormal columns,
    zero columns allowed), in float32 or better, returned in ``rows``' dtype."""
    compute = torch.promote_types(rows.dtype, torch.float32)
    x = rows.to(compute)
    u = bases.to(device=rows.device, dtype=compute)
    return (x - (x @ u) @ u.mT).to(rows.dtype)


def _outside(covariance: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``P C P`` with ``P = I - U U^T`` for ``span`` ``U`` ``(d, k)`` orthonormal; ``C`` itself when ``k = 0``."""
    if span.shape[1] == 0:
        return covariance
    u = span.to(device=covariance.device, dtype=torch.float64)
    c = covariance.to(torch.float64)
    c = c - u @ (u.T @ c)
    return c - (c @ u) @ u.T


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of an FSDP2 ``DTensor`` (sharded on dim 0; under no_grad a view of its storage), or
    ``tensor`` itself. The projection acts on the last axis, so it is exact row by row."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
