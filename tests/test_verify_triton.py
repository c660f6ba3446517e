"""The fused Triton verifier equals the torch one (``verify_batch``), session by session.

On a CUDA machine the compiled kernel runs; elsewhere Triton's interpreter runs it on CPU
(TRITON_INTERPRET=1 is set here, before the kernel module is imported). Skipped without
triton. Accepted counts must be equal; a token may differ only where the sample uniform
lies within ``BOUNDARY`` of a CDF boundary, which ``assert_same`` checks explicitly.
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from click.testing import CliRunner  # noqa: E402

from covspec.bench.gpu.kernel import BOUNDARY, GREEDY, Case, boundary_distance, random_case  # noqa: E402
from covspec.cli.bench_gpu_cmd import gpu  # noqa: E402
from covspec.runtime_edge.verify_batch import target_probs_batch, verify_batch  # noqa: E402
from covspec.runtime_edge.verify_triton import kernel_available, verify_batch_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not kernel_available(DEVICE):
    pytest.skip("the Triton kernel cannot run here: no CUDA, and covspec.runtime_edge.verify_triton was "
                "imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

SETTINGS = [GREEDY, (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 3, 0.8), (2.0, 50, 0.95),
            (1.0, 1, 1.0), (0.9, 0, 0.3)]


def assert_same(case: Case, block: int | None = None) -> int:
    """Kernel == torch on ``case``; returns how many token differences were excused because
    the uniform lies within BOUNDARY of a CDF boundary (any other difference fails)."""
    want = verify_batch(*case.args())
    got = verify_batch_triton(*case.args(), block=block)
    assert all(t.dtype == torch.int64 and t.shape == want[0].shape and t.device == want[0].device for t in got)
    assert got[0].tolist() == want[0].tolist(), "accepted must be equal"
    excused = 0
    for b, (w, g) in enumerate(zip(want[1].tolist(), got[1].tolist())):
        if w != g:
            assert float(case.temperature[b]) > 0, f"greedy session {b}: token {g} != {w}"
            distance = boundary_distance(case, int(want[0][b]), b)
            assert distance < BOUNDARY, f"session {b}: token {g} != {w}, uniform {distance:.3g} from a boundary"
            excused += 1
    return excused


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("seed", range(10))
def test_random_batches_equal_torch(seed):
    """Greedy, sampling and mixed sessions, chunk lengths 0-8 (always a target-only step),
    top-k and top-p, float32 and float64 logits, one block or many blocks per row."""
    rng = torch.Generator().manual_seed(seed)
    sessions = int(torch.randint(1, 11, (1,), generator=rng))
    lengths = torch.randint(0, 9, (sessions,), generator=rng).tolist()
    lengths[0] = 0
    settings = [SETTINGS[i] for i in torch.randint(0, len(SETTINGS), (sessions,), generator=rng).tolist()]
    vocab = [7, 64, 500][seed % 3]
    dtype = torch.float64 if seed % 2 else torch.float32
    case = random_case(generator(seed), vocab, lengths, settings, dtype, scale=[0.5, 3.0][seed % 2])
    assert assert_same(case, block=None if seed % 4 < 2 else 16) == 0


def test_many_small_batches_cover_every_outcome():
    """Across many batches: rejections at every position, corrections and bonuses, all equal."""
    seen = set()
    for seed in range(24):
        rng = torch.Generator().manual_seed(1000 + seed)
        lengths = torch.randint(0, 6, (5,), generator=rng).tolist()
        settings = [SETTINGS[i] for i in torch.randint(1, len(SETTINGS), (5,), generator=rng).tolist()]
        case = random_case(generator(1000 + seed), 20, lengths, settings, torch.float64, scale=1.0)
        assert assert_same(case, block=8) == 0
        accepted = verify_batch(*case.args())[0].tolist()
        seen |= {(a, a == n) for a, n in zip(accepted, lengths)}
    assert {(a, False) for a in range(4)} | {(a, True) for a in range(5)} <= seen


def test_all_greedy_needs_no_q_or_uniforms():
    choices = [[1, 2, 3, 4], [5], [0, 0, 1], [2, 2, 2, 2, 3]]               # target argmax per row
    rows = [c for session in choices for c in session]
    logits = torch.zeros(len(rows), 6)
    logits[torch.arange(len(rows)), torch.tensor(rows)] = 4.0
    case = Case(draft=torch.tensor([1, 2, 3, 0, 5, 2, 2, 2, 2]), offsets=torch.tensor([0, 3, 3, 5, 9]),
                logits=logits, q=None, temperature=torch.zeros(4), top_k=torch.zeros(4, dtype=torch.int64),
                top_p=torch.ones(4), accept_uniforms=None, sample_uniforms=None)
    case = Case(*(None if t is None else t.to(DEVICE) for t in case.args()))
    accepted, token = verify_batch_triton(*case.args())
    assert list(zip(accepted.tolist(), token.tolist())) == [(3, 4), (0, 5), (1, 0), (4, 3)]
    assert assert_same(case) == 0


def crafted_sampling_case(accept_uniforms: list[float]) -> Case:
    """Vocabulary 5. Session 0: q == p at both rows (u < 1 accepts; u = 1 rejects with a
    residual of no mass, so the correction comes from p); session 1: p(draft) = 0, a
    rejection at 0 and a correction from the residual; session 2: a target-only bonus."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]] * 3 + [[1e-300, 0.5, 0.5, 1e-300, 1e-300]] * 2
                                    + [[0.05, 0.05, 0.1, 0.1, 0.7]], dtype=torch.float64))
    p0 = target_probs_batch(logits[:1], torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.ones(1))[0]
    q = torch.stack([p0, p0, torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)])
    case = Case(draft=torch.tensor([2, 4, 0]), offsets=torch.tensor([0, 2, 3, 3]), logits=logits, q=q,
                temperature=torch.ones(3, dtype=torch.float64), top_k=torch.zeros(3, dtype=torch.int64),
                top_p=torch.ones(3, dtype=torch.float64), accept_uniforms=torch.tensor(accept_uniforms,
                dtype=torch.float64), sample_uniforms=torch.tensor([0.95, 0.3, 0.99], dtype=torch.float64))
    return Case(*(t.to(DEVICE) for t in case.args()))


def test_crafted_sampling_outcomes():
    case = crafted_sampling_case([0.999, 0.999, 0.5])
    assert assert_same(case) == 0
    accepted, token = verify_batch_triton(*case.args())
    assert list(zip(accepted.tolist(), token.tolist())) == [(2, 4), (0, 1), (0, 4)]
    no_mass = crafted_sampling_case([1.0, 0.999, 0.5])             # u * q(x) == p(x): rejected at 0
    assert assert_same(no_mass) == 0
    assert verify_batch_triton(*no_mass.args())[0].tolist() == [0, 0, 0]


def test_zero_draft_probability_raises_the_same_way():
    logits = torch.zeros(4, 4, dtype=torch.float64)
    logits[0, 1] = 9.0                                             # p(0) tiny at row 0: rejected at 0
    q = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    settings = (torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2))
    uniforms = (torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64))

    def case(draft):
        return Case(*(t.to(DEVICE) for t in (torch.tensor(draft), torch.tensor([0, 2, 2]), logits, q, *settings,
                                              *uniforms)))

    assert assert_same(case([0, 2])) == 0                          # position 1 has q = 0, never reached
    with pytest.raises(ValueError) as want:
        verify_batch(*case([3, 1]).args())                         # position 0 has q = 0
    with pytest.raises(ValueError, match="zero draft probability") as got:
        verify_batch_triton(*case([3, 1]).args())
    assert str(got.value) == str(want.value)


def test_boundary_distance_finds_a_uniform_on_a_boundary():
    case = crafted_sampling_case([0.999, 0.999, 0.5])              # session 2 draws its bonus from p
    case.sample_uniforms[2] = 0.1                                  # p = (.05, .05, .1, .1, .7): cdf .05 .1 .2 ...
    assert boundary_distance(case, 0, 2) < 1e-15
    case.sample_uniforms[2] = 0.15
    assert abs(boundary_distance(case, 0, 2) - 0.05) < 1e-12


def test_preconditions_as_torch():
    logits = torch.zeros(3, 4, device=DEVICE)
    settings = (torch.zeros(1), torch.zeros(1, dtype=torch.int64), torch.ones(1))
    with pytest.raises(AssertionError):                            # offsets do not end at total
        verify_batch_triton(torch.tensor([1, 2]), torch.tensor([0, 1]), logits, None, *settings)
    with pytest.raises(AssertionError):                            # sampling without q
        verify_batch_triton(torch.tensor([1, 2]), torch.tensor([0, 2]), logits, None, torch.ones(1), *settings[1:])


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from covspec.runtime_edge.verify_triton import KERNEL_SIGNATURE, _verify_sessions
for sampling in (False, True):
    source = ASTSource(_verify_sessions, KERNEL_SIGNATURE, constexprs={"SAMPLING": sampling, "BLOCK": 1024})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "enable_fp_fusion": False})
    assert kernel.asm["cubin"]
print("ok")
"""


def test_kernel_compiles_for_hopper_without_a_gpu():
    """The interpreter forgives code that does not compile: build the real kernel for sm_90
    (H100/H200) with Triton's bundled ptxas, in a process without TRITON_INTERPRET."""
    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    result = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


NO_TRITON = """
import sys
sys.modules["triton"] = None                                     # import triton -> ImportError
import torch
from covspec.runtime_edge import verify_triton
assert not verify_triton.kernel_available("cpu") and not verify_triton.interpreted()
try:
    verify_triton.verify_batch_triton(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0]), torch.zeros(1, 3),
                                      None, torch.zeros(1), torch.zeros(1, dtype=torch.int64), torch.ones(1))
except RuntimeError as error:
    print("ok" if "triton" in str(error) else error)
"""


def test_without_triton_the_module_imports_and_says_so():
    result = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_bench_gpu_runs_tiny(tmp_path):
    """`covspec bench gpu --allow-cpu` on tiny sizes: a table, JSON and Markdown, exit 0."""
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(gpu, ["--allow-cpu", "--vocabs", "40,90", "--batches", "1,3", "--max-length", "4",
                                      "--cases", "2", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kernel"]["ok"] and report["meta"]["device_type"] == DEVICE.type
    assert {(r["vocab"], r["batch"], r["mode"]) for r in report["kernel"]["rows"]} == \
        {(v, b, m) for v in (40, 90) for b in (1, 3) for m in ("greedy", "sampling", "mixed")}
    assert "| V | B | mode |" in result.output and out.with_suffix(".md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_bench_gpu_without_cuda_says_so(tmp_path):
    result = CliRunner().invoke(gpu, ["--out", str(tmp_path / "gpu.json")])
    assert result.exit_code == 1 and "no CUDA device found" in result.output
    assert not (tmp_path / "gpu.json").exists()

