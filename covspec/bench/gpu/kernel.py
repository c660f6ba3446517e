"""The GPU check (``covspec bench gpu``): the Triton verifier against the torch one.

On random verification batches (``random_case``: random logits, draft distributions q
near the target, drafts drawn from q, explicit uniforms) it runs the reference
``verify_batch`` and ``verify_batch_triton`` and counts disagreements (``compare``):
accepted must be equal; a token may differ only where the sample uniform lies within
``BOUNDARY`` of a CDF boundary of the distribution it is drawn from (the two sum in
different orders), and such draws are counted apart as ``near_boundary``, never as
agreement or mismatch. It times both (median milliseconds, device-synchronized) and
the torch preprocessing they share (argmax and p), per vocabulary, batch and mode.

The report is a JSON-able dict with one key per section: ``meta`` (device, versions,
whether Triton ran interpreted) and ``kernel`` (``kernel_check``); a ``serve`` section
can sit beside them, and ``markdown`` renders the sections it knows. Nothing here
decides the device: the caller passes it (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from covspec.runtime_edge import verify_triton
from covspec.runtime_edge.verify_batch import residual_rows, target_probs_batch, verify_batch
from covspec.runtime_edge.verify_triton import verify_batch_triton

BOUNDARY = 1e-9                          # a uniform this close to a CDF boundary may draw either side
MODES = ("greedy", "sampling", "mixed")
# (temperature, top_k, top_p) of sampling sessions: plain, top-k, top-p, both.
SAMPLING_SETTINGS = [(1.0, 0, 1.0), (0.7, 50, 1.0), (0.8, 0, 0.9), (1.0, 40, 0.95), (0.6, 20, 0.8)]
GREEDY = (0.0, 0, 1.0)
SPARSE_K = 16                            # a sparse q keeps this many ids, as the compact wire sends


@dataclass
class Case:
    """One verification batch, in ``verify_batch``'s argument order (see its docstring)."""

    draft: torch.Tensor                  # [total] int64
    offsets: torch.Tensor                # [B + 1] int64
    logits: torch.Tensor                 # [total + B, V] float
    q: torch.Tensor | None               # [total, V] float64, None when all greedy
    temperature: torch.Tensor            # [B] float64, 0: greedy
    top_k: torch.Tensor                  # [B] int64
    top_p: torch.Tensor                  # [B] float64
    accept_uniforms: torch.Tensor | None  # [total] float64
    sample_uniforms: torch.Tensor | None  # [B] float64

    def args(self) -> tuple:
        return (self.draft, self.offsets, self.logits, self.q, self.temperature, self.top_k, self.top_p,
                self.accept_uniforms, self.sample_uniforms)

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()


def random_case(generator: torch.Generator, vocab: int, lengths: list[int], settings: list[tuple],
                dtype: torch.dtype = torch.float32, scale: float = 3.0) -> Case:
    """A random batch on ``generator``'s device: session b has chunk length ``lengths[b]``
    and ``settings[b]`` = (temperature, top_k, top_p). q is the softmax of the target's
    logits plus noise (every other session sparse: its top ``SPARSE_K`` ids); sampling
    sessions draw their drafts from q, greedy ones take q's argmax."""
    device = generator.device
    sessions, total = len(lengths), sum(lengths)
    assert len(settings) == sessions and min(lengths, default=0) >= 0
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device)
    logits = torch.randn(total + sessions, vocab, generator=generator, device=device) * scale  # [total + B, V]
    session_of = torch.repeat_interleave(torch.arange(sessions, device=device),
                                         torch.tensor(lengths, device=device), output_size=total)  # [total]
    draft_rows = torch.arange(total, device=device) + session_of                       # [total]
    noise = torch.randn(total, vocab, generator=generator, device=device, dtype=torch.float64)
    noise_scale = torch.tensor([0.3, 1.0], dtype=torch.float64, device=device)[session_of % 2]  # [total]
    q = torch.softmax(logits[draft_rows].double() + noise * noise_scale[:, None], dim=-1)        # [total, V]
    del noise
    if total:
        sparse = (session_of % 2 == 1)[:, None]
        keep = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, q.topk(min(SPARSE_K, vocab), -1).indices, True)
        q = torch.where(sparse & ~keep, torch.zeros_like(q), q)
        q = q / q.sum(-1, keepdim=True)
    temperature = torch.tensor([s[0] for s in settings], dtype=torch.float64, device=device)  # [B]
    sampled = temperature[session_of] > 0                                              # [total]
    draft = q.argmax(-1)                                                               # [total]
    if total:
        draft = torch.where(sampled, torch.multinomial(q, 1, generator=generator)[:, 0], draft)
    any_sampling = bool((temperature > 0).any())
    return Case(draft=draft, offsets=offsets, logits=logits.to(dtype), q=q if any_sampling else None,
                temperature=temperature,
                top_k=torch.tensor([s[1] for s in settings], dtype=torch.int64, device=device),
                top_p=torch.tensor([s[2] for s in settings], dtype=torch.float64, device=device),
                accept_uniforms=torch.rand(total, generator=generator, device=device, dtype=torch.float64)
                if any_sampling else None,
                sample_uniforms=torch.rand(sessions, generator=generator, device=device, dtype=torch.float64)
                if any_sampling else None)


def mode_case(generator: torch.Generator, vocab: int, batch: int, max_length: int, mode: str,
              min_length: int = 1) -> Case:
    """A random case for one of ``MODES``: chunk lengths in [min_length, max_length];
    sampling settings drawn from ``SAMPLING_SETTINGS``; ``mixed``: half greedy on average."""
    assert mode in MODES, f"mode must be one of {MODES}"
    seed = int(torch.randint(0, 2**31, (1,), generator=generator, device=generator.device))
    cpu = torch.Generator().manual_seed(seed)                                         # host-side choices
    lengths = torch.randint(min_length, max_length + 1, (batch,), generator=cpu).tolist()
    picks = torch.randint(0, len(SAMPLING_SETTINGS), (batch,), generator=cpu).tolist()
    greedy = [mode == "greedy" or (mode == "mixed" and bool(torch.rand(1, generator=cpu) < 0.5)) for _ in range(batch)]
    settings = [GREEDY if g else SAMPLING_SETTINGS[i] for g, i in zip(greedy, picks)]
    return random_case(generator, vocab, lengths, settings)


def boundary_distance(case: Case, accepted: int, session: int) -> float:
    """How far session ``session``'s sample uniform lies from the nearest boundary of the
    CDF it draws from, given the reference's ``accepted`` (the residual after a
    rejection, p for a bonus; as ``verify_batch`` computes them)."""
    start, n = int(case.offsets[session]), case.lengths[session]
    row = start + session + accepted                                                   # the token's logits row
    one = slice(session, session + 1)
    p = target_probs_batch(case.logits[row:row + 1], case.temperature[one], case.top_k[one], case.top_p[one])
    dist = residual_rows(p, case.q[start + accepted][None].double()) if accepted < n else p  # [1, V]
    cumulative = torch.cumsum(dist[0], dim=0)                                          # [V]
    return float((cumulative / cumulative[-1] - case.sample_uniforms[session]).abs().min())


def compare(case: Case, want: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Counts over the batch's sessions: accepted_mismatch, token_mismatch (not excused),
    near_boundary (a sampled token that differs where the uniform is within BOUNDARY
    of a CDF boundary)."""
    counts = {"sessions": len(case.lengths), "accepted_mismatch": 0, "token_mismatch": 0, "near_boundary": 0}
    sampling = (case.temperature > 0).tolist()
    for b, (wa, wt, ga, gt) in enumerate(zip(*(t.tolist() for t in (*want, *got)))):
        if wa != ga:
            counts["accepted_mismatch"] += 1
        elif wt != gt:
            near = sampling[b] and boundary_distance(case, wa, b) < BOUNDARY
            counts["near_boundary" if near else "token_mismatch"] += 1
    return counts


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs after one warm-up,
    synchronizing a CUDA device before and after each run."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def shared_preprocessing(case: Case) -> None:
    """The torch work both verifiers do: argmax per row and, if any session samples, p."""
    case.logits.argmax(dim=-1)
    sampling = case.temperature > 0
    if bool(sampling.any()):
        rows_of = torch.repeat_interleave(torch.arange(len(case.lengths), device=case.logits.device),
                                          case.offsets[1:] - case.offsets[:-1] + 1)
        temperature = torch.where(sampling, case.temperature, torch.ones_like(case.temperature))
        target_probs_batch(case.logits, temperature[rows_of], case.top_k[rows_of], case.top_p[rows_of])


def time_case(case: Case, repeats: int, device: torch.device) -> dict:
    """Median ms of the torch verifier, the Triton one, and the preprocessing they share."""
    return {"torch_ms": median_ms(lambda: verify_batch(*case.args()), repeats, device),
            "triton_ms": median_ms(lambda: verify_batch_triton(*case.args()), repeats, device),
            "shared_ms": median_ms(lambda: shared_preprocessing(case), repeats, device)}


def kernel_check(device: torch.device, vocabs: list[int], batches: list[int], modes: list[str],
                 max_length: int = 12, cases: int = 4, repeats: int = 20, seed: int = 0,
                 progress: Callable[[str], None] = lambda line: None) -> dict:
    """The ``kernel`` section: for every (vocab, batch, mode), ``cases`` random batches
    compared and the first one timed. -> {"rows": [...], "ok": bool, "boundary": float}."""
    assert cases >= 1 and repeats >= 1, "at least one case and one timed run"
    rows = []
    for vocab in vocabs:
        for batch in batches:
            for mode in modes:
                setting_seed = seed + 7919 * vocab + 31 * batch + MODES.index(mode)
                generator = torch.Generator(device=device).manual_seed(setting_seed)
                totals = {"sessions": 0, "accepted_mismatch": 0, "token_mismatch": 0, "near_boundary": 0}
                drafted = 0
                for index in range(cases):
                    case = mode_case(generator, vocab, batch, max_length, mode)
                    counts = compare(case, verify_batch(*case.args()), verify_batch_triton(*case.args()))
                    totals = {key: totals[key] + counts[key] for key in totals}
                    drafted += int(case.draft.numel())
                    if index == 0:
                        timing = time_case(case, repeats, device)
                row = {"vocab": vocab, "batch": batch, "mode": mode, "cases": cases, "drafted": drafted,
                       **totals, **{key: round(value, 4) for key, value in timing.items()}}
                rows.append(row)
                progress(f"V={vocab} B={batch} {mode}: accepted!={row['accepted_mismatch']} "
                         f"token!={row['token_mismatch']} torch {row['torch_ms']:.3f} ms "
                         f"triton {row['triton_ms']:.3f} ms")
    ok = all(r["accepted_mismatch"] == 0 and r["token_mismatch"] == 0 for r in rows)
    return {"rows": rows, "ok": ok, "boundary": BOUNDARY, "max_length": max_length, "repeats": repeats, "seed": seed}


def meta(device: torch.device) -> dict:
    """Where the check ran: device name, versions, interpreter or compiled kernel."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "interpreted": verify_triton.interpreted(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def markdown(report: dict) -> str:
    """The report's ``meta`` and ``kernel`` sections as compact Markdown (the ``serve``
    section has its own, ``serve.markdown``)."""
    info = report["meta"]
    lines = [f"Device: {info['device']}; torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}"
             + (" **in the interpreter: times are not kernel speed**" if info["interpreted"] else "") + "."]
    kernel = report.get("kernel")
    if kernel:
        lines += ["", "| V | B | mode | cases | drafted | accepted ≠ | token ≠ | near boundary | torch ms "
                      "| triton ms | shared ms | torch / triton |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in kernel["rows"]:
            ratio = r["torch_ms"] / r["triton_ms"] if r["triton_ms"] > 0 else float("nan")
            lines.append(f"| {r['vocab']} | {r['batch']} | {r['mode']} | {r['cases']} | {r['drafted']} | "
                         f"{r['accepted_mismatch']} | {r['token_mismatch']} | {r['near_boundary']} | "
                         f"{r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['shared_ms']:.3f} | {ratio:.2f} |")
        sessions = sum(r["sessions"] for r in kernel["rows"])
        near = sum(r["near_boundary"] for r in kernel["rows"])
        verdict = "agree" if kernel["ok"] else "DISAGREE"
        lines += ["", f"Kernel and torch verifier {verdict} on {sessions} sessions (chunk lengths 1-"
                      f"{kernel['max_length']}; {near} draws within {kernel['boundary']:g} of a CDF boundary "
                      f"set apart); times are medians of {kernel['repeats']} runs, shared = argmax + p in torch."]
    return "\n".join(lines) + "\n"
