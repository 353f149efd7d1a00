"""Static activation scales: run N batches through the unquantized graphs, record amax per linear input.

For every MatMul linear named in `linears`, the largest |x| of its input over all batches and all graphs
(prefill, decode and MTP run the same layers, so one scale per linear serves every graph). The scale the
graph uses is derived from it by the activation pass (amax / 448, or its power of two).

The batches come from text when the caller gives token windows (as users calibrate: real activations,
whose outliers random ids do not produce), else from seeded random inputs. With text, each graph sees
what it sees when the chain runs over the window ids[:, 0 .. S-1] (DeepSeek-V3's sequential MTP):
    prefill  tokens 0 .. S-2 at positions 0 .. S-2 -> hidden h_t
    decode   token S-1 at position S-1, over prefill's latent cache
    mtp      at slot t: prefill's h_t and token t+1, slots 0 .. S-2
    mtp.{d}  at slot t: module d-1's state at t (its hidden output) and token t+1+d, slots 0 .. S-2-d
             (the window runs out of tokens d slots earlier than for module 0)
Every graph reads at least 2 slots, so a window holds at least max(D, 1) + 2 tokens for D MTP modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from dsv3c.artifact.export_folder import ExportGraphs
from dsv3c.artifact.manifest import Manifest
from dsv3c.artifact.names import mtp_role, mtp_roles
from dsv3c.errors import UserError
from dsv3c.onnxkit.linears import LinearKind, rewritable_linears
from dsv3c.passes.ort_run import FeedShape, GraphRunner, random_feeds

Outputs = dict[str, np.ndarray]


def calibrate(
    graphs: ExportGraphs,
    linears: set[str],
    batches: int,
    seed: int = 0,
    shape: FeedShape | None = None,
    text: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """{weight name: activation amax} for the MatMul linears in `linears`; `text`: token windows
    [B, S] per batch (S >= min_window(MTP modules)), the first `batches` of them."""
    if batches < 1:
        raise UserError(f"--calibrate needs at least 1 batch, got {batches}")
    if not graphs.has_weights:
        raise UserError(f"{graphs.folder}: calibration runs the model, but this export has no weights (--weights none)")
    if text is not None:
        text = list(text)[:batches]
        if not text:
            raise UserError("--calibration-data gave no batch of tokens")
        modules = len(mtp_roles(graphs.models))
        shortest, need = min(w.shape[1] for w in text), min_window(modules)
        if shortest < need:
            raise UserError(
                f"a calibration window of {shortest} tokens is too short: prefill and {modules} MTP module(s)"
                f" need at least {need}"
            )
    probes = {role: _activations(graphs, role, linears) for role in graphs.models}
    run = [r for r in chain_order(graphs.models) if probes[r] or (text is not None and _feeds_a_probe(r, probes))]
    runners = {role: GraphRunner(graphs.models[role], graphs.folder, extra_outputs=list(probes[role])) for role in run}
    amax: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    for b in range(len(text) if text is not None else batches):
        outputs: dict[str, Outputs] = {}  # this batch's outputs per role, read by the graphs after it
        for role, runner in runners.items():
            if text is None:
                feeds = random_feeds(graphs.manifest, role, rng, shape or FeedShape())
            else:
                source = feeds_from(role)
                if source is not None and source not in outputs:
                    raise UserError(f"the {role} graph reads the {source} graph's outputs, which this export lacks")
                feeds = text_feeds(graphs.manifest, role, text[b], {} if source is None else outputs[source])
            outputs[role] = runner.run(feeds)
            for tensor, names in probes[role].items():
                value = float(np.abs(outputs[role][tensor]).max())
                for name in names:
                    amax[name] = max(amax.get(name, 0.0), value)
    return amax


def min_window(mtp_modules: int) -> int:
    """Tokens a text window needs so that every graph reads at least 2 slots: prefill reads S - 1, MTP
    module d reads S - 1 - d, so the deepest of `mtp_modules` modules reads S - mtp_modules."""
    return max(mtp_modules, 1) + 2


def chain_order(roles: Iterable[str]) -> list[str]:
    """prefill, decode, then the MTP modules as they chain (mtp, mtp.1, mtp.2, ...); any other role last."""
    roles = list(roles)
    chain = [r for r in ("prefill", "decode") if r in roles] + mtp_roles(roles)
    return chain + sorted(r for r in roles if r not in chain)


def feeds_from(role: str) -> str | None:
    """The role whose outputs `role` reads when generating from text: decode and MTP module 0 read
    prefill's; module d >= 1 reads module d-1's."""
    if role == "prefill":
        return None
    if role in ("decode", mtp_role(0)):
        return "prefill"
    depth = _mtp_depth(role)
    if depth is None:
        raise UserError(f"calibration from text does not know which graph feeds the {role} graph")
    return mtp_role(depth - 1)


def hidden_output(manifest: Manifest, role: str) -> str:
    """The name of the hidden-state output of `role` in the manifest's signature (prefill's final-normed
    `hidden`, an MTP module's `hidden_out`): what decode-side consumers read as the state."""
    names = [t.name for t in manifest.signatures[role].outputs if t.name.startswith("hidden")]
    if len(names) != 1:
        raise UserError(f"{role} outputs {names or 'no'} hidden state(s); calibration from text needs exactly one")
    return names[0]


def calibration_record(batches: int, seed: int, text: Sequence[np.ndarray] | None) -> dict[str, object]:
    """What the manifest says about the calibration batches: from text (how much) or random ids (seed)."""
    if text is None:
        return {"source": "random ids", "batches": batches, "seed": seed}
    used = list(text)[:batches]
    return {
        "source": "text",
        "batches": len(used),
        "tokens": int(sum(w.size for w in used)),
        "window": int(used[0].shape[1]) if used else 0,
    }


def text_feeds(manifest: Manifest, role: str, ids: np.ndarray, source: Outputs) -> dict[str, np.ndarray]:
    """The inputs of `role` for token windows ids [B, S]; `source`: the outputs of the graph it reads
    (`feeds_from(role)`: prefill's for decode and MTP module 0, module d-1's for module d)."""
    batch, seq = ids.shape
    depth = 0 if role in ("prefill", "decode") else _mtp_depth(role)
    if depth is None:
        raise UserError(f"calibration from text does not know how to feed the {role} graph")
    slots = seq - 1 - depth  # prefill and module 0 read S - 1 slots; module d has tokens for d fewer
    if slots < 1:
        raise UserError(f"a calibration window of {seq} tokens is too short for the {role} graph")
    positions = np.tile(np.arange(slots, dtype=np.int64), (batch, 1))  # [B, slots]
    feeds: dict[str, np.ndarray] = {}
    for t in manifest.signatures[role].inputs:
        if t.dtype not in ("int64", "float32"):
            raise UserError(f"{role} input {t.name} is {t.dtype}; calibration runs float32 exports only")
        if role == "prefill":
            feeds[t.name] = {"input_ids": ids[:, :-1], "positions": positions}[t.name]
        elif role == "decode" and t.name in ("input_ids", "positions"):
            last = ids[:, -1:] if t.name == "input_ids" else np.full((batch, 1), seq - 1, dtype=np.int64)
            feeds[t.name] = last  # [B, 1]: the window's last token, after prefill's S - 1
        elif role == "decode" and t.name.startswith("past_"):
            feeds[t.name] = source["new_" + t.name[len("past_") :]]
        elif t.name == "next_ids":
            feeds[t.name] = ids[:, 1 + depth :]  # token t+1+d at slot t  [B, slots]
        elif t.name == "positions":
            feeds[t.name] = positions
        elif t.name.startswith("hidden"):
            upstream = feeds_from(role)
            assert upstream is not None
            feeds[t.name] = source[hidden_output(manifest, upstream)][:, :slots]  # [B, slots, D]
        elif t.name.startswith("past_"):  # the MTP module's own cache starts empty
            width = t.shape[-1]
            assert isinstance(width, int)
            feeds[t.name] = np.zeros((batch, 0, width), dtype=np.float32)
        else:
            raise UserError(f"{role} input {t.name}: calibration from text does not know how to feed it")
    return feeds


def _activations(graphs: ExportGraphs, role: str, linears: set[str]) -> dict[str, list[str]]:
    """{activation tensor: the linears in `linears` reading it} for the MatMul linears of `role`."""
    inputs: dict[str, list[str]] = {}
    for linear in rewritable_linears(graphs.models[role].graph):
        if linear.kind == LinearKind.MATMUL and linear.name in linears:
            assert linear.activation is not None and linear.activation.name is not None
            inputs.setdefault(linear.activation.name, []).append(linear.name)
    return inputs


def _feeds_a_probe(role: str, probes: dict[str, dict[str, list[str]]]) -> bool:
    """Whether a graph that records activations reads `role`'s outputs, directly or down the MTP chain."""
    return any(probes[r] and role in _upstream(r) for r in probes)


def _upstream(role: str) -> list[str]:
    """The graphs `role` reads from text, nearest first (mtp.2 -> mtp.1, mtp, prefill)."""
    out: list[str] = []
    source = feeds_from(role)
    while source is not None:
        out.append(source)
        source = feeds_from(source)
    return out


def _mtp_depth(role: str) -> int | None:
    """d for the role of MTP module d (artifact.names.mtp_role), else None."""
    if role == mtp_role(0):
        return 0
    prefix, _, depth = role.partition(".")
    return int(depth) if prefix == mtp_role(0) and depth.isdigit() and mtp_role(int(depth)) == role else None
