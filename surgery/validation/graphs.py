"""The rewritten graph against a traced graph of the reference, compared with networkx.

Both graphs come from the engine's tracer on the same example inputs (:mod:`.reference_trace`)
and are reduced to labelled tensor dataflow (:mod:`.dataflow`, which documents rules 1-3 of
what is ignored). One more rule applies here:

4. the reference wrapper's own cache helpers (opaque calls on the wrapper, which has no
   native name) stand for the wrapped model's helper they forward to inside opaque code.
   Such a call takes the label of the unmatched rewritten helper call that reads the same
   cache inputs; when the rewritten graph has none (the model decided with a traced guard
   what the wrapper decides inside the helper, e.g. no cache update on a denoising call) it
   is dropped with the nodes that only fed it. A missing cache update is then left to the
   numeric cases, which compare every cache after every call. Everything rule 4 touches is
   listed in :attr:`GraphComparison.ignored`.

Matching. Every node gets a forward hash (its label plus its inputs' hashes per argument
slot: a Merkle hash of everything upstream) and a reverse hash (its label plus its
consumers' reverse hashes per slot). ``add``, ``mul`` and opaque helpers compare their inputs
as a set. Nodes with equal hashes pair up (and must also agree edge by edge); then nodes
whose inputs are paired with each other's, nodes with equal reverse hashes, and nodes whose
consumers are paired with each other's pair up too, repeatedly. The result is named node by
node: an unpaired node is *only* on its side (an added or removed op); a paired node that
reads other (paired) values than its partner is *changed* (rewired); paired nodes that
differ only because something upstream differs are counted as downstream. When nothing
differs and the graphs are small enough, networkx' ``DiGraphMatcher`` confirms that the two
labelled DiGraphs are isomorphic.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from .dataflow import NameMap, dataflow, prune_dead

_COMMUTATIVE = frozenset({"add", "mul", "iadd", "imul"})
# Above this many compared nodes VF2 is not run on top of the hash matching (a tiny stand-in
# with a grafted branch: about 540, 0.45 s).
VF2_LIMIT = 800


@dataclass(frozen=True)
class GraphDifference:
    """One node-level difference, named by the fx node it was found at.

    ``side`` is ``"rewritten"`` or ``"reference"``; ``kind`` is ``"only"`` (an op with no
    counterpart on the other side: added or removed) or ``"changed"`` (reported on the
    rewritten side: the same op at the same place as reference node ``partner``, reading
    other values); ``where`` is the module (or surgery insertion) it belongs to.
    """

    side: str
    kind: str
    node: str
    op: str
    target: str
    where: str
    partner: str | None = None
    detail: str = ""

    def describe(self) -> str:
        place = f" in {self.where}" if self.where else ""
        if self.kind == "changed":
            return (f"{self.node} ({self.op} {self.target}){place} is wired differently from reference "
                    f"{self.partner}" + (f": {self.detail}" if self.detail else ""))
        return f"{self.side} only: {self.node} ({self.op} {self.target}){place}" + (
            f" ({self.detail})" if self.detail else "")


@dataclass
class GraphComparison:
    """The result of :func:`compare_graphs`."""

    rewritten_nodes: int
    reference_nodes: int
    matched: int
    differences: list[GraphDifference]
    downstream: int  # unmatched nodes that only follow from the listed differences
    isomorphic: bool | None  # DiGraphMatcher's verdict, None when the graphs were too large
    ignored: list[str] = field(default_factory=list)  # what rule 4 relabelled or dropped

    @property
    def equal(self) -> bool:
        return not self.differences


def _digest(*parts: Any) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()


def _unordered(label: tuple) -> bool:
    return label[0] == "helper" or (label[0] in ("call_function", "call_method") and label[1] in _COMMUTATIVE)


def _in_slots(g: nx.DiGraph, n: str) -> list[tuple[str, str]]:
    """``(slot, producer)`` pairs of ``n``; slots are blanked for commutative ops and helpers."""
    blank = _unordered(g.nodes[n]["label"])
    pairs = [("" if blank else slot, p) for p in g.predecessors(n) for slot in g.edges[p, n]["slots"]]
    return sorted(set(pairs)) if blank else sorted(pairs)


def _out_slots(g: nx.DiGraph, n: str) -> list[tuple[str, str]]:
    """``(slot, consumer)`` pairs of ``n``, slots blanked where the consumer is unordered."""
    pairs = []
    for s in g.successors(n):
        blank = _unordered(g.nodes[s]["label"])
        for slot in g.edges[n, s]["slots"]:
            pairs.append(("" if blank else slot, s))
    return sorted(set(pairs))


def forward_hashes(g: nx.DiGraph) -> dict[str, str]:
    """Per node: a hash of its label and, per argument slot, of everything upstream."""
    out: dict[str, str] = {}
    for n in nx.topological_sort(g):
        out[n] = _digest(g.nodes[n]["label"], tuple(sorted((slot, out[p]) for slot, p in _in_slots(g, n))))
    return out


def reverse_hashes(g: nx.DiGraph) -> dict[str, str]:
    """Per node: a hash of its label and of everything downstream (by consumer slot)."""
    out: dict[str, str] = {}
    for n in reversed(list(nx.topological_sort(g))):
        out[n] = _digest(g.nodes[n]["label"], tuple(sorted((slot, out[s]) for slot, s in _out_slots(g, n))))
    return out


def _pair_by(a: Iterable[str], b: Iterable[str], key_a: Callable[[str], Any], key_b: Callable[[str], Any]
             ) -> dict[str, str]:
    """Pair nodes with equal keys (``None`` never pairs), first come first served."""
    groups: dict[Any, list[str]] = defaultdict(list)
    for n in b:
        key = key_b(n)
        if key is not None:
            groups[key].append(n)
    pairs = {}
    for n in a:
        key = key_a(n)
        bucket = groups.get(key) if key is not None else None
        if bucket:
            pairs[n] = bucket.pop(0)
    return pairs


def _exact_pairs(ours: nx.DiGraph, theirs: nx.DiGraph, order_a: list[str], order_b: list[str]) -> dict[str, str]:
    fa, fb = forward_hashes(ours), forward_hashes(theirs)
    ra, rb = reverse_hashes(ours), reverse_hashes(theirs)
    # Forward+reverse first (it separates look-alikes by their consumers), then forward only.
    pairs = _pair_by(order_a, order_b, lambda n: (fa[n], ra[n]), lambda n: (fb[n], rb[n]))
    taken = set(pairs.values())
    pairs.update(_pair_by([n for n in order_a if n not in pairs], [n for n in order_b if n not in taken],
                          fa.__getitem__, fb.__getitem__))
    # Hash pairs must also agree edge by edge (look-alikes may have been crossed).
    changed = True
    while changed:
        changed = False
        for a, b in list(pairs.items()):
            if sorted((slot, pairs.get(p) or "") for slot, p in _in_slots(ours, a)) != _in_slots(theirs, b):
                del pairs[a]
                changed = True
    return pairs


def _align(ours: nx.DiGraph, theirs: nx.DiGraph, pairs: dict[str, str], order_a: list[str],
           order_b: list[str]) -> dict[str, str]:
    """Extend the exact ``pairs`` to nodes at the same place whose surroundings differ.

    Three passes, repeated while they pair anything: nodes whose inputs are paired with
    each other's (forward, local), nodes with equal reverse hashes (everything downstream
    alike), nodes whose consumers are paired with each other's (reverse, local).
    """
    ra, rb = reverse_hashes(ours), reverse_hashes(theirs)

    def free_a(reverse: bool = False) -> list[str]:
        return [n for n in (reversed(order_a) if reverse else order_a) if n not in pairs]

    def free_b(reverse: bool = False) -> list[str]:
        taken = set(pairs.values())
        return [n for n in (reversed(order_b) if reverse else order_b) if n not in taken]

    def forward_a(n: str) -> Any:
        slots = _in_slots(ours, n)
        if any(p not in pairs for _, p in slots):
            return None
        return ours.nodes[n]["label"], tuple(sorted((slot, pairs[p]) for slot, p in slots))

    def forward_b(n: str) -> Any:
        return theirs.nodes[n]["label"], tuple(_in_slots(theirs, n))

    def reverse_a(n: str) -> Any:
        slots = _out_slots(ours, n)
        if not slots or any(c not in pairs for _, c in slots):
            return None
        return ours.nodes[n]["label"], tuple(sorted((slot, pairs[c]) for slot, c in slots))

    def reverse_b(n: str) -> Any:
        return theirs.nodes[n]["label"], tuple(_out_slots(theirs, n))

    progress = True
    while progress:
        progress = False
        for key_a, key_b, reverse in ((forward_a, forward_b, False),
                                      (lambda n: (ours.nodes[n]["label"], ra[n]),
                                       lambda n: (theirs.nodes[n]["label"], rb[n]), True),
                                      (reverse_a, reverse_b, True)):
            while True:
                new = _pair_by(free_a(reverse), free_b(reverse), key_a, key_b)
                if not new:
                    break
                pairs.update(new)
                progress = True
    return pairs


def compare_dataflow(ours: nx.DiGraph, theirs: nx.DiGraph, *, vf2_limit: int = VF2_LIMIT) -> GraphComparison:
    """Compare two dataflow graphs (``ours`` = rewritten, ``theirs`` = reference)."""
    order_a = list(nx.topological_sort(ours))
    order_b = list(nx.topological_sort(theirs))
    ignored = _resolve_wrapper_helpers(ours, theirs, _exact_pairs(ours, theirs, order_a, order_b))
    order_b = list(nx.topological_sort(theirs))
    exact = _exact_pairs(ours, theirs, order_a, order_b)
    pairs = _align(ours, theirs, dict(exact), order_a, order_b)
    back = {b: a for a, b in pairs.items()}
    differences: list[GraphDifference] = []
    for n in order_a:
        if n not in pairs:
            differences.append(_only("rewritten", ours, n))
    for n in order_b:
        if n not in back:
            differences.append(_only("reference", theirs, n))
    downstream = 0
    for a in order_a:
        if a not in pairs or a in exact:
            continue
        b = pairs[a]
        slots = _in_slots(ours, a)
        if all(p in pairs for _, p in slots) and sorted((slot, pairs[p]) for slot, p in slots) != _in_slots(theirs, b):
            # Same op at the same place, reading other (matched) values: rewired.
            data = ours.nodes[a]
            differences.append(GraphDifference("rewritten", "changed", a, data["op"], data["target"], data["where"],
                                               b, _slot_detail(slots, _in_slots(theirs, b), pairs)))
        else:
            downstream += 1
    isomorphic = None
    if not differences and max(len(ours), len(theirs)) <= vf2_limit:
        matcher = nx.algorithms.isomorphism.DiGraphMatcher(
            ours, theirs, node_match=lambda x, y: x["label"] == y["label"],
            edge_match=lambda x, y: x["slots"] == y["slots"])
        isomorphic = matcher.is_isomorphic()
        if not isomorphic:
            differences.append(GraphDifference("rewritten", "only", "<graph>", "", "", "",
                                               detail="every node was paired but networkx finds no isomorphism"))
    return GraphComparison(len(ours), len(theirs), len(exact), differences, downstream, isomorphic, ignored)


def _resolve_wrapper_helpers(ours: nx.DiGraph, theirs: nx.DiGraph, exact: dict[str, str]) -> list[str]:
    """Rule 4 of the module docstring: give each wrapper helper the label it stands for, or drop it.

    A wrapper helper (an opaque call on the reference's wrapper, which has no native name)
    forwards to a helper of the wrapped model inside opaque code. It takes the label of the
    unmatched rewritten helper call that reads exactly the same tensors; without one it is
    removed with the nodes that only fed it. Returns notes for the report.
    """
    back = {b: a for a, b in exact.items()}
    free = [n for n, d in ours.nodes(data=True) if d["label"][0] == "helper" and n not in exact]
    notes: list[str] = []
    drop: list[str] = []

    def inputs(g: nx.DiGraph, n: str) -> set[str]:
        return {p for p in g.predecessors(n) if g.nodes[p]["label"][0] == "input"}

    for w in sorted(n for n, d in theirs.nodes(data=True) if d.get("wrapper_helper") and n not in back):
        reads = set(theirs.predecessors(w))
        # Same input containers (caches), then the most inputs in common.
        candidates = [h for h in free if {exact.get(p) for p in inputs(ours, h)} == inputs(theirs, w)
                      and inputs(theirs, w)]
        if candidates:
            h = max(candidates, key=lambda c: len({exact.get(p) for p in ours.predecessors(c)} & reads))
            notes.append(f"reference {w} (wrapper helper {theirs.nodes[w]['target']}) stands for "
                         f"rewritten {h} ({ours.nodes[h]['target']})")
            theirs.nodes[w]["label"] = ours.nodes[h]["label"]
            free.remove(h)
        else:
            drop.append(w)
    if drop:
        targets = {w: theirs.nodes[w]["target"] for w in drop}
        before = set(theirs.nodes)
        theirs.remove_nodes_from(drop)
        prune_dead(theirs)
        fed = sorted(before - set(theirs.nodes) - set(drop))
        notes += [f"reference {w} (wrapper helper {targets[w]}) has no counterpart call: dropped" for w in drop]
        notes += [f"reference {n} only fed a dropped wrapper helper" for n in fed]
    return notes


def _only(side: str, g: nx.DiGraph, n: str) -> GraphDifference:
    data = g.nodes[n]
    inputs = [p for _, p in _in_slots(g, n)]
    users = sorted(g.successors(n))
    parts = []
    if inputs:
        parts.append("reads " + ", ".join(inputs[:4]) + (" ..." if len(inputs) > 4 else ""))
    if users:
        parts.append("feeds " + ", ".join(users[:4]) + (" ..." if len(users) > 4 else ""))
    return GraphDifference(side, "only", n, data["op"], data["target"], data["where"], detail="; ".join(parts))


def _slot_detail(ours: list[tuple[str, str]], theirs: list[tuple[str, str]], pairs: dict[str, str]) -> str:
    """Which argument slots read other values, in the reference's node names."""
    mine: dict[str, list[str]] = defaultdict(list)
    for slot, p in ours:
        mine[slot].append(pairs[p])
    other: dict[str, list[str]] = defaultdict(list)
    for slot, p in theirs:
        other[slot].append(p)
    parts = []
    for slot in sorted(set(mine) | set(other)):
        left, right = sorted(mine.get(slot, [])), sorted(other.get(slot, []))
        if left != right:
            name = f"argument {slot}" if slot else "operands"
            parts.append(f"{name} read the counterparts of {', '.join(left) or '-'}, "
                         f"the reference reads {', '.join(right) or '-'}")
    return "; ".join(parts[:3])


def compare_graphs(rewritten: fx.Graph, rewritten_module: nn.Module, reference: fx.Graph,
                   reference_module: nn.Module, to_native: NameMap) -> GraphComparison:
    """Compare the rewritten graph with the reference graph as tensor dataflow.

    ``to_native`` maps a reference module path or state_dict key to its native name
    (``None`` for modules that only the wrapper has); the rewritten model's names are native.
    """
    ours = dataflow(rewritten, rewritten_module, lambda name: name)
    theirs = dataflow(reference, reference_module, to_native)
    return compare_dataflow(ours, theirs)


__all__ = ["VF2_LIMIT", "GraphComparison", "GraphDifference", "compare_dataflow", "compare_graphs",
           "forward_hashes", "reverse_hashes"]
